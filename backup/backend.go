package backup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Backend stores the repository's objects by name ("config",
// "packs/ab/ab12…", "index/…", "images/…", "locks/…"). Objects are
// written whole and never changed; a Put is atomic (the object is absent
// or complete). Two implementations: a local directory and an S3 bucket.
type Backend interface {
	// Put stores data under name. It need not be durable until Sync.
	Put(ctx context.Context, name string, data []byte) error
	// Get reads length bytes at off of name (length < 0: to the end)
	// into new memory the caller owns (a restore decrypts it in place).
	// A missing object is an error wrapping fs.ErrNotExist.
	Get(ctx context.Context, name string, off, length int64) ([]byte, error)
	// GetInto is Get into buf's memory when it has room for what is read
	// (else into new memory), and returns the bytes read: a restore's
	// workers read packs into a buffer each, kept from read to read,
	// rather than leaving garbage (and fresh memory to zero) at every
	// read.
	GetInto(ctx context.Context, name string, off, length int64, buf []byte) ([]byte, error)
	// Has reports whether name exists.
	Has(ctx context.Context, name string) (bool, error)
	// List returns the names under prefix (a directory such as "packs/"),
	// sorted.
	List(ctx context.Context, prefix string) ([]string, error)
	// Delete removes name; a missing object is not an error.
	Delete(ctx context.Context, name string) error
	// Sync makes every completed Put durable.
	Sync(ctx context.Context) error
	// Location names the repository for messages.
	Location() string
}

// objectWriter is an object written piece by piece and named once it is
// complete (a pack's name is the hash of its bytes).
type objectWriter interface {
	io.Writer
	// Commit stores what was written as name: atomic and durable at the
	// backend's next Sync, as a Put.
	Commit(name string) error
	// Abort discards what was written; after a Commit it does nothing.
	Abort()
}

// streamingBackend is a Backend that writes an object piece by piece,
// so that a backup never holds a whole pack in memory (a local
// directory). Others are given packs whole (Put).
type streamingBackend interface {
	// Create starts an object that will be named under dir.
	Create(ctx context.Context, dir string) (objectWriter, error)
}

// Credentials for backends that need them (S3). Empty fields are taken
// from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
type Credentials struct {
	AccessKey string
	SecretKey string
}

// OpenBackend opens the backend a location names: a directory path, or
// s3://HOST[:PORT]/BUCKET[/PREFIX] (TLS) or s3+http://… (plain HTTP, for
// a server on localhost). It does not check that a repository is there.
func OpenBackend(location string, cred Credentials) (Backend, error) {
	switch {
	case strings.HasPrefix(location, "s3://"), strings.HasPrefix(location, "s3+http://"):
		return openS3(location, cred)
	case strings.Contains(location, "://"):
		return nil, fmt.Errorf("repository %q: unknown scheme (use a directory path, s3:// or s3+http://)", location)
	}
	abs, err := filepath.Abs(location)
	if err != nil {
		return nil, fmt.Errorf("repository %q: %w", location, err)
	}
	return &localBackend{dir: abs}, nil
}

// localBackend keeps objects as files under dir. Puts go to a temporary
// file renamed into place (atomic). Sync makes durable what was written
// and deleted since the last one: an fsync of each file and directory
// when they are few (syncFilesMax), else one syncfs of the repository's
// filesystem, which is far cheaper than an fsync per pack but waits for
// everything written to that filesystem, by any process: an incremental
// of a 1 Mi-chunk volume writes ~20 small files and waited 2.2 s of its
// 3.0 s in syncfs behind the writes of others (measured 2026-12-07).
type localBackend struct {
	dir string

	mu    sync.Mutex      // guards the fields below
	dirty map[string]bool // files (true) and directories (false) changed since the last Sync
	many  bool            // more than syncFilesMax changed: the next Sync is a syncfs
	synMu sync.Mutex      // one Sync at a time: a Sync returns once what was changed before it is durable
}

// syncFilesMax is how many changed files and directories a Sync fsyncs
// one by one; beyond it, one syncfs. (A variable: tests change it.)
var syncFilesMax = 256

// syncfs and fsync are the system calls Sync makes, syncRounds the
// Syncs that made any (tests follow them).
var (
	syncfs     = unix.Syncfs
	fsync      = func(f *os.File) error { return f.Sync() }
	syncRounds atomic.Int64
)

