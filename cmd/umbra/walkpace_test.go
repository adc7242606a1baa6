package main

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"

	"umbra/backup"
)

// TestRepositoryWalksPaceCollector: verify, prune, images delete and
// stats walk the whole repository with a bounded live heap and much
// short-lived garbage, mount keeps bounded caches whose blobs turn over;
// each collects at half the live heap (GOGC 50) unless GOGC is set,
// which keeps their peak down (docs/benchmarks.md).
func TestRepositoryWalksPaceCollector(t *testing.T) {
	dir := t.TempDir()
	repo := filepath.Join(dir, "repo")
	r, err := backup.Init(repo)
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	out, err := os.Create(filepath.Join(dir, "stdout"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	stdout := os.Stdout
	os.Stdout = out
	defer func() { os.Stdout = stdout }()
	saved := gflags
	defer func() { gflags = saved }()
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	t.Setenv("UMBRA_PASSWORD", "")
	for _, args := range [][]string{
		{"verify"},
		{"prune", "--keep-last", "1"},
		{"images", "delete", strings.Repeat("a", 32)},
		{"stats"},
		{"mount", strings.Repeat("a", 32)}, // no such image: returns once paced
	} {
		t.Setenv("GOGC", "")
		debug.SetGCPercent(100)
		var stderr strings.Builder
		execute(append(args, "--repo", repo, "--json"), &stderr)
		if got := debug.SetGCPercent(100); got != 50 {
			t.Errorf("umbra %s: collects at %d %% of the live heap, want 50 (stderr %q)", strings.Join(args, " "), got, stderr.String())
		}
		t.Setenv("GOGC", "100")
		execute(append(args, "--repo", repo, "--json"), &stderr)
		if got := debug.SetGCPercent(100); got != 100 {
			t.Errorf("umbra %s with GOGC=100: collects at %d %%, want GOGC's 100", strings.Join(args, " "), got)
		}
	}
}
