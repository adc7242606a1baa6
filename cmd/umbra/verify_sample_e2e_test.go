package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"umbra/backup"
)

// TestCLIVerifySample: `umbra verify --sample F --seed S --json` finds a
// flipped bit when the seed picks the damaged chunk, finds nothing when
// it picks none, and refuses a fraction out of range.
func TestCLIVerifySample(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "repo")
	repo, err := backup.Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(81, 82))
	var ids []string
	for _, v := range []string{"a", "b"} {
		data := make([]byte, 256<<10)
		for i := range data {
			data[i] = byte(rng.IntN(4))
		}
		x, _, err := repo.Backup(ctx, bytes.NewReader(data), backup.Options{Volume: v})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, x.ID)
	}
	// A bit in the middle of the largest pack: inside a blob.
	packs, _ := filepath.Glob(filepath.Join(dir, "packs", "*", "*"))
	slices.SortFunc(packs, func(a, b string) int {
		fa, _ := os.Stat(a)
		fb, _ := os.Stat(b)
		return int(fb.Size() - fa.Size())
	})
	if len(packs) == 0 {
		t.Fatal("no pack in the repository")
	}
	raw, _ := os.ReadFile(packs[0])
	raw[len(raw)/3] ^= 0x10
	os.WriteFile(packs[0], raw, 0o600)
	full := repo.Verify()
	if len(full.BadChunks) == 0 {
		t.Fatal("the flipped bit damaged no chunk")
	}
	used := map[backup.Hash]bool{}
	for _, id := range ids {
		y, _ := repo.Image(id)
		for _, h := range y.Chunks {
			used[h] = true
		}
	}
	var bad, intact []backup.Hash
	for h := range used {
		if slices.Contains(full.BadChunks, h.String()) {
			bad = append(bad, h)
		} else {
			intact = append(intact, h)
		}
	}
	repo.Close()
	var hit, miss uint64
	for seed := uint64(1); seed < 100000 && (hit == 0 || miss == 0); seed++ {
		o := backup.VerifyOptions{Sample: 0.5, Seed: seed}
		if slices.ContainsFunc(bad, o.Picks) {
			if hit == 0 {
				hit = seed
			}
		} else if miss == 0 && slices.ContainsFunc(intact, o.Picks) {
			miss = seed
		}
	}
	if hit == 0 || miss == 0 {
		t.Fatalf("no seeds: hit %d miss %d (%d chunks, %d bad)", hit, miss, len(used), len(bad))
	}

	stdout, stderr, code := cli(t, "verify", "--repo", dir, "--sample", "0.5", "--seed", fmt.Sprint(hit), "--json")
	var rep backup.VerifyReport
	if code != 1 || json.Unmarshal([]byte(stdout), &rep) != nil || rep.Seed != hit || rep.Sample != 0.5 ||
		len(rep.BadChunks) == 0 || len(rep.BadImages) == 0 {
		t.Fatalf("verify --sample with a seed that picks the damage: exit %d\n%s\n%s", code, stdout, stderr)
	}
	stdout, stderr, code = cli(t, "verify", "--repo", dir, "--sample", "0.5", "--seed", fmt.Sprint(miss))
	if code != 0 || !strings.Contains(stdout, fmt.Sprintf("seed %d", miss)) || !strings.Contains(stdout, "2 images good") {
		t.Fatalf("verify --sample with a seed that misses the damage: exit %d\n%s\n%s", code, stdout, stderr)
	}
	if _, stderr, code := cli(t, "verify", "--repo", dir); code != 1 {
		t.Fatalf("full verify: exit %d %s", code, stderr)
	}
	for _, bad := range [][]string{{"--sample", "0"}, {"--sample", "1.5"}, {"--seed", "3"}} {
		stdout, stderr, code := cli(t, append([]string{"verify", "--repo", dir, "--json"}, bad...)...)
		if code != 2 || !strings.Contains(stdout+stderr, "--s") {
			t.Fatalf("verify %v: exit %d %s %s; want 2 naming the flag", bad, code, stdout, stderr)
		}
	}
}
