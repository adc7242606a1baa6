package api

import "testing"

// TestSupersededBase: a backup into a repository replaces that
// repository's previous base and any base from before bases were per
// repository, and nothing else: not another repository's base, not the
// new base itself, not a snapshot someone else took.
func TestSupersededBase(t *testing.T) {
	const cur = "backup-1a2b3c4d-20261124T015040.400475Z"
	for _, c := range []struct {
		old  string
		want bool
	}{
		{"backup-1a2b3c4d-20261124T015040.332107Z", true},  // this repository's last
		{"backup-20261123T101010.000000Z", true},           // untagged, from before
		{"backup-9f8e7d6c-20261124T015040.332107Z", false}, // another repository's
		{"backup-12345678-20261124T015040.332107Z", false}, // another, all digits
		{cur, false},
		{"snap-3", false},
		{"backup-", false},
		{"backup-nightly", false}, // a user's own snapshot
		{"backup-1a2b3c4d", false},
		{"backup-1a2b3c4d-mine", false},
		{"backup-20261123", false},
	} {
		if got := supersededBase(c.old, cur, "1a2b3c4d"); got != c.want {
			t.Errorf("supersededBase(%q) = %v, want %v", c.old, got, c.want)
		}
	}
}
