package nbd_test

import (
	"context"
	"testing"

	"umbra/internal/testutil"
	"umbra/provider"
)

// attachNBDFuse carries an export to a block device the way kernels
// without an nbd module can: nbdfuse makes it a file, a loop device makes
// the file a block device.
func attachNBDFuse(t *testing.T, uri, dir string, readOnly bool) string {
	t.Helper()
	return testutil.Losetup(t, testutil.NBDFuse(t, uri, dir, readOnly), readOnly, false)
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
