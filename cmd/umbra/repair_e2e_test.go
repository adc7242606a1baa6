package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"umbra/backup"
)

// cli runs the CLI without a service and returns stdout, stderr and the
// exit code.
func cli(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	return cliEnv(t, nil, args...)
}

// TestCLIRepoRepair: verify on a repository with a damaged index points
// to `umbra repo repair`; its dry run changes nothing, says so in
// --json, and repair leaves a repository verify finds whole.
func TestCLIRepoRepair(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "repo")
	repo, err := backup.Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(99, 100))
	for _, v := range []string{"a", "b"} {
		data := make([]byte, 256<<10)
		for i := range data {
			data[i] = byte(rng.IntN(4)) // compressible, not zero
		}
		if _, _, err := repo.Backup(ctx, bytes.NewReader(data), backup.Options{Volume: v}); err != nil {
			t.Fatal(err)
		}
	}
	repo.Close()
	idx, _ := filepath.Glob(filepath.Join(dir, "index", "*"))
	b, _ := os.ReadFile(idx[0])
	os.WriteFile(idx[0], b[:len(b)/2], 0o600)

	if _, stderr, code := cli(t, "verify", "--repo", dir); code != 1 || !strings.Contains(stderr, "umbra repo repair") {
		t.Fatalf("verify with a damaged index: exit %d %s; want 1 and advice to run repo repair", code, stderr)
	}
	stdout, stderr, code := cli(t, "repo", "repair", "--repo", dir, "--dry-run", "--json")
	var rep backup.RepairReport
	if code != 0 || json.Unmarshal([]byte(stdout), &rep) != nil || !rep.DryRun || len(rep.IndexesReplaced) != len(idx) || len(rep.BrokenImages) != 0 {
		t.Fatalf("repo repair --dry-run --json: exit %d %s %s", code, stdout, stderr)
	}
	if after, _ := os.ReadFile(idx[0]); len(after) != len(b)/2 {
		t.Fatal("repo repair --dry-run changed the damaged index")
	}
	if stdout, stderr, code := cli(t, "repo", "repair", "--repo", dir); code != 0 || !strings.Contains(stdout, "replaces 2 index objects") {
		t.Fatalf("repo repair: exit %d %s %s", code, stdout, stderr)
	}
	if stdout, stderr, code := cli(t, "verify", "--repo", dir); code != 0 || !strings.Contains(stdout, "2 images good") {
		t.Fatalf("verify after repair: exit %d %s %s", code, stdout, stderr)
	}
}
