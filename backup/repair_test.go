package backup_test

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"

	"umbra/backup"
)

// TestRepair damages a repository four ways — a flipped bit in the
// trailer of one image's pack (its index intact), a flipped bit in a blob
// of another image's pack, a truncated index object, a flipped bit in a
// third image's record — and checks that repair's dry run changes
// nothing and says what repair then does: the damaged packs' readable
// chunks rewritten and the packs deleted, one new index, the damaged
// record removed, and exactly the image whose chunk is lost named
// broken. Afterwards verify finds nothing but that image, the first one
// restores, and with every index lost prune re-indexes the rewritten
// pack from its trailer.
func TestRepair(t *testing.T) {
	ctx := context.Background()
	defer backup.SetSmallPacks(32<<10, 1)()
	defer backup.SetGroupRaw(16 << 10)()
	repo, dir := newRepo(t)
	rng := rand.New(rand.NewPCG(97, 98))
	srcs := map[string]memSource{}
	ids := map[string]string{}
	var cIndexes []string
	for _, v := range []string{"a", "b", "c"} {
		before := backup.ObjectNames(repo, "index/")
		srcs[v] = volumeData(rng, 256<<10)
		ids[v] = backupAndRestore(t, repo, srcs[v], backup.Options{Volume: v}).ID
		for _, n := range backup.ObjectNames(repo, "index/") {
			if !slices.Contains(before, n) && v == "c" {
				cIndexes = append(cIndexes, n)
			}
		}
	}
	chunkOf := func(v string) backup.Hash {
		x, err := repo.Image(ids[v])
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range x.Chunks {
			if h != (backup.Hash{}) {
				return h
			}
		}
		t.Fatalf("image %s has no data", v)
		return backup.Hash{}
	}
	flip := func(name string, off int64) {
		p := filepath.Join(dir, filepath.FromSlash(name))
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if off < 0 {
			off += int64(len(b))
		}
		b[off] ^= 0x08
		os.WriteFile(p, b, 0o600)
	}
	packA, _, _ := backup.BlobLocation(repo, chunkOf("a"))
	flip(packA, -12) // the trailer's last entry
	packB, offB, nB := backup.BlobLocation(repo, chunkOf("b"))
	flip(packB, offB+nB/2)
	flip("images/"+ids["c"], 40)
	p := filepath.Join(dir, filepath.FromSlash(cIndexes[0]))
	b, _ := os.ReadFile(p)
	os.WriteFile(p, b[:len(b)/2], 0o600)

	repo.Close()
	repo, err := backup.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	all := func() []string {
		var out []string
		for _, prefix := range []string{"packs/", "index/", "images/", "segments/"} {
			out = append(out, backup.ObjectNames(repo, prefix)...)
		}
		return out
	}
	objects := all()
	dry, err := repo.Repair(ctx, true)
	if err != nil {
		t.Fatalf("repair --dry-run: %v", err)
	}
	if !slices.Equal(all(), objects) {
		t.Fatal("repair --dry-run changed the repository")
	}
	rep, err := repo.Repair(ctx, false)
	if err != nil {
		t.Fatalf("repair: %v", err)
	}
	rep.DryRun = true
	if !equalReports(dry, rep) {
		t.Fatalf("the dry run said %+v, repair did %+v", dry, rep)
	}
	if len(rep.DamagedPacks) != 2 || rep.PacksWritten == 0 || !slices.Equal(rep.BrokenImages, []string{ids["b"]}) ||
		!slices.Equal(rep.RemovedRecords, []string{ids["c"]}) || rep.LostChunks == 0 {
		t.Fatalf("repair: %+v", rep)
	}
	// (A pack whose every chunk reads may be rewritten byte for byte as
	// it was: then it is there again, whole.)
	if slices.Contains(backup.ObjectNames(repo, "packs/"), packB) {
		t.Fatalf("damaged pack %s still there", packB)
	}
	vr := repo.Verify()
	if vr.GoodImages != 1 || !slices.Equal(vr.BadImages, []string{ids["b"]}) || len(vr.BadIndexes)+len(vr.BadPacks) > 0 {
		t.Fatalf("verify after repair: %+v", vr)
	}
	backupAndRestoreCheck(t, repo, ids["a"], srcs["a"])

	// Every index lost: the rewritten pack's trailer reads.
	repo.Close()
	for _, n := range backup.ObjectNames(repo, "index/") {
		os.Remove(filepath.Join(dir, filepath.FromSlash(n)))
	}
	repo, err = backup.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	if pr, err := repo.Prune(ctx, backup.Policy{Last: 10}, false); err != nil || pr.Recovered == 0 {
		t.Fatalf("prune with every index lost: %+v %v", pr, err)
	}
	backupAndRestoreCheck(t, repo, ids["a"], srcs["a"])
}

func equalReports(a, b backup.RepairReport) bool {
	return a.DryRun == b.DryRun && a.Packs == b.Packs && a.Chunks == b.Chunks && slices.Equal(a.DamagedPacks, b.DamagedPacks) &&
		a.LostChunks == b.LostChunks && slices.Equal(a.IndexesReplaced, b.IndexesReplaced) &&
		slices.Equal(a.RemovedRecords, b.RemovedRecords) && slices.Equal(a.BrokenImages, b.BrokenImages)
}

// backupAndRestoreCheck restores image id and compares it with src.
func backupAndRestoreCheck(t *testing.T, repo *backup.Repo, id string, src memSource) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.img")
	if err := repo.Restore(id, out, nil); err != nil {
		t.Fatalf("restore %s: %v", id, err)
	}
	got, _ := os.ReadFile(out)
	if !slices.Equal(got, []byte(src)) {
		t.Fatalf("image %s does not restore byte-identical", id)
	}
}

// TestRepairMemoryBounded: repair --dry-run of a repository whose index
// names 256 Ki chunks (in packs that are gone, so all of them are lost)
// allocates a few MiB in all, not a copy of the index per pack and a
// map of the chunks (~30 MiB here, ~400 MiB at 1 Mi chunks).
func TestRepairMemoryBounded(t *testing.T) {
	ctx := context.Background()
	const n = 256 << 10
	repo, dir := newRepo(t)
	if err := backup.WriteFakeIndex(repo, n, 128<<10, 7); err != nil {
		t.Fatal(err)
	}
	repo.Close()
	repo, err := backup.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	rep, err := repo.Repair(ctx, true)
	runtime.ReadMemStats(&after)
	if err != nil || rep.LostChunks != n || rep.Chunks != 0 {
		t.Fatalf("repair --dry-run of an index whose packs are gone: %+v, %v; want %d chunks lost", rep, err, n)
	}
	if mib := float64(after.TotalAlloc-before.TotalAlloc) / (1 << 20); mib > 8 {
		t.Fatalf("repair --dry-run of %d indexed chunks allocated %.1f MiB, want under 8 MiB whatever the chunks", n, mib)
	}
}
