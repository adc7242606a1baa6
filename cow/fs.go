package cow

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"umbra/internal/owner"
)

// File is what the engine needs of an open file. The OS implementation is
// used in production; tests substitute a fault-injecting one that loses
// writes not yet synced when it "loses power".
type File interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
	Truncate(size int64) error
	Close() error
	// Size is the file's size, or a block device's capacity.
	Size() (int64, error)
	// Punch deallocates [off, off+length) so it reads as zeros, keeping the
	// size. Files that cannot punch return an error; callers fall back.
	Punch(off, length int64) error
}

// FS opens files and changes directories. See File.
type FS interface {
	OpenFile(name string, flag int, perm os.FileMode) (File, error)
	Remove(name string) error
	Rename(oldpath, newpath string) error
	MkdirAll(path string, perm os.FileMode) error
	// SyncDir makes a rename or create in dir durable.
	SyncDir(dir string) error
	Stat(name string) (os.FileInfo, error)
}

// OSFS is the real filesystem.
type OSFS struct{}

// claimer is an FS whose files and directories can be claimed for this
// process (DESIGN invariant 10; OSFS does it with internal/owner). A
// test's in-memory FS claims nothing.
type claimer interface {
	claimFile(f File, what, path, hint string) error
	claimDir(dir, what, hint string) (*owner.Dir, error)
}

func (OSFS) claimFile(f File, what, path, hint string) error {
	of, ok := f.(osFile)
	if !ok {
		return nil
	}
	return owner.Claim(of.File, what, path, hint)
}

func (OSFS) claimDir(dir, what, hint string) (*owner.Dir, error) {
	return owner.ClaimDir(dir, what, hint)
}

type osFile struct {
	*os.File
	nowait *atomic.Int32 // how ReadAtNoWait reads: a nowait* constant
	// holes: a file in memory may have holes (see cached); checks counts
	// the checks made while it may, to look again now and then.
	holes  *atomic.Bool
	checks *atomic.Int64
}

const (
	nowaitFlag        = iota // preadv2 with RWF_NOWAIT
	nowaitMemory             // tmpfs or ramfs: a read never waits for a disk
	nowaitUnsupported        // neither: every no-wait read says it would wait
)

func (OSFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	of := osFile{File: f, nowait: new(atomic.Int32), holes: new(atomic.Bool), checks: new(atomic.Int64)}
	if inMemory(f) {
		of.nowait.Store(nowaitMemory)
		of.holes.Store(!of.dense())
	}
	return of, nil
}

// inMemory reports whether f is a regular file on tmpfs or ramfs. (A
// device node in /dev is on devtmpfs, which statfs also calls tmpfs, but
// its data is the device's.)
func inMemory(f *os.File) bool {
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return false
	}
	var st unix.Statfs_t
	return unix.Fstatfs(int(f.Fd()), &st) == nil && (st.Type == unix.TMPFS_MAGIC || st.Type == unix.RAMFS_MAGIC)
}

// NoWaitReader is a File that can read without waiting for a disk:
// ReadAtNoWait fills p from the page cache, or returns ok false (and
// nothing to use) when some of it would have to come from the disk.
type NoWaitReader interface {
	ReadAtNoWait(p []byte, off int64) (n int, ok bool, err error)
}

// cached reports whether [off, off+n) is all in memory, by cachestat(2)
// (Linux 6.5 and later; false without it). A file in RAM always is,
// except for its holes: a page fault on a hole of a shared tmpfs mapping
// allocates the page, so a reader lent a mapping over a sparse range
// (MappedRange: an NBD read of a volume never written) would fill the
// filesystem, and the machine's memory, with zeros. So a file in RAM
// that may have holes (fewer blocks than its size at open, or punched
// since) is asked too; one without is not, a system call saved on every
// read. While it may have holes, every holeRecheck-th check looks at
// whether it still has (writes fill them in).
func (f osFile) cached(off, n int64) bool {
	if f.nowait.Load() == nowaitMemory {
		if !f.holes.Load() {
			return true
		}
		if f.checks.Add(1)%holeRecheck == 0 && f.dense() {
			f.holes.Store(false)
			return true
		}
	}
	const page = 4096
	first, end := off&^(page-1), (off+n+page-1)&^(page-1)
	var cs unix.Cachestat_t
	r := unix.CachestatRange{Off: uint64(first), Len: uint64(end - first)}
	if unix.Cachestat(uint(f.Fd()), &r, &cs, 0) != nil {
		return false
	}
	return cs.Cache >= uint64((end-first)/page)
}

