package cow

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// faultFS is an in-memory FS that simulates power loss the way
// CrashMonkey and dm-log-writes do: every file keeps the content that
// reached stable storage plus the operations issued since its last Sync,
// and Crash keeps an arbitrary subset of those operations (not only a
// prefix). Names (create, rename, remove) are journaled in order, as ext4
// does: a crash keeps a prefix of the operations not yet made durable by
// SyncDir. It also injects errors into chosen files.
type faultFS struct {
	mu      sync.Mutex
	gen     int                       // bumped by Crash: older handles go stale
	names   map[string]*inode         // what the running system sees
	durable map[string]*inode         // what survives a crash
	nsOps   []func(map[string]*inode) // name changes not yet durable
	nextIno int

	// Error injection: return non-nil to fail the call on that path.
	writeErr func(path string) error
	syncErr  func(path string) error

	// Power loss in the middle of an operation: the crashAt-th Sync from
	// now (1: the next) crashes the FS (as Crash, with crashRand) instead
	// of syncing, and fails; 0: never.
	crashAt   int
	crashRand *rand.Rand
}

type inode struct {
	id      int
	durable []byte
	cur     []byte
	pending []fileOp
}

type fileOp struct {
	kind byte // 'w' write, 't' truncate, 'p' punch
	off  int64
	data []byte
	n    int64
}

func (op fileOp) apply(b []byte) []byte {
	switch op.kind {
	case 'w':
		if end := op.off + int64(len(op.data)); end > int64(len(b)) {
			b = append(b, make([]byte, end-int64(len(b)))...)
		}
		copy(b[op.off:], op.data)
	case 't':
		if op.n < int64(len(b)) {
			b = b[:op.n]
		} else {
			b = append(b, make([]byte, op.n-int64(len(b)))...)
		}
	case 'p':
		end := min(op.off+op.n, int64(len(b)))
		if op.off < end {
			clear(b[op.off:end])
		}
	}
	return b
}

func newFaultFS() *faultFS {
	return &faultFS{names: map[string]*inode{}, durable: map[string]*inode{}}
}

// Crash simulates power loss: each file keeps a random subset of its
// unsynced operations, names keep a random prefix of theirs.
func (f *faultFS) Crash(r *rand.Rand) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.crashLocked(r)
}

// CrashAtSync arms a power loss at the n-th Sync from now (see crashAt).
func (f *faultFS) CrashAtSync(n int, r *rand.Rand) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.crashAt, f.crashRand = n, r
}

// Crashed disarms CrashAtSync and reports whether it went off.
func (f *faultFS) Crashed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	armed := f.crashAt > 0
	f.crashAt, f.crashRand = 0, nil
	return !armed
}

var errPowerLost = errors.New("power lost during sync")

// crashLocked is Crash; caller holds f.mu.
func (f *faultFS) crashLocked(r *rand.Rand) {
	f.gen++
	keep := r.IntN(len(f.nsOps) + 1)
	for _, op := range f.nsOps[:keep] {
		op(f.durable)
	}
	f.nsOps = nil
	seen := map[*inode]bool{}
	for _, ino := range f.durable {
		if seen[ino] {
			continue
		}
		seen[ino] = true
		b := append([]byte(nil), ino.durable...)
		for _, op := range ino.pending {
			if r.IntN(2) == 0 {
				continue
			}
			if op.kind == 'w' && len(op.data) > 512 && r.IntN(4) == 0 {
				// A torn write: some of its sectors reached the disk.
				op.data = op.data[:512*(1+r.IntN((len(op.data)-1)/512))]
			}
			b = op.apply(b)
		}
		ino.durable, ino.cur, ino.pending = b, append([]byte(nil), b...), nil
	}
	f.names = map[string]*inode{}
	for k, v := range f.durable {
		f.names[k] = v
	}
}

// Put creates a file whose content is already durable.
func (f *faultFS) Put(name string, data []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nextIno++
	ino := &inode{id: f.nextIno, durable: append([]byte(nil), data...), cur: append([]byte(nil), data...)}
	f.names[name] = ino
	f.durable[name] = ino
}

// Get returns the content a reader sees now.
func (f *faultFS) Get(name string) ([]byte, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ino, ok := f.names[name]
	if !ok {
		return nil, false
	}
	return append([]byte(nil), ino.cur...), true
}

func (f *faultFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ino, ok := f.names[name]
	if !ok {
		if flag&os.O_CREATE == 0 {
			return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
		}
		f.nextIno++
		ino = &inode{id: f.nextIno}
		f.names[name] = ino
		f.nsOps = append(f.nsOps, func(m map[string]*inode) { m[name] = ino })
	}
	h := &faultFile{fs: f, ino: ino, name: name, gen: f.gen}
	if flag&os.O_TRUNC != 0 {
		h.op(fileOp{kind: 't', n: 0})
	}
	return h, nil
}

