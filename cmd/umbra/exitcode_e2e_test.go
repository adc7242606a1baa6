package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"umbra/internal/testutil"
)

// TestCLIExitCodes: each kind of failure has its documented exit code
// whichever command meets it, bad input is refused before anything is
// opened, and under --json every error is one JSON object on stderr.
func TestCLIExitCodes(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.NeedFUSE(t)
	dir := t.TempDir()
	fuseDir := filepath.Join(dir, "fuse")
	s := startService(t, dir, []string{"a"}, "--fuse-dir", fuseDir)
	waitFile(t, filepath.Join(fuseDir, "a"), "the volume's FUSE file")
	expect := func(code int, say string, args ...string) {
		t.Helper()
		_, stderr, got := s.run(nil, args...)
		if got != code || !strings.Contains(stderr, say) {
			t.Fatalf("umbra %s: exit %d, want %d saying %q\n%s", strings.Join(args, " "), got, code, say, stderr)
		}
	}

	// Not found wins over in use: the volume is held open (as a loop
	// device or a mount holds it).
	s.ok("snapshot", "create", "a", "--id", "one")
	f, err := os.OpenFile(filepath.Join(fuseDir, "a"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	expect(3, "not found", "snapshot", "revert", "a", "nosuch")
	expect(1, "in use", "snapshot", "revert", "a", "one")
	f.Close()

	// Sizes: refused with the syntax named, and nothing changed.
	before := s.ok("storage", "list", "a", "--json")
	for _, bad := range []struct{ max, say string }{
		{"9223372036854775808", "too large"},
		{"", "empty"},
		{"1e3", "e.g. 4096, 512K"},
		{"-1", "e.g. 4096, 512K"},
		{"0.5", "fraction"},
	} {
		expect(2, bad.say, "storage", "resize", "a", "--max", bad.max)
	}
	if after := s.ok("storage", "list", "a", "--json"); after != before {
		t.Fatalf("refused resizes changed the storage:\n%s\nthen\n%s", before, after)
	}

	// Under --json the error is JSON, with the exit code in it.
	for _, args := range [][]string{
		{"--json", "snapshot", "revert", "a", "nosuch"},
		{"storage", "resize", "a", "--max", "1e3", "--json"},
		{"--json", "snapshot", "list", "--no-such-flag"},
	} {
		stdout, stderr, code := s.run(nil, args...)
		var e struct {
			Error string `json:"error"`
			Code  int    `json:"code"`
		}
		if err := json.Unmarshal([]byte(stderr), &e); err != nil || e.Error == "" || e.Code != code || code == 0 || stdout != "" {
			t.Fatalf("umbra %s: exit %d, stdout %q, stderr %q: want one JSON error object on stderr (%v)", strings.Join(args, " "), code, stdout, stderr, err)
		}
	}

	// A repository's wrong password is exit 5 for every command.
	repo := filepath.Join(dir, "repo")
	pw, wrong := filepath.Join(dir, "pw"), filepath.Join(dir, "wrong")
	os.WriteFile(pw, []byte("right password\n"), 0o600)
	os.WriteFile(wrong, []byte("wrong password\n"), 0o600)
	s.ok("repo", "init", "--repo", repo, "--password-file", pw)
	s.ok("backup", "a", "--repo", repo, "--password-file", pw)
	for _, args := range [][]string{
		{"backup", "a"},
		{"verify"},
		{"images", "list"},
		{"restore", "latest", "--to", filepath.Join(dir, "restored.img")},
		{"prune", "--keep-last", "1"},
	} {
		expect(5, "wrong password", append(args, "--repo", repo, "--password-file", wrong)...)
	}
	if _, err := os.Stat(filepath.Join(dir, "restored.img")); err == nil {
		t.Fatal("a restore with a wrong password wrote its target")
	}

	// A chunk size the repository cannot take is refused before anything
	// is created.
	for _, c := range []string{"0", "3000", "8M", ""} {
		expect(2, "--chunk-size", "repo", "init", "--repo", filepath.Join(dir, "repo2"), "--chunk-size", c)
	}
	if _, err := os.Stat(filepath.Join(dir, "repo2")); err == nil {
		t.Fatal("a refused repo init created the repository")
	}
}

// TestServeChecksFlagsFirst: a bad value of any serve flag is refused
// (exit 2, naming it) before a volume, socket or state directory is
// opened or made.
func TestServeChecksFlagsFirst(t *testing.T) {
	dir := t.TempDir()
	img := testutil.SparseFile(t, filepath.Join(dir, "v.img"), 16<<20)
	for _, tc := range []struct {
		flags []string
		say   string
	}{
		{[]string{"--set-timeout", "xyz"}, "--set-timeout"},
		{[]string{"--set-timeout", "-5s"}, "--set-timeout"},
		{[]string{"--chunk-size", "0"}, "chunk size"},
		{[]string{"--chunk-size", "3000"}, "power of two"},
		{[]string{"--chunk-size", "2M"}, "power of two"},
		{[]string{"--max-storage", "1e3"}, "max storage"},
		{[]string{"--max-storage", ""}, "empty"},
		{[]string{"--policy", "sometimes"}, "policy"},
		{[]string{"--hold-priority", "high"}, "--hold-priority"},
	} {
		state := filepath.Join(dir, "state")
		args := append([]string{"serve", "--state-dir", state, "--nbd-socket", filepath.Join(dir, "nbd.sock"),
			"--api-socket", filepath.Join(dir, "api.sock"), "--volume", "v=" + img}, tc.flags...)
		// A flag wrongly accepted would leave the service running: the
		// context ends it and the test fails on its exit code.
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		cmd := exec.CommandContext(ctx, umbraBin, args...)
		out, err := cmd.CombinedOutput()
		cancel()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		if code != 2 || !strings.Contains(string(out), tc.say) {
			t.Fatalf("umbra serve %s: exit %d, want 2 saying %q\n%s", strings.Join(tc.flags, " "), code, tc.say, out)
		}
		for _, p := range []string{state, filepath.Join(dir, "nbd.sock"), filepath.Join(dir, "api.sock")} {
			if _, err := os.Stat(p); err == nil {
				t.Fatalf("umbra serve %s made %s before refusing", strings.Join(tc.flags, " "), p)
			}
		}
	}
}
