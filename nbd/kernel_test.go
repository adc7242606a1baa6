package nbd_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"umbra/internal/testutil"
	"umbra/provider"
)

// attachNBDFuse carries an export to a block device the way kernels
// without an nbd module can: nbdfuse makes it a file, a loop device makes
// the file a block device. It returns the device; cleanup detaches in
// order.
func attachNBDFuse(t *testing.T, uri, dir string, readOnly bool) string {
	t.Helper()
	mnt := filepath.Join(dir, fmt.Sprintf("fuse%d", time.Now().UnixNano()))
	os.Mkdir(mnt, 0o755)
	args := []string{mnt, uri}
	if readOnly {
		args = append([]string{"-r"}, args...)
	}
	cmd := exec.Command("nbdfuse", args...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("nbdfuse: %v", err)
	}
	file := filepath.Join(mnt, "nbd")
	for i := 0; ; i++ {
		if _, err := os.Stat(file); err == nil {
			break
		}
		if i > 100 {
			cmd.Process.Kill()
			t.Fatalf("nbdfuse did not create %s", file)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() {
		exec.Command("fusermount3", "-u", mnt).Run()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	return testutil.Losetup(t, file, readOnly, false)
}

// TestKernelPathFrozenSnapshot: ext4 on loop over nbdfuse over an Umbra
// volume; a writer keeps writing while the filesystem is frozen and a
// snapshot committed; the snapshot, carried the same way, passes
// e2fsck -fn and holds every file written before the freeze.
func TestKernelPathFrozenSnapshot(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "nbdfuse", "losetup", "mkfs.ext4", "fusermount3")
	s := serve(t, 256<<20)
	dev := attachNBDFuse(t, s.uri("vol"), s.dir, false)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	fsdir := testutil.Mount(t, dev, s.dir)
	n := testutil.FrozenSnapshot(t, fsdir, s.dir,
		func() error {
			_, err := s.vol.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "frozen"})
			return err
		},
		func() string { return attachNBDFuse(t, s.uri("vol@frozen"), s.dir, true) })
	t.Logf("%d files written before the freeze are in the snapshot; e2fsck clean", n)
}
