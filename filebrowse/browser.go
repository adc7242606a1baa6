// Package filebrowse shows the filesystem (ext4, xfs) inside a shadow
// copy or a backup image, read-only and without restoring anything: the
// source's bytes are served as a read-only FUSE file in a private
// directory (as `umbra mount --dir` does), a read-only loop device
// carries that file, and the filesystem is mounted read-only without
// replaying its journal (package expose: ro,noload for ext4,
// ro,norecovery for xfs), with nosuid,nodev,noexec.
//
// A Browser keeps a bounded number of those mounts open, shares one
// between the readers of the same source, and tears down the ones no
// reader used for a while, oldest first: umount, losetup -d, FUSE
// unmount, then the source is closed. Close tears everything down.
//
// A Tree reads a mounted filesystem with openat2(RESOLVE_BENEATH |
// RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV): a path never leaves the tree,
// symbolic links are shown as links and never followed, special files
// (devices, fifos, sockets) are listed and never opened. Directories are
// listed a page at a time from a position in the directory (the
// kernel's directory cookie), so a directory of any size costs one page
// of memory. Handler serves a Browser over HTTP: server-side HTML, JSON,
// downloads, folders as tar or zip.
package filebrowse

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"umbra/expose"
	"umbra/fusefile"
)

// Image is the bytes of a source: a read-only block image holding a
// filesystem.
type Image interface {
	ReadAt(p []byte, off int64) (int, error)
	Size() int64
	Close() error
}

// Source is what a Tree shows: a snapshot or a backup image.
type Source interface {
	// Key names the source: readers of sources with the same key share
	// one mount.
	Key() string
	// String describes the source for people.
	String() string
	// Open opens the source's bytes; the Browser closes them when it
	// tears the mount down.
	Open(ctx context.Context) (Image, error)
}

// Options tune a Browser.
type Options struct {
	// Dir is where the private mount directories are made (a directory
	// only root can enter is created in it); default os.TempDir().
	Dir string
	// MaxMounts bounds the sources mounted at once (default 4). Opening
	// another tears down the one unused longest; when all are in use,
	// Open fails with ErrBusy.
	MaxMounts int
	// Idle is how long a mount no reader uses stays (default 5 minutes).
	Idle time.Duration
	// Logger logs mounts and teardowns (default slog.Default()).
	Logger *slog.Logger
	// CleanStale tears down, at New, what Browsers of processes that
	// died left in Dir (mounts, loop devices, FUSE mounts). Only for a
	// Dir no other live Browser uses: the service's, which it owns.
	CleanStale bool
}

// ErrBusy: every mount the Browser may keep is in use.
var ErrBusy = errors.New("every file browser mount is in use")

// ErrClosed: the Browser was closed.
var ErrClosed = errors.New("file browser closed")

// ErrNoFilesystem: the source holds no filesystem the browser can mount.
var ErrNoFilesystem = expose.ErrNoFilesystem

// Browser mounts sources and hands out Trees over them.
type Browser struct {
	opts Options
	dir  string // private directory (0700) holding the mounts
	log  *slog.Logger

	mu     sync.Mutex        // guards mounts, seq, closed
	mounts map[string]*mount // by source key
	seq    int               // numbers mount directories
	closed bool

	wake chan struct{} // tells the reaper a mount went idle
	stop chan struct{} // closed by Close
	done chan struct{} // closed when the reaper returns
	wg   sync.WaitGroup
}

// mount is one mounted source.
type mount struct {
	key   string
	src   Source
	ready chan struct{} // closed once up (or failed: err)
	err   error         // set before ready closes

	// guarded by Browser.mu
	refs int       // open Trees and Opens waiting for ready
	last time.Time // when refs last went to 0
	gone bool      // out of the map: being torn down or failed

	// set before ready closes, read-only after
	img    Image
	fuse   *fusefile.Server
	fuseD  string // FUSE directory
	fs     *expose.Mount
	rootFD int // the filesystem's root directory (O_PATH), -1 when unset
	fstype string
}