func (f *faultFS) Remove(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.names[name]; !ok {
		return &fs.PathError{Op: "remove", Path: name, Err: fs.ErrNotExist}
	}
	delete(f.names, name)
	f.nsOps = append(f.nsOps, func(m map[string]*inode) { delete(m, name) })
	return nil
}

func (f *faultFS) Rename(oldpath, newpath string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	ino, ok := f.names[oldpath]
	if !ok {
		return &fs.PathError{Op: "rename", Path: oldpath, Err: fs.ErrNotExist}
	}
	delete(f.names, oldpath)
	f.names[newpath] = ino
	f.nsOps = append(f.nsOps, func(m map[string]*inode) { delete(m, oldpath); m[newpath] = ino })
	return nil
}

func (f *faultFS) MkdirAll(path string, perm os.FileMode) error { return nil }

func (f *faultFS) SyncDir(dir string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, op := range f.nsOps {
		op(f.durable)
	}
	f.nsOps = nil
	return nil
}

func (f *faultFS) Stat(name string) (os.FileInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ino, ok := f.names[name]
	if !ok {
		return nil, &fs.PathError{Op: "stat", Path: name, Err: fs.ErrNotExist}
	}
	return fakeInfo{name: filepath.Base(name), size: int64(len(ino.cur))}, nil
}

type fakeInfo struct {
	name string
	size int64
}

func (i fakeInfo) Name() string       { return i.name }
func (i fakeInfo) Size() int64        { return i.size }
func (i fakeInfo) Mode() os.FileMode  { return 0o600 }
func (i fakeInfo) ModTime() time.Time { return time.Time{} }
func (i fakeInfo) IsDir() bool        { return false }
func (i fakeInfo) Sys() any           { return nil }

type faultFile struct {
	fs   *faultFS
	ino  *inode
	name string
	gen  int
}

var errStale = errors.New("file handle from before the crash")

func (h *faultFile) check() error {
	if h.gen != h.fs.gen {
		return errStale
	}
	return nil
}

// op records an operation; caller holds fs.mu.
func (h *faultFile) op(o fileOp) {
	h.ino.pending = append(h.ino.pending, o)
	h.ino.cur = o.apply(h.ino.cur)
}

func (h *faultFile) ReadAt(p []byte, off int64) (int, error) {
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	if err := h.check(); err != nil {
		return 0, err
	}
	if off >= int64(len(h.ino.cur)) {
		return 0, io.EOF
	}
	n := copy(p, h.ino.cur[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (h *faultFile) WriteAt(p []byte, off int64) (int, error) {
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	if err := h.check(); err != nil {
		return 0, err
	}
	if h.fs.writeErr != nil {
		if err := h.fs.writeErr(h.name); err != nil {
			return 0, &fs.PathError{Op: "write", Path: h.name, Err: err}
		}
	}
	h.op(fileOp{kind: 'w', off: off, data: append([]byte(nil), p...)})
	return len(p), nil
}

func (h *faultFile) Sync() error {
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	if err := h.check(); err != nil {
		return err
	}
	if h.fs.syncErr != nil {
		if err := h.fs.syncErr(h.name); err != nil {
			return &fs.PathError{Op: "fsync", Path: h.name, Err: err}
		}
	}
	if h.fs.crashAt > 0 {
		if h.fs.crashAt--; h.fs.crashAt == 0 {
			h.fs.crashLocked(h.fs.crashRand)
			return &fs.PathError{Op: "fsync", Path: h.name, Err: errPowerLost}
		}
	}
	h.ino.durable = append(h.ino.durable[:0], h.ino.cur...)
	h.ino.pending = nil
	return nil
}

func (h *faultFile) Truncate(size int64) error {
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	if err := h.check(); err != nil {
		return err
	}
	h.op(fileOp{kind: 't', n: size})
	return nil
}

func (h *faultFile) Close() error { return nil }

func (h *faultFile) Size() (int64, error) {
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	return int64(len(h.ino.cur)), h.check()
}

func (h *faultFile) Punch(off, length int64) error {
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	if err := h.check(); err != nil {
		return err
	}
	h.op(fileOp{kind: 'p', off: off, n: length})
	return nil
}

// faultVolume opens volume "v", 16 chunks of zeros at /o with its shadow
// storage in /d, on a fault-injecting filesystem; it is closed when the
// test ends.
func faultVolume(t *testing.T, policy Policy) (*faultFS, *Volume) {
	t.Helper()
	ffs := newFaultFS()
	ffs.Put("/o", make([]byte, 16*4096))
	v, err := Open("v", "/o", Options{StorageDir: "/d", FS: ffs, Policy: policy})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return ffs, v
}

// failOn returns an injector failing paths that contain substr with err.
func failOn(substr string, err error) func(string) error {
	return func(p string) error {
		if strings.Contains(p, substr) {
			return err
		}
		return nil
	}
}

var (
	_ FS   = (*faultFS)(nil)
	_ File = (*faultFile)(nil)
	_      = fmt.Sprint
	_      = syscall.ENOSPC
)
