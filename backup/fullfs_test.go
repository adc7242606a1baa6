package backup_test

import (
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"umbra/backup"
	"umbra/internal/testutil"
)

// fill writes a file in dir until its filesystem is full.
func fill(t *testing.T, dir, name string) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			return
		}
	}
}

// TestFullFilesystemFreesSpace: on a full filesystem, images delete and
// prune still take their lock (an empty lock object naming its holder,
// which needs no data block) and free space; before, the lock's write
// failed and nothing could be freed with Umbra.
func TestFullFilesystemFreesSpace(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "mount", "umount")
	ctx := context.Background()
	mnt := t.TempDir()
	testutil.Run(t, "mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	dir := filepath.Join(mnt, "repo")
	repo, err := backup.Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	rng := rand.New(rand.NewPCG(95, 96))
	var ids []string
	for range 3 {
		x, _, err := repo.Backup(ctx, volumeData(rng, 512<<10), backup.Options{Volume: "v"})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, x.ID)
	}
	fill(t, mnt, "filler1")
	if _, err := repo.Lock(ctx, "probe", false); err == nil {
		t.Fatal("a shared lock on a full filesystem: want the write to fail (the test's filesystem is not full)")
	}
	rep, err := repo.Delete(ctx, ids[:1])
	if err != nil || rep.BytesFreed <= 0 {
		t.Fatalf("images delete on a full filesystem: %+v %v", rep, err)
	}
	fill(t, mnt, "filler2")
	rep, err = repo.Prune(ctx, backup.Policy{Last: 1}, false)
	if err != nil || len(rep.Removed) != 1 || rep.BytesFreed <= 0 {
		t.Fatalf("prune on a full filesystem: %+v %v", rep, err)
	}
	if n := backup.ObjectNames(repo, "locks/"); len(n) != 0 {
		t.Fatalf("locks left: %v", n)
	}
	if rep := repo.Verify(); rep.GoodImages != 1 || len(rep.BadImages)+len(rep.BadPacks)+len(rep.BadIndexes) > 0 {
		t.Fatalf("verify after freeing space: %+v", rep)
	}
}