// New makes a Browser. It mounts nothing until Open.
func New(opts Options) (*Browser, error) {
	if opts.MaxMounts <= 0 {
		opts.MaxMounts = 4
	}
	if opts.Idle <= 0 {
		opts.Idle = 5 * time.Minute
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Dir == "" {
		opts.Dir = os.TempDir()
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("file browser directory: %w", err)
	}
	if opts.CleanStale {
		cleanStale(opts.Dir, opts.Logger)
	}
	dir, err := os.MkdirTemp(opts.Dir, "umbra-browse-")
	if err != nil {
		return nil, fmt.Errorf("file browser directory: %w", err)
	}
	b := &Browser{opts: opts, dir: dir, log: opts.Logger, mounts: map[string]*mount{},
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go b.reap()
	return b, nil
}

// Dir is the private directory the mounts are made in.
func (b *Browser) Dir() string { return b.dir }

// Open mounts src (or shares its mount) and returns a Tree over its
// filesystem; Close the Tree when done.
func (b *Browser) Open(ctx context.Context, src Source) (*Tree, error) {
	key := src.Key()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, ErrClosed
	}
	if m := b.mounts[key]; m != nil {
		m.refs++
		b.mu.Unlock()
		select {
		case <-m.ready:
		case <-ctx.Done():
			b.release(m)
			return nil, ctx.Err()
		}
		if m.err != nil {
			b.release(m)
			return nil, m.err
		}
		return &Tree{b: b, m: m}, nil
	}
	var victim *mount
	if len(b.mounts) >= b.opts.MaxMounts {
		victim = b.oldestIdleLocked()
		if victim == nil {
			b.mu.Unlock()
			return nil, fmt.Errorf("%w (%d): close a browsing session or try again in a moment", ErrBusy, b.opts.MaxMounts)
		}
		victim.gone = true
		delete(b.mounts, victim.key)
	}
	b.seq++
	m := &mount{key: key, src: src, ready: make(chan struct{}), refs: 1, rootFD: -1}
	seq := b.seq
	b.mounts[key] = m
	b.wg.Add(1)
	b.mu.Unlock()
	defer b.wg.Done()

	if victim != nil {
		b.teardown(victim)
	}
	if err := b.up(ctx, m, seq); err != nil {
		m.err = fmt.Errorf("browse %s: %w", src, err)
		b.mu.Lock()
		m.gone = true
		if b.mounts[key] == m {
			delete(b.mounts, key)
		}
		m.refs--
		b.mu.Unlock()
		close(m.ready)
		b.teardown(m)
		return nil, m.err
	}
	close(m.ready)
	b.log.Info("file browser mounted", "source", src.String(), "fstype", m.fstype, "dir", m.fs.Dir)
	return &Tree{b: b, m: m}, nil
}

// oldestIdleLocked is the ready mount no reader uses that was used
// longest ago, or nil. Callers hold mu.
func (b *Browser) oldestIdleLocked() *mount {
	var old *mount
	for _, m := range b.mounts {
		if m.refs > 0 || !isClosed(m.ready) {
			continue
		}
		if old == nil || m.last.Before(old.last) {
			old = m
		}
	}
	return old
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// up mounts m: the source's bytes as a FUSE file, a read-only loop
// device over it, the filesystem read-only.
func (b *Browser) up(ctx context.Context, m *mount, seq int) error {
	img, err := m.src.Open(ctx)
	if err != nil {
		return err
	}
	m.img = img
	m.fuseD = filepath.Join(b.dir, "file-"+strconv.Itoa(seq))
	if err := os.Mkdir(m.fuseD, 0o700); err != nil {
		return err
	}
	const name = "image"
	m.fuse, err = fusefile.Mount(m.fuseD, oneFile{name, img}, fusefile.Options{})
	if err != nil {
		return fmt.Errorf("%w; is /dev/fuse there and does the service run as root?", err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	m.fs, err = expose.MountFileWith(filepath.Join(m.fuseD, name), filepath.Join(b.dir, "fs-"+strconv.Itoa(seq)), "nosuid", "nodev", "noexec")
	if err != nil {
		return err
	}
	m.fstype = m.fs.FSType
	m.rootFD, err = unix.Open(m.fs.Dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		m.rootFD = -1
		return fmt.Errorf("open %s: %w", m.fs.Dir, err)
	}
	return nil
}

// teardown undoes up in reverse order, as far as it got: root
// descriptor, umount and loop device, FUSE mount, the source's bytes.
func (b *Browser) teardown(m *mount) {
	var errs []error
	if m.rootFD >= 0 {
		unix.Close(m.rootFD)
		m.rootFD = -1
	}
	if m.fs != nil {
		if err := m.fs.Unmount(); err != nil {
			errs = append(errs, err)
		}
	}
	if m.fuse != nil {
		if err := unmountFUSE(m.fuse); err != nil {
			errs = append(errs, err)
		} else {
			m.fuse.Wait()
		}
	}
	if m.fuseD != "" {
		os.Remove(m.fuseD)
	}
	if m.img != nil {
		if err := m.img.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		b.log.Error("file browser teardown", "source", m.src.String(), "err", err)
	} else if m.fs != nil {
		b.log.Info("file browser unmounted", "source", m.src.String())
	}
}

// unmountFUSE unmounts a FUSE directory once no loop device holds its
// file: the kernel drops the loop device's reference to the file just
// after `losetup -d` returns, so an unmount right then can find it busy
// for a moment.
func unmountFUSE(s *fusefile.Server) error {
	var err error
	for wait := time.Millisecond; wait < 10*time.Second; wait *= 2 {
		if err = s.Unmount(); err == nil {
			return nil
		}
		time.Sleep(wait)
	}
	return err
}

// release ends one use of m.
func (b *Browser) release(m *mount) {
	b.mu.Lock()
	m.refs--
	if m.refs == 0 {
		m.last = time.Now()
	}
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// reap tears down mounts idle for longer than Idle, until Close.
func (b *Browser) reap() {
	defer close(b.done)
	t := time.NewTimer(b.opts.Idle)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			return
		case <-b.wake:
		case <-t.C:
		}
		next := b.expire()
		t.Reset(next)
	}
}

// expire tears down the mounts idle for Idle and returns when to look
// again.
func (b *Browser) expire() time.Duration {
	now := time.Now()
	next := b.opts.Idle
	var old []*mount
	b.mu.Lock()
	for _, m := range b.mounts {
		if m.refs > 0 || !isClosed(m.ready) {
			continue
		}
		if left := b.opts.Idle - now.Sub(m.last); left > 0 {
			next = min(next, left)
			continue
		}
		m.gone = true
		delete(b.mounts, m.key)
		old = append(old, m)
	}
	b.mu.Unlock()
	sort.Slice(old, func(i, j int) bool { return old[i].last.Before(old[j].last) })
	for _, m := range old {
		b.teardown(m)
	}
	return next
}

// Drop tears down the mount of the source with key (a snapshot about to
// be deleted: the mount keeps it in use) once no reader uses it; it
// fails while one does.
func (b *Browser) Drop(key string) error {
	b.mu.Lock()
	m := b.mounts[key]
	if m == nil {
		b.mu.Unlock()
		return nil
	}
	if m.refs > 0 || !isClosed(m.ready) {
		b.mu.Unlock()
		return fmt.Errorf("%s is being browsed: try again when the download or listing is done", m.src)
	}
	m.gone = true
	delete(b.mounts, key)
	b.mu.Unlock()
	b.teardown(m)
	return nil
}

// MountInfo describes one mount of a Browser.
type MountInfo struct {
	Source string    `json:"source"`
	Key    string    `json:"key"`
	FSType string    `json:"fstype"`
	Users  int       `json:"users"`
	Since  time.Time `json:"idle_since,omitzero"`
}

// Mounts lists the Browser's mounts.
func (b *Browser) Mounts() []MountInfo {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []MountInfo
	for _, m := range b.mounts {
		if !isClosed(m.ready) {
			continue
		}
		mi := MountInfo{Source: m.src.String(), Key: m.key, FSType: m.fstype, Users: m.refs}
		if m.refs == 0 {
			mi.Since = m.last
		}
		out = append(out, mi)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// Close tears every mount down, waiting for the Trees still open to be
// closed first (close them, or end the requests that hold them), and
// removes the private directory.
func (b *Browser) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.mu.Unlock()
	close(b.stop)
	<-b.done
	b.wg.Wait() // mounts being made
	for {
		b.mu.Lock()
		var all []*mount
		busy := false
		for _, m := range b.mounts {
			if m.refs > 0 {
				busy = true
				continue
			}
			m.gone = true
			delete(b.mounts, m.key)
			all = append(all, m)
		}
		b.mu.Unlock()
		for _, m := range all {
			b.teardown(m)
		}
		if !busy {
			break
		}
		<-b.wake // a Tree was closed
	}
	return os.Remove(b.dir)
}

// oneFile serves one image as the only file of a FUSE directory.
type oneFile struct {
	name string
	img  Image
}

func (o oneFile) List() []string { return []string{o.name} }

func (o oneFile) Open(name string) (*fusefile.Entry, error) {
	if name != o.name {
		return nil, fmt.Errorf("%s: no such file", name)
	}
	return &fusefile.Entry{Name: name, Backend: readOnly{o.img}, ReadOnly: true}, nil
}

// readOnly serves an image as a fusefile.Backend whose writes are
// refused.
type readOnly struct{ img Image }

func (r readOnly) ReadAt(p []byte, off int64) (int, error) { return r.img.ReadAt(p, off) }
func (r readOnly) Size() int64                             { return r.img.Size() }
func (readOnly) WriteAt(p []byte, off int64) (int, error)  { return 0, unix.EROFS }
func (readOnly) Flush() error                              { return nil }

// cleanStale tears down what the Browsers of dead processes left in
// dir, in order: filesystem mounts, the loop devices over their FUSE
// files, the FUSE mounts (whose servers died: lazily); then removes the
// directories, never descending into one still mounted.
func cleanStale(dir string, log *slog.Logger) {
	olds, _ := filepath.Glob(filepath.Join(dir, "umbra-browse-*"))
	for _, old := range olds {
		prefix := old + "/"
		var fsMounts, fuseMounts []string
		for _, mp := range mountPoints() {
			switch {
			case strings.HasPrefix(mp, prefix+"fs-"):
				fsMounts = append(fsMounts, mp)
			case strings.HasPrefix(mp, prefix+"file-"):
				fuseMounts = append(fuseMounts, mp)
			}
		}
		for _, mp := range fsMounts {
			if err := exec.Command("umount", mp).Run(); err != nil {
				exec.Command("umount", "-l", mp).Run()
			}
		}
		loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
		for _, bf := range loops {
			b, err := os.ReadFile(bf)
			if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), prefix) {
				exec.Command("losetup", "-d", "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(bf)))).Run()
			}
		}
		for _, mp := range fuseMounts {
			if err := exec.Command("fusermount3", "-u", "-z", mp).Run(); err != nil {
				exec.Command("umount", "-l", mp).Run()
			}
		}
		left := mountPoints()
		ents, _ := os.ReadDir(old)
		for _, e := range ents {
			p := filepath.Join(old, e.Name())
			if !slices.Contains(left, p) {
				os.Remove(p)
			}
		}
		if err := os.Remove(old); err != nil {
			log.Warn("file browser: a directory left by a process that died stays", "dir", old, "err", err)
		} else {
			log.Info("file browser: tore down what a process that died left", "dir", old, "mounts", len(fsMounts)+len(fuseMounts))
		}
	}
}

// mountPoints lists the mount points of /proc/self/mountinfo.
func mountPoints() []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 {
			out = append(out, unescapeMount(f[4]))
		}
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