// changed records that path (a file or, isFile false, a directory) was
// written or had an entry added or removed since the last Sync; dirs
// made on the way are recorded with their parents by the caller. Locks
// are not: one lost in a crash was held by an operation that died with
// it, one that comes back is stale (lock.go), and syncing them would
// add an fsync or two to every operation.
func (b *localBackend) changed(path string, isFile bool) {
	if b.isLock(path) {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.many {
		return
	}
	if b.dirty == nil {
		b.dirty = map[string]bool{}
	}
	if isFile || !b.dirty[path] {
		b.dirty[path] = isFile
	}
	if len(b.dirty) > syncFilesMax {
		b.dirty, b.many = nil, true
	}
}

// isLock: path is the lock objects' directory or in it.
func (b *localBackend) isLock(path string) bool {
	d := b.path("locks")
	return path == d || strings.HasPrefix(path, d+string(filepath.Separator))
}

// wrote records a file written at p (renamed into its directory); made:
// its directory was made, and maybe its parents.
func (b *localBackend) wrote(p string, made bool) {
	if b.isLock(p) {
		return
	}
	b.changed(p, true)
	d := filepath.Dir(p)
	b.changed(d, false)
	for made && len(d) >= len(b.dir) && d != filepath.Dir(d) { // up to the repository's parent
		d = filepath.Dir(d)
		b.changed(d, false)
	}
}

func (b *localBackend) Location() string { return b.dir }

func (b *localBackend) path(name string) string {
	return filepath.Join(b.dir, filepath.FromSlash(name))
}

func (b *localBackend) Put(ctx context.Context, name string, data []byte) error {
	p := b.path(name)
	dir := filepath.Dir(p)
	f, err := os.CreateTemp(dir, ".tmp-")
	made := false
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(dir, 0o700); err == nil {
			made = true
			f, err = os.CreateTemp(dir, ".tmp-")
		}
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("write %s: %w", p, err)
	}
	b.wrote(p, made)
	return nil
}

// Create starts a file in dir: an unnamed one (O_TMPFILE), given its
// name by Commit, so that nothing is left of it should the process die
// before; where the filesystem has no unnamed files, a temporary file
// (".tmp-…", skipped by List) renamed into place.
func (b *localBackend) Create(ctx context.Context, dir string) (objectWriter, error) {
	d := b.path(dir)
	made := false
	if _, err := os.Stat(d); err != nil {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("write in %s: %w", d, err)
		}
		made = true
	}
	if procFDs() {
		if f, err := os.OpenFile(d, unix.O_TMPFILE|os.O_WRONLY, 0o600); err == nil {
			return &localObject{b: b, f: f, made: made}, nil
		}
	}
	f, err := os.CreateTemp(d, ".tmp-")
	if err != nil {
		return nil, fmt.Errorf("write in %s: %w", d, err)
	}
	return &localObject{b: b, f: f, named: true, made: made}, nil
}

// procFDs: /proc/self/fd is there, through which an unnamed file is
// given a name (linkat with AT_EMPTY_PATH needs a capability).
var procFDs = sync.OnceValue(func() bool {
	_, err := os.Stat("/proc/self/fd")
	return err == nil
})

// localObject is a file being written by Create's caller.
type localObject struct {
	b     *localBackend
	f     *os.File
	named bool // a temporary file, not an unnamed one
	done  bool // committed or aborted
	made  bool // Create made its directory
}

func (o *localObject) Write(p []byte) (int, error) { return o.f.Write(p) }

func (o *localObject) Commit(name string) error {
	p := o.b.path(name)
	o.done = true
	tmp := o.f.Name()
	var err error
	made := false
	if !o.named {
		// An unnamed file gets a temporary name beside its own, then
		// the rename makes it whole under its name at once (linkat
		// would not replace an existing object, as a Put does).
		tmp = filepath.Join(filepath.Dir(p), ".tmp-"+randomID())
		proc := fmt.Sprintf("/proc/self/fd/%d", o.f.Fd())
		link := func() error { return unix.Linkat(unix.AT_FDCWD, proc, unix.AT_FDCWD, tmp, unix.AT_SYMLINK_FOLLOW) }
		if err = link(); err == unix.ENOENT {
			if err = os.MkdirAll(filepath.Dir(p), 0o700); err == nil {
				made = true
				err = link()
			}
		}
	}
	if cerr := o.f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		if err = os.Rename(tmp, p); errors.Is(err, fs.ErrNotExist) {
			if err = os.MkdirAll(filepath.Dir(p), 0o700); err == nil {
				made = true
				err = os.Rename(tmp, p)
			}
		}
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", p, err)
	}
	o.b.wrote(p, made || o.made)
	return nil
}

func (o *localObject) Abort() {
	if o.done {
		return
	}
	o.done = true
	o.f.Close()
	if o.named {
		os.Remove(o.f.Name())
	}
}

func (b *localBackend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	return b.GetInto(ctx, name, off, length, nil)
}