// ReadAtNoWait uses preadv2(RWF_NOWAIT) where the filesystem supports it
// (ext4, xfs, btrfs, block devices); files in memory (tmpfs, ramfs,
// which refuse the flag) are read plainly, since they never wait for a
// disk; elsewhere it always says it would wait.
func (f osFile) ReadAtNoWait(p []byte, off int64) (int, bool, error) {
	switch f.nowait.Load() {
	case nowaitMemory:
		n, err := f.ReadAt(p, off)
		return n, true, err
	case nowaitUnsupported:
		return 0, false, nil
	}
	n, err := unix.Preadv2(int(f.Fd()), [][]byte{p}, off, unix.RWF_NOWAIT)
	switch {
	case errors.Is(err, unix.EOPNOTSUPP):
		f.nowait.Store(nowaitUnsupported)
		return 0, false, nil
	case errors.Is(err, unix.EAGAIN), err == nil && n < len(p) && n > 0:
		// Not cached (or only partly): the caller reads it where waiting
		// is fine.
		return 0, false, nil
	case err != nil:
		return 0, false, nil // the ordinary read reports it
	case n == 0 && len(p) > 0:
		return 0, true, io.EOF
	}
	return n, true, nil
}
func (OSFS) Remove(name string) error                  { return os.Remove(name) }
func (OSFS) Rename(o, n string) error                  { return os.Rename(o, n) }
func (OSFS) MkdirAll(p string, perm os.FileMode) error { return os.MkdirAll(p, perm) }
func (OSFS) Stat(name string) (os.FileInfo, error)     { return os.Stat(name) }
func (OSFS) SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (f osFile) Size() (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if fi.Mode().IsRegular() {
		return fi.Size(), nil
	}
	// Block devices report their capacity at the end.
	return f.Seek(0, io.SeekEnd)
}

const holeRecheck = 4096

// dense reports whether the file has a block for every page of its size
// (false when it cannot tell).
func (f osFile) dense() bool {
	var st unix.Stat_t
	if unix.Fstat(int(f.Fd()), &st) != nil {
		return false
	}
	return st.Blocks*512 >= (st.Size+4095)&^4095
}

// Truncate may leave a hole at the end (see cached).
func (f osFile) Truncate(size int64) error {
	f.holes.Store(true)
	return f.File.Truncate(size)
}

func (f osFile) Punch(off, length int64) error {
	if length <= 0 {
		return nil
	}
	f.holes.Store(true) // before: a check after the punch sees it
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

// seekData reports the data extents of a regular file in [off, off+length)
// with SEEK_DATA/SEEK_HOLE; ok is false when the file cannot tell.
func (f osFile) dataExtents(off, length int64) (ext []Extent, ok bool) {
	end := off + length
	pos := off
	fd := int(f.Fd())
	for pos < end {
		d, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // no data after pos
				ext = append(ext, Extent{Off: pos, Len: end - pos, Hole: true, Zero: true})
				return ext, true
			}
			return nil, false
		}
		if d > pos {
			h := min(d, end)
			ext = append(ext, Extent{Off: pos, Len: h - pos, Hole: true, Zero: true})
			pos = h
			if pos >= end {
				break
			}
		}
		h, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil {
			return nil, false
		}
		h = min(h, end)
		ext = append(ext, Extent{Off: pos, Len: h - pos})
		pos = h
	}
	return ext, true
}

// Extent is a run of a volume or snapshot image.
type Extent struct {
	Off, Len int64
	Hole     bool // not allocated
	Zero     bool // reads as zeros
}

// datasyncer is a File that can make its data durable without the
// metadata a read does not need (fdatasync(2): no timestamps; the size
// and block map are still written when they changed).
type datasyncer interface {
	Datasync() error
}

// datasync makes f's data durable: fdatasync where f can, else fsync.
func datasync(f File) error {
	if d, ok := f.(datasyncer); ok {
		return d.Datasync()
	}
	return f.Sync()
}

// Datasync is fdatasync(2).
func (f osFile) Datasync() error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err != unix.EINTR {
			if err != nil {
				return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: err}
			}
			return nil
		}
	}
}

func joinPath(dir, name string) string { return filepath.Join(dir, name) }
