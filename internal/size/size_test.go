package size

import (
	"strings"
	"testing"
)

// Parse is tested through the CLI's flags (cmd/umbra/size_test.go).

func TestHuman(t *testing.T) {
	for _, tc := range []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{1<<20 - 1, "1024.0 KiB"},
		{1 << 20, "1.0 MiB"},
		{3 << 30, "3.0 GiB"},
		{5 << 40, "5.0 TiB"},
		{1 << 50, "1.0 PiB"},
		{1<<63 - 1, "8.0 EiB"},
	} {
		if got := Human(tc.n); got != tc.want {
			t.Errorf("Human(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}

func TestExactAndCheckPow2(t *testing.T) {
	for n, want := range map[int64]string{0: "0 bytes", 100: "100 bytes", 4096: "4K", 3 << 20: "3M", 1536: "1536 bytes"} {
		if got := Exact(n); got != want {
			t.Errorf("Exact(%d) = %q, want %q", n, got, want)
		}
	}
	for _, n := range []int64{4096, 64 << 10, 4 << 20} {
		if err := CheckPow2("--chunk-size", n, 4096, 4<<20); err != nil {
			t.Errorf("CheckPow2(%d): %v", n, err)
		}
	}
	for _, n := range []int64{0, 2048, 12288, 8 << 20} {
		err := CheckPow2("--chunk-size", n, 4096, 4<<20)
		if err == nil || !strings.Contains(err.Error(), "--chunk-size "+Exact(n)) || !strings.Contains(err.Error(), "from 4K to 4M") {
			t.Errorf("CheckPow2(%d): %v, want an error naming the flag, the value and the range", n, err)
		}
	}
}
