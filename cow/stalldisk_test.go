package cow

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"umbra/internal/testutil"
)

// stallDisk is an ext4 filesystem whose disk the test can stall: a loop
// device over a file this test process serves through FUSE (with direct
// I/O, so every read of the loop device reaches the server). While
// stalled, reads of the disk wait until the stall ends, so "what is not
// in the page cache would wait for the disk" is a fact the test makes,
// not a race against readahead.
type stallDisk struct {
	dir string // the mounted filesystem

	mu      sync.Mutex    // guards stalled
	stalled chan struct{} // nil: reads pass; closed when the stall ends
}

// newStallDisk makes a 64 MiB stallDisk (root, losetup, mkfs.ext4, FUSE;
// it skips the test otherwise) and takes it all down at cleanup.
func newStallDisk(t *testing.T) *stallDisk {
	t.Helper()
	testutil.NeedRoot(t)
	testutil.NeedFUSE(t)
	testutil.Need(t, "losetup", "mkfs.ext4")
	dir := t.TempDir()
	backing, err := os.Create(filepath.Join(dir, "backing.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { backing.Close() })
	if err := backing.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	d := &stallDisk{}
	fuseDir := filepath.Join(dir, "fuse")
	os.Mkdir(fuseDir, 0o755)
	srv, err := fs.Mount(fuseDir, &stallRoot{d: d, f: backing}, &fs.Options{})
	if err != nil {
		t.Skipf("FUSE mount: %v", err)
	}
	t.Cleanup(func() { d.resume(); srv.Unmount() })
	dev := testutil.Losetup(t, filepath.Join(fuseDir, "disk"), false, false)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	d.dir = testutil.Mount(t, dev, dir)
	return d
}

// stall makes reads of the disk wait until resume.
func (d *stallDisk) stall() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stalled == nil {
		d.stalled = make(chan struct{})
	}
}

// resume lets the reads that wait, and those to come, go on.
func (d *stallDisk) resume() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stalled != nil {
		close(d.stalled)
		d.stalled = nil
	}
}

type stallRoot struct {
	fs.Inode
	d *stallDisk
	f *os.File
}

func (r *stallRoot) OnAdd(ctx context.Context) {
	r.AddChild("disk", r.NewPersistentInode(ctx, &stallFile{d: r.d, f: r.f}, fs.StableAttr{Mode: syscall.S_IFREG}), false)
}

type stallFile struct {
	fs.Inode
	d *stallDisk
	f *os.File
}

func (f *stallFile) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	st, err := f.f.Stat()
	if err != nil {
		return fs.ToErrno(err)
	}
	out.Mode = 0o600
	out.Size = uint64(st.Size())
	return 0
}

func (f *stallFile) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (f *stallFile) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	f.d.mu.Lock()
	ch := f.d.stalled
	f.d.mu.Unlock()
	if ch != nil {
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, syscall.EINTR
		}
	}
	n, err := f.f.ReadAt(dest, off)
	if err != nil && n == 0 {
		return fuse.ReadResultData(nil), 0
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (f *stallFile) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	n, err := f.f.WriteAt(data, off)
	return uint32(n), fs.ToErrno(err)
}

func (f *stallFile) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	return fs.ToErrno(f.f.Sync())
}