func (b *localBackend) GetInto(ctx context.Context, name string, off, length int64, buf []byte) ([]byte, error) {
	f, err := os.Open(b.path(name))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if length < 0 {
		fi, err := f.Stat()
		if err != nil {
			return nil, err
		}
		length = max(fi.Size()-off, 0)
	}
	if buf == nil || int64(cap(buf)) < length {
		buf = make([]byte, length)
	}
	buf = buf[:length]
	n, err := f.ReadAt(buf, off)
	if err == io.EOF && int64(n) < length {
		return nil, fmt.Errorf("read %s: %d bytes at %d: %w", b.path(name), length, off, io.ErrUnexpectedEOF)
	}
	if err != nil && err != io.EOF {
		return nil, err
	}
	return buf, nil
}

// objectOpener is a backend whose objects are files a reader can read
// in pieces (a local repository).
type objectOpener interface {
	openObject(ctx context.Context, name string) (*os.File, int64, error)
}

// openObject opens object name for reading; the caller closes it.
func (b *localBackend) openObject(ctx context.Context, name string) (*os.File, int64, error) {
	f, err := os.Open(b.path(name))
	if err != nil {
		return nil, 0, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	return f, fi.Size(), nil
}

func (b *localBackend) Size(ctx context.Context, name string) (int64, error) {
	fi, err := os.Stat(b.path(name))
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// sizer is a backend that tells an object's size without reading it
// (both do; wrappers in tests may not).
type sizer interface {
	Size(ctx context.Context, name string) (int64, error)
}

// objectSize is the size of object name, or fallback when the backend
// cannot tell.
func objectSize(ctx context.Context, be Backend, name string, fallback int64) int64 {
	if s, ok := be.(sizer); ok {
		if n, err := s.Size(ctx, name); err == nil {
			return n
		}
	}
	return fallback
}

func (b *localBackend) Has(ctx context.Context, name string) (bool, error) {
	_, err := os.Stat(b.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

func (b *localBackend) List(ctx context.Context, prefix string) ([]string, error) {
	var out []string
	root := b.path(prefix)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && p == root {
				return filepath.SkipDir
			}
			return err
		}
		if d.IsDir() && p == filepath.Join(b.dir, localCacheDir) {
			return filepath.SkipDir // the local index cache, not objects
		}
		if d.IsDir() || strings.HasPrefix(d.Name(), ".tmp-") {
			return nil
		}
		rel, err := filepath.Rel(b.dir, p)
		if err != nil {
			return err
		}
		out = append(out, filepath.ToSlash(rel))
		return nil
	})
	sort.Strings(out)
	return out, err
}

func (b *localBackend) Delete(ctx context.Context, name string) error {
	p := b.path(name)
	err := os.Remove(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err == nil {
		b.changed(filepath.Dir(p), false)
	}
	if err == nil && strings.Count(name, "/") == 2 && strings.HasPrefix(name, "lists/") {
		// A segmented list's directory, once empty.
		if os.Remove(filepath.Dir(p)) == nil {
			b.mu.Lock()
			delete(b.dirty, filepath.Dir(p))
			b.mu.Unlock()
			b.changed(filepath.Dir(filepath.Dir(p)), false)
		}
	}
	return err
}

// Sync makes durable the files written and the directories changed
// since the last Sync (this backend's: another process syncs its own):
// an fsync of each, several at once (a journalling filesystem commits
// them together), or one syncfs when there were many. Syncs run one at
// a time, so that one called while another is under way returns only
// once what the other took is durable too (or, where it failed, taken
// again).
func (b *localBackend) Sync(ctx context.Context) error {
	b.synMu.Lock()
	defer b.synMu.Unlock()
	b.mu.Lock()
	dirty, many := b.dirty, b.many
	b.dirty, b.many = nil, false
	b.mu.Unlock()
	var err error
	if many || len(dirty) > 0 {
		syncRounds.Add(1)
	}
	if many {
		err = b.syncAll()
	} else if len(dirty) > 0 {
		err = b.syncEach(dirty)
	}
	if err != nil {
		b.mu.Lock()
		b.dirty, b.many = nil, true // the next Sync takes all again
		b.mu.Unlock()
	}
	return err
}

// syncAll is one syncfs of the repository's filesystem.
func (b *localBackend) syncAll() error {
	d, err := os.Open(b.dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return syncfs(int(d.Fd()))
}

// syncEach fsyncs each of paths, up to 16 at once. A path gone since
// (a file deleted, a directory removed once empty) needs nothing; its
// directory is in paths too.
func (b *localBackend) syncEach(paths map[string]bool) error {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	sem := make(chan struct{}, 16)
	for p := range paths {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			f, err := os.Open(p)
			if errors.Is(err, fs.ErrNotExist) {
				return
			}
			if err == nil {
				err = fsync(f)
				f.Close()
			}
			if err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("sync %s: %w", p, err))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}
