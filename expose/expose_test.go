package expose_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"umbra/expose"
	"umbra/internal/testutil"
)

// mounted reports whether dir is a mount point.
func mounted(dir string) bool {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// loopsOf lists the loop devices attached to file.
func loopsOf(t *testing.T, file string) string {
	t.Helper()
	out, err := exec.Command("losetup", "-j", file).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup -j %s: %v %s", file, err, out)
	}
	return strings.TrimSpace(string(out))
}

// ext4Image makes a 32 MiB ext4 image holding hello.txt.
func ext4Image(t *testing.T, dir string) string {
	t.Helper()
	img := filepath.Join(dir, "fs.img")
	testutil.SparseFile(t, img, 32<<20)
	src := filepath.Join(dir, "src")
	os.Mkdir(src, 0o755)
	os.WriteFile(filepath.Join(src, "hello.txt"), []byte("shadow copy\n"), 0o644)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", "-d", src, img)
	return img
}

// TestMountFileReadOnly: an ext4 image is exposed read-only with the
// extra options asked for, its files read, nothing written; Unmount
// unmounts, detaches the loop device and removes the directory.
func TestMountFileReadOnly(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "blkid", "mkfs.ext4")
	dir := t.TempDir()
	img := ext4Image(t, dir)
	mnt := filepath.Join(dir, "exposed", "one")
	m, err := expose.MountFileWith(img, mnt, "nosuid", "nodev")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	if m.FSType != "ext4" || m.Dir != mnt || m.File != img || !expose.Carries(m.Device, img) || !mounted(mnt) {
		t.Fatalf("exposure %+v (carries %v, mounted %v)", m, expose.Carries(m.Device, img), mounted(mnt))
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "hello.txt")); err != nil || string(b) != "shadow copy\n" {
		t.Fatalf("hello.txt through the exposure: %q %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "new"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("a write into the exposure: %v, want EROFS", err)
	}
	info, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(info), "\n") {
		if f := strings.Fields(l); len(f) > 5 && f[4] == mnt && (!strings.Contains(f[5], "ro") || !strings.Contains(f[5], "nosuid") || !strings.Contains(f[5], "nodev")) {
			t.Fatalf("mount options %s, want ro,nosuid,nodev", f[5])
		}
	}
	if err := m.Unmount(); err != nil {
		t.Fatal(err)
	}
	if mounted(mnt) || loopsOf(t, img) != "" {
		t.Fatalf("after Unmount: mounted %v, loop devices %q", mounted(mnt), loopsOf(t, img))
	}
	if _, err := os.Stat(mnt); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the exposure's directory stays: %v", err)
	}
	if err := m.Unmount(); err != nil { // twice: nothing left to undo
		t.Fatalf("second Unmount: %v", err)
	}
}

// TestUnmountBusy: an exposure a process still uses is unmounted lazily
// (it is gone from the tree at once) and its loop device goes when the
// last user does.
func TestUnmountBusy(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "blkid", "mkfs.ext4")
	dir := t.TempDir()
	img := ext4Image(t, dir)
	m, err := expose.MountFile(img, filepath.Join(dir, "mnt"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	f, err := os.Open(filepath.Join(m.Dir, "hello.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(); err != nil {
		f.Close()
		t.Fatalf("Unmount of a busy exposure: %v", err)
	}
	if mounted(m.Dir) {
		t.Fatal("a busy exposure is still in the tree after Unmount")
	}
	f.Close()
	testutil.WaitFor(t, "the loop device goes with the last user", func() bool { return loopsOf(t, img) == "" })
}

// TestNoFilesystem: a file with no filesystem, or one that cannot be
// mounted, is refused by name and leaves no loop device behind.
func TestNoFilesystem(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "blkid", "mkswap")
	dir := t.TempDir()
	zeros := testutil.SparseFile(t, filepath.Join(dir, "zeros.img"), 8<<20)
	swap := testutil.SparseFile(t, filepath.Join(dir, "swap.img"), 8<<20)
	testutil.Run(t, "mkswap", swap)
	for _, c := range []struct{ file, want string }{
		{zeros, "blkid finds no filesystem"},
		{swap, "swap is not supported"},
	} {
		m, err := expose.MountFile(c.file, filepath.Join(dir, "mnt"))
		if err == nil {
			m.Unmount()
		}
		if !errors.Is(err, expose.ErrNoFilesystem) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "NBD") {
			t.Fatalf("expose %s: %v, want ErrNoFilesystem saying %q and what to do", c.file, err, c.want)
		}
		if l := loopsOf(t, c.file); l != "" {
			t.Fatalf("a refused exposure left %s", l)
		}
	}
}
