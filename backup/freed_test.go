package backup_test

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"umbra/backup"
)

// packBytes is the size of every pack of the local repository at dir.
func packBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	filepath.Walk(filepath.Join(dir, "packs"), func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// TestPruneReportsFreedBytes: the bytes prune and images delete say they
// freed are what the repository's packs shrank by — packs deleted whole,
// packs rewritten, and packs no index named (a backup that died before
// its index).
func TestPruneReportsFreedBytes(t *testing.T) {
	ctx := context.Background()
	defer backup.SetSmallPacks(64<<10, 1)()
	repo, dir := newRepo(t)
	rng := rand.New(rand.NewPCG(81, 82))
	var ids []string
	var firstIndexes []string
	for k := range 3 {
		ids = append(ids, backupAndRestore(t, repo, volumeData(rng, 1<<20), backup.Options{Volume: "v"}).ID)
		if k == 0 {
			firstIndexes = backup.ObjectNames(repo, "index/")
		}
	}
	// The first image's packs named by no index, as a backup that died
	// before writing its index leaves them (an S3 outage).
	repo.Close()
	for _, n := range firstIndexes {
		os.Remove(filepath.Join(dir, filepath.FromSlash(n)))
	}
	repo, err := backup.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	before := packBytes(t, dir)
	rep, err := repo.Prune(ctx, backup.Policy{Last: 2}, false)
	if err != nil || len(rep.Removed) != 1 || rep.PacksDeleted == 0 {
		t.Fatalf("prune: %+v %v", rep, err)
	}
	after := packBytes(t, dir)
	if rep.BytesFreed != before-after || rep.BytesFreed <= 0 {
		t.Fatalf("prune freed %d bytes of packs (%d packs deleted); it says %d", before-after, rep.PacksDeleted, rep.BytesFreed)
	}
	before = after
	rep, err = repo.Delete(ctx, ids[1:2])
	if err != nil || rep.PacksDeleted == 0 {
		t.Fatalf("images delete: %+v %v", rep, err)
	}
	after = packBytes(t, dir)
	if rep.BytesFreed != before-after || rep.BytesFreed <= 0 {
		t.Fatalf("images delete freed %d bytes of packs (%d packs deleted); it says %d", before-after, rep.PacksDeleted, rep.BytesFreed)
	}
}
