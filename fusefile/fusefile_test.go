package fusefile_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"umbra/cow"
	"umbra/frontend"
	"umbra/fusefile"
	"umbra/internal/testutil"
	"umbra/provider"
)

// mounted serves one COW volume through a FUSE directory.
func mounted(t *testing.T, size int64) (dir string, v *cow.Volume, mnt string) {
	t.Helper()
	testutil.NeedRoot(t)
	testutil.NeedFUSE(t)
	dir = t.TempDir()
	origin := filepath.Join(dir, "vol.img")
	testutil.SparseFile(t, origin, size)
	v, err := cow.Open("vol", origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	p := cow.NewProvider()
	p.Add(v)
	mnt = filepath.Join(dir, "fuse")
	os.Mkdir(mnt, 0o755)
	srv, err := fusefile.Mount(mnt, frontend.FUSESource(p), fusefile.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
		v.Close()
	})
	return dir, v, mnt
}

func TestFileSemantics(t *testing.T) {
	_, v, mnt := mounted(t, 8<<20)
	f, err := os.OpenFile(filepath.Join(mnt, "vol"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if fi, _ := f.Stat(); fi.Size() != 8<<20 {
		t.Fatalf("size %d", fi.Size())
	}
	f.WriteAt(bytes.Repeat([]byte{7}, 8192), 0)
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	// Punch a hole through FUSE: it reaches the engine, the snapshot keeps its view.
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); err != nil {
		t.Fatalf("punch: %v", err)
	}
	got := make([]byte, 4096)
	v.ReadAt(got, 0)
	if !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("punched range does not read zeros")
	}
	// Zero a range through FUSE: the volume's zero write (one call over
	// the range), the snapshot keeps its view there too.
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 4096, 4096); err != nil {
		t.Fatalf("zero range: %v", err)
	}
	v.ReadAt(got, 4096)
	if !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("zeroed range does not read zeros")
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 8<<20-4096, 8192); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("zero range past the end: %v, want EINVAL", err)
	}
	if err := f.Truncate(1 << 20); err == nil {
		t.Fatal("truncate to another size succeeded")
	}
	s, err := os.OpenFile(filepath.Join(mnt, "vol@s"), os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.ReadAt(got, 0)
	if !bytes.Equal(got, bytes.Repeat([]byte{7}, 4096)) {
		t.Fatal("snapshot file does not read its commit point")
	}
	s.ReadAt(got, 4096)
	if !bytes.Equal(got, bytes.Repeat([]byte{7}, 4096)) {
		t.Fatal("snapshot file does not read its commit point where the volume was zeroed")
	}
	if _, err := os.OpenFile(filepath.Join(mnt, "vol@s"), os.O_RDWR, 0); err == nil || !errorsIs(err, syscall.EROFS) {
		t.Fatalf("opening a snapshot for writing: %v, want EROFS", err)
	}
	ents, _ := os.ReadDir(mnt)
	if len(ents) != 2 {
		t.Fatalf("directory lists %d files, want vol and vol@s", len(ents))
	}
}

func errorsIs(err error, e syscall.Errno) bool {
	pe, ok := err.(*os.PathError)
	return ok && pe.Err == e
}

// TestLoopFrozenSnapshot: ext4 on a loop device (direct I/O) over the
// FUSE file of an Umbra volume; snapshot under fsfreeze while a writer
// writes; the snapshot's file on a second loop device passes e2fsck -fn
// and holds every file written before the freeze.
func TestLoopFrozenSnapshot(t *testing.T) {
	testutil.Need(t, "losetup", "mkfs.ext4")
	dir, v, mnt := mounted(t, 256<<20)
	dev := testutil.Losetup(t, filepath.Join(mnt, "vol"), false, true)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	fsdir := testutil.Mount(t, dev, dir)
	n := testutil.FrozenSnapshot(t, fsdir, dir,
		func() error {
			_, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "frozen"})
			return err
		},
		func() string { return testutil.Losetup(t, filepath.Join(mnt, "vol@frozen"), true, true) })
	t.Logf("%d files written before the freeze are in the snapshot; e2fsck clean", n)
}

// TestLoopAsyncDirectIO: with asynchronous direct I/O negotiated, a loop
// device in direct-I/O mode hands the FUSE file many requests at once;
// fio writes 4 KiB blocks at random at queue depth 32 through it, under a
// live snapshot, and verifies every block, and the snapshot still reads
// the volume as it was (all zeros) when it was taken.
func TestLoopAsyncDirectIO(t *testing.T) {
	testutil.Need(t, "losetup", "fio")
	const size = 64 << 20
	_, v, mnt := mounted(t, size)
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "before"}); err != nil {
		t.Fatal(err)
	}
	dev := testutil.Losetup(t, filepath.Join(mnt, "vol"), false, true)
	testutil.Run(t, "fio", "--name=aio", "--filename="+dev, "--ioengine=libaio", "--direct=1", "--rw=randwrite",
		"--bs=4k", "--iodepth=32", "--size=32M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
		"--verify_state_save=0") // no state file left in the package directory
	s, err := v.OpenSnapshot("before")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := s.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, size)) {
		t.Fatal("the snapshot changed under asynchronous direct writes")
	}
}
