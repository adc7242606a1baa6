package backup_test

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"umbra/backup"
	"umbra/internal/testutil"
)

// TestRestoreTargets: a restore onto a block device writes every chunk,
// zeros included (a device has no holes), and nothing past the image;
// it refuses, before writing, a device smaller than the image or one in
// use (mounted), and a target that is neither a file nor a block device.
func TestRestoreTargets(t *testing.T) {
	dir := t.TempDir()
	repo, err := backup.Init(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	src := volumeData(rand.New(rand.NewPCG(71, 72)), 2<<20)
	x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})

	if err := repo.Restore(x.ID, "/dev/null", nil); err == nil || !strings.Contains(err.Error(), "not a regular file or block device") {
		t.Fatalf("restore to /dev/null: %v", err)
	}
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.ext4", "mount")
	backing := func(name string, size int) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, bytes.Repeat([]byte{0xff}, size), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}

	big := backing("big.img", 4<<20)
	dev := testutil.Losetup(t, big, false, false)
	if err := repo.Restore(x.ID, dev, nil); err != nil {
		t.Fatalf("restore to %s: %v", dev, err)
	}
	got, _ := os.ReadFile(big)
	if !bytes.Equal(got[:len(src)], src) {
		t.Fatal("the device does not hold the image (zero chunks must be written on a device)")
	}
	if !bytes.Equal(got[len(src):], bytes.Repeat([]byte{0xff}, len(got)-len(src))) {
		t.Fatal("the restore wrote past the image's end")
	}

	small := backing("small.img", 1<<20)
	dev = testutil.Losetup(t, small, false, false)
	if err := repo.Restore(x.ID, dev, nil); err == nil || !strings.Contains(err.Error(), "at least as large") {
		t.Fatalf("restore to a smaller device: %v", err)
	}
	if got, _ := os.ReadFile(small); !bytes.Equal(got, bytes.Repeat([]byte{0xff}, 1<<20)) {
		t.Fatal("a refused restore wrote to the device")
	}

	fsimg := backing("fs.img", 8<<20)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", fsimg)
	dev = testutil.Losetup(t, fsimg, false, false)
	testutil.Mount(t, dev, dir)
	testutil.Run(t, "sync")
	before, _ := os.ReadFile(fsimg)
	if err := repo.Restore(x.ID, dev, nil); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("restore to a mounted device: %v", err)
	}
	testutil.Run(t, "sync")
	if after, _ := os.ReadFile(fsimg); !bytes.Equal(before, after) {
		t.Fatal("a refused restore wrote to the mounted filesystem")
	}
}

// TestRestoreTargetFull: a restore onto a file whose filesystem fills up
// (a 1 MiB tmpfs, the image 12 MiB over several list segments) fails
// with the write's error and where it happened, removes the partial file
// it created, and leaves the repository able to restore the image.
func TestRestoreTargetFull(t *testing.T) {
	testutil.NeedRoot(t)
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(512))
	dir := t.TempDir()
	repo, err := backup.Init(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	src := volumeData(rand.New(rand.NewPCG(73, 74)), 12<<20)
	x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})

	small := filepath.Join(dir, "small")
	os.Mkdir(small, 0o700)
	testutil.Run(t, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small)
	defer testutil.Run(t, "umount", small)
	out := filepath.Join(small, "out.img")
	var last int64
	err = repo.Restore(x.ID, out, func(done, total int64) { last = done })
	if err == nil || !strings.Contains(err.Error(), "no space left") || !strings.Contains(err.Error(), out+" at ") {
		t.Fatalf("restore onto a full filesystem: %v", err)
	}
	if !strings.Contains(err.Error(), "partial file "+out+" was removed") {
		t.Fatalf("the error does not say the partial file was removed: %v", err)
	}
	if _, serr := os.Stat(out); serr == nil {
		t.Fatal("the partial file is still there")
	}
	if last >= x.Size {
		t.Fatalf("progress reached %d of %d bytes for a restore that failed", last, x.Size)
	}
	backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
}
