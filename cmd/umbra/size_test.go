package main

import (
	"errors"
	"strings"
	"testing"

	"umbra/backup"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  string // in the error; "" for none
	}{
		{"4096", 4096, ""},
		{" 4096 ", 4096, ""},
		{"4K", 4 << 10, ""},
		{"4k", 4 << 10, ""},
		{"4KiB", 4 << 10, ""},
		{"4KB", 4 << 10, ""},
		{"10G", 10 << 30, ""},
		{"1.5T", 3 << 39, ""},
		{"0.5K", 512, ""},
		{"512B", 512, ""},
		{"0", 0, ""},
		{"9223372036854775807", 1<<63 - 1, ""},
		{"8388607T", 8388607 << 40, ""},
		{"9223372036854775808", 0, "too large"},
		{"8388608T", 0, "too large"},
		{"99999999999999999999999G", 0, "too large"},
		{"", 0, "empty"},
		{"   ", 0, "empty"},
		{"1e3", 0, "whole number of bytes"},
		{"1E3", 0, "whole number of bytes"},
		{"-5", 0, "whole number of bytes"},
		{"+5", 0, "whole number of bytes"},
		{"0x10", 0, "whole number of bytes"},
		{"1.5", 0, "fraction of a byte"},
		{"0.1K", 0, "not a whole number of bytes"},
		{"10 G", 10 << 30, ""},
		{"10X", 0, "whole number of bytes"},
		{"G", 0, "whole number of bytes"},
		{"1.G", 0, "whole number of bytes"},
		{"NaN", 0, "whole number of bytes"},
		{"Inf", 0, "whole number of bytes"},
	} {
		got, err := parseSize(tc.in)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("parseSize(%q): %v, want %d", tc.in, err, tc.want)
		case tc.err == "" && got != tc.want:
			t.Errorf("parseSize(%q) = %d, want %d", tc.in, got, tc.want)
		case tc.err != "" && err == nil:
			t.Errorf("parseSize(%q) = %d, want an error saying %q", tc.in, got, tc.err)
		case tc.err != "" && !strings.Contains(err.Error(), tc.err):
			t.Errorf("parseSize(%q): %v, want it to say %q", tc.in, err, tc.err)
		case tc.err != "" && !strings.Contains(err.Error(), "e.g. 4096, 512K") && !strings.Contains(err.Error(), "at most"):
			t.Errorf("parseSize(%q): %v does not name the accepted syntax", tc.in, err)
		}
	}
}

func TestCheckChunkSize(t *testing.T) {
	for _, tc := range []struct {
		n  int64
		ok bool
	}{{4096, true}, {1 << 20, true}, {64 << 10, true}, {0, false}, {2048, false}, {3 << 12, false}, {2 << 20, false}, {-4096, false}} {
		err := checkChunkSize("--chunk-size", tc.n, 4<<10, 1<<20)
		if (err == nil) != tc.ok {
			t.Errorf("checkChunkSize(%d): %v, want ok %v", tc.n, err, tc.ok)
		}
		if err != nil && (exitCode(err) != 2 || !strings.Contains(err.Error(), "power of two from 4K to 1M")) {
			t.Errorf("checkChunkSize(%d): %v (exit %d), want exit 2 naming the range", tc.n, err, exitCode(err))
		}
	}
}

func TestExitCodes(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want int
	}{
		{errors.New("boom"), 1},
		{usageError{errors.New("bad flag")}, 2},
		{notFoundError{errors.New("no such")}, 3},
		{errUnreachable, 4},
		{accessError{errors.New("denied")}, 5},
		{backup.ErrWrongPassword, 5},
		{backup.ErrNeedPassword, 5},
	} {
		if got := exitCode(tc.err); got != tc.want {
			t.Errorf("exitCode(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

func TestJSONWanted(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want bool
	}{
		{[]string{"snapshot", "list"}, false},
		{[]string{"snapshot", "list", "--json"}, true},
		{[]string{"--json", "snapshot", "list", "--bogus"}, true},
		{[]string{"snapshot", "list", "--json=true"}, true},
		{[]string{"snapshot", "list", "--json=false"}, false},
		{[]string{"snapshot", "create", "--", "--json"}, false},
	} {
		if got := jsonWanted(tc.args); got != tc.want {
			t.Errorf("jsonWanted(%q) = %v, want %v", tc.args, got, tc.want)
		}
	}
}
