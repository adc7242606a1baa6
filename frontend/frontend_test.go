package frontend

import (
	"errors"
	"strings"
	"testing"

	"umbra/provider"
)

func TestParseName(t *testing.T) {
	for _, tc := range []struct {
		name, vol, snap string
		ok              bool
	}{
		{"vol", "vol", "", true},
		{"vol@s1", "vol", "s1", true},
		{"v.1-a_b@snap-2.x", "v.1-a_b", "snap-2.x", true},
		{"/srv/vm.img@fss-1", "/srv/vm.img", "fss-1", true}, // a reflink volume's snapshot
		{"data/vm.img@s", "data/vm.img", "s", true},
		{strings.Repeat("v", 128) + "@s", strings.Repeat("v", 128), "s", true},

		{"", "", "", false},
		{"vol@", "", "", false},
		{"@s1", "", "", false},
		{"@", "", "", false},
		{"vol@s1@s2", "", "", false},
		{"vol@@s1", "", "", false},
		{"vol@s 1", "", "", false},
		{"vol@../s1", "", "", false},
		{"vol@.s1", "", "", false},
		{"vol@s1\n", "", "", false},
		{"vol\x00@s1", "", "", false},
		{"vol\t", "", "", false},
		{"v\xffl", "", "", false},
		{"völ", "", "", false},
		{".vol", "", "", false},
		{"vol@" + strings.Repeat("s", 129), "", "", false},
		{strings.Repeat("v", 129), "", "", false},
		{"/srv/../etc/vm.img@s", "", "", false},
		{"/srv/vm.img/@s", "", "", false},
		{"/" + strings.Repeat("a", 4096) + "@s", "", "", false},
	} {
		vol, snap, err := ParseName(tc.name)
		short := tc.name
		if len(short) > 40 {
			short = short[:40]
		}
		switch {
		case tc.ok && err != nil:
			t.Errorf("ParseName(%q): %v", short, err)
		case tc.ok && (vol != tc.vol || snap != tc.snap):
			t.Errorf("ParseName(%q) = %q, %q; want %q, %q", short, vol, snap, tc.vol, tc.snap)
		case !tc.ok && err == nil:
			t.Errorf("ParseName(%q) = %q, %q; want an error", short, vol, snap)
		case !tc.ok && !errors.Is(err, provider.ErrBadID):
			t.Errorf("ParseName(%q): %v does not wrap ErrBadID", short, err)
		case !tc.ok && len(err.Error()) > 400:
			t.Errorf("ParseName(%q): error of %d bytes", short, len(err.Error()))
		}
	}
}
