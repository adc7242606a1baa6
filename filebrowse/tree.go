package filebrowse

import (
	"archive/tar"
	"archive/zip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Errors of a Tree, wrapped with the path they are about.
var (
	// ErrBadPath: a path with "..", a NUL byte, or not valid otherwise.
	ErrBadPath = errors.New("path refused")
	// ErrSymlink: the path goes through a symbolic link, which a Tree
	// shows and never follows.
	ErrSymlink = errors.New("symbolic link not followed")
	// ErrSpecial: a device, fifo or socket, which a Tree never opens.
	ErrSpecial = errors.New("special file not served")
	// ErrNotDir / ErrIsDir: the wrong kind of entry for the operation.
	ErrNotDir = errors.New("not a directory")
	ErrIsDir  = errors.New("is a directory")
	// ErrBadCursor: a listing cursor this directory did not hand out.
	ErrBadCursor = errors.New("listing cursor refused")
	// ErrNotExist: no such file or directory.
	ErrNotExist = fs.ErrNotExist
	// ErrForbidden: the caller may not browse the source (a resolver
	// returns it wrapped).
	ErrForbidden = errors.New("not allowed")
)

// Entry kinds.
const (
	KindFile    = "file"
	KindDir     = "dir"
	KindSymlink = "symlink"
	KindSpecial = "special"
)

// Entry is one file, directory, link or special file of a Tree.
type Entry struct {
	Name    string      `json:"name"`
	Path    string      `json:"path"` // from the tree's root, "/" for the root
	Kind    string      `json:"kind"`
	Size    int64       `json:"size"`
	Mode    fs.FileMode `json:"-"`
	Perm    string      `json:"mode"` // as ls -l shows it
	ModTime time.Time   `json:"mtime"`
	UID     uint32      `json:"uid"`
	GID     uint32      `json:"gid"`
	Target  string      `json:"target,omitempty"` // a symlink's target, as stored
}

// Page is one page of a directory listing.
type Page struct {
	Dir     string  `json:"dir"`
	Entries []Entry `json:"entries"`
	// Next is the cursor of the next page; "" when this page is the
	// last.
	Next string `json:"next,omitempty"`
}

// Tree is a mounted filesystem of a Browser, read-only. Its methods
// are safe for concurrent use. Close it when done.
type Tree struct {
	b    *Browser
	m    *mount
	once sync.Once
}

// Source is what the tree shows.
func (t *Tree) Source() Source { return t.m.src }

// FSType is the tree's filesystem type (ext4, xfs, ...).
func (t *Tree) FSType() string { return t.m.fstype }

// Close ends this use of the mount (the Browser tears it down later).
func (t *Tree) Close() error {
	t.once.Do(func() { t.b.release(t.m) })
	return nil
}

// clean splits a path from the tree's root ("", "/", "a/b", "/a/b/")
// into its names, refusing "..", NUL bytes and over-long paths.
func clean(p string) ([]string, error) {
	if strings.IndexByte(p, 0) >= 0 {
		return nil, fmt.Errorf("%q: %w: has a NUL byte", p, ErrBadPath)
	}
	if len(p) > unix.PathMax {
		return nil, fmt.Errorf("%w: longer than %d bytes", ErrBadPath, unix.PathMax)
	}
	var out []string
	for _, n := range strings.Split(p, "/") {
		switch n {
		case "", ".":
		case "..":
			return nil, fmt.Errorf("%q: %w: '..' may not leave a directory (name the directory from the root)", p, ErrBadPath)
		default:
			out = append(out, n)
		}
	}
	return out, nil
}

// Clean is p as the Tree names it: "/" and the names joined.
func Clean(p string) (string, error) {
	names, err := clean(p)
	if err != nil {
		return "", err
	}
	return "/" + strings.Join(names, "/"), nil
}

// how every path is resolved: beneath the root, through no symlink, on
// no other mount.
var resolve = unix.OpenHow{Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV}

// openDir opens directory names of the tree with flags.
func (t *Tree) openDir(names []string, flags int) (int, error) {
	how := resolve
	how.Flags = uint64(flags | unix.O_DIRECTORY | unix.O_CLOEXEC | unix.O_NOFOLLOW)
	rel := "."
	if len(names) > 0 {
		rel = strings.Join(names, "/")
	}
	for {
		fd, err := unix.Openat2(t.m.rootFD, rel, &how)
		if err == unix.EINTR || err == unix.EAGAIN {
			continue
		}
		if err != nil {
			return -1, t.pathErr(names, err)
		}
		return fd, nil
	}
}

// pathErr names what went wrong resolving names.
func (t *Tree) pathErr(names []string, err error) error {
	p := "/" + strings.Join(names, "/")
	switch err {
	case unix.ENOENT:
		return fmt.Errorf("%s: %w", p, ErrNotExist)
	case unix.ENOTDIR:
		// A file on the way, or the last name is a file (or a link: with
		// O_NOFOLLOW|O_DIRECTORY the kernel says ENOTDIR for a link).
		if e, lerr := t.lstat(names); lerr == nil && e.Kind == KindSymlink {
			return fmt.Errorf("%s: %w (it points to %q)", p, ErrSymlink, e.Target)
		}
		return fmt.Errorf("%s: %w", p, ErrNotDir)
	case unix.ELOOP:
		return fmt.Errorf("%s: %w: a name on the way is a symbolic link", p, ErrSymlink)
	case unix.EXDEV:
		return fmt.Errorf("%s: %w: leaves the tree", p, ErrBadPath)
	}
	return fmt.Errorf("%s: %w", p, err)
}

// lstat is the entry at names (the root for none), not following a
// link at the end.
func (t *Tree) lstat(names []string) (Entry, error) {
	if len(names) == 0 {
		var st unix.Stat_t
		if err := unix.Fstat(t.m.rootFD, &st); err != nil {
			return Entry{}, err
		}
		e := entryOf("", "/", &st)
		return e, nil
	}
	dfd, err := t.openDir(names[:len(names)-1], unix.O_PATH)
	if err != nil {
		return Entry{}, err
	}
	defer unix.Close(dfd)
	return statAt(dfd, names[len(names)-1], "/"+strings.Join(names, "/"))
}

// statAt is the entry name of directory dfd, not following a link.
func statAt(dfd int, name, p string) (Entry, error) {
	var st unix.Stat_t
	if err := unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if err == unix.ENOENT {
			return Entry{}, fmt.Errorf("%s: %w", p, ErrNotExist)
		}
		return Entry{}, fmt.Errorf("%s: %w", p, err)
	}
	e := entryOf(name, p, &st)
	if e.Kind == KindSymlink {
		buf := make([]byte, 4096)
		n, err := unix.Readlinkat(dfd, name, buf)
		if err != nil {
			return Entry{}, fmt.Errorf("%s: %w", p, err)
		}
		e.Target = string(buf[:n])
	}
	return e, nil
}

func entryOf(name, p string, st *unix.Stat_t) Entry {
	mode := fs.FileMode(st.Mode & 0o777)
	kind := KindSpecial
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		kind = KindFile
	case unix.S_IFDIR:
		kind, mode = KindDir, mode|fs.ModeDir
	case unix.S_IFLNK:
		kind, mode = KindSymlink, mode|fs.ModeSymlink
	case unix.S_IFIFO:
		mode |= fs.ModeNamedPipe
	case unix.S_IFSOCK:
		mode |= fs.ModeSocket
	case unix.S_IFCHR:
		mode |= fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		mode |= fs.ModeDevice
	}
	if st.Mode&unix.S_ISUID != 0 {
		mode |= fs.ModeSetuid
	}
	if st.Mode&unix.S_ISGID != 0 {
		mode |= fs.ModeSetgid
	}
	if st.Mode&unix.S_ISVTX != 0 {
		mode |= fs.ModeSticky
	}
	size := st.Size
	if kind == KindDir || kind == KindSpecial {
		size = 0
	}
	return Entry{Name: name, Path: p, Kind: kind, Size: size, Mode: mode, Perm: mode.String(),
		ModTime: time.Unix(st.Mtim.Unix()).UTC(), UID: st.Uid, GID: st.Gid}
}

// Stat describes the entry at p without following a link.
func (t *Tree) Stat(p string) (Entry, error) {
	names, err := clean(p)
	if err != nil {
		return Entry{}, err
	}
	return t.lstat(names)
}

// Open opens the regular file at p for reading, with its entry. Close
// the file before the Tree: an open file keeps the filesystem busy.
func (t *Tree) Open(p string) (*os.File, Entry, error) {
	names, err := clean(p)
	if err != nil {
		return nil, Entry{}, err
	}
	if len(names) == 0 {
		return nil, Entry{}, fmt.Errorf("/: %w", ErrIsDir)
	}
	dfd, err := t.openDir(names[:len(names)-1], unix.O_PATH)
	if err != nil {
		return nil, Entry{}, err
	}
	defer unix.Close(dfd)
	return openFileAt(dfd, names[len(names)-1], "/"+strings.Join(names, "/"))
}

// openFileAt opens regular file name of directory dfd.
func openFileAt(dfd int, name, p string) (*os.File, Entry, error) {
	e, err := statAt(dfd, name, p)
	if err != nil {
		return nil, Entry{}, err
	}
	switch e.Kind {
	case KindDir:
		return nil, e, fmt.Errorf("%s: %w: download it as tar or zip", p, ErrIsDir)
	case KindSymlink:
		return nil, e, fmt.Errorf("%s: %w (it points to %q)", p, ErrSymlink, e.Target)
	case KindSpecial:
		return nil, e, fmt.Errorf("%s: %w (%s)", p, ErrSpecial, e.Perm)
	}
	// O_NOFOLLOW|O_NONBLOCK: had it changed since (it cannot: read-only)
	// a link fails and a fifo does not block.
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, e, fmt.Errorf("%s: %w", p, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, e, fmt.Errorf("%s: %w", p, ErrSpecial)
	}
	return os.NewFile(uintptr(fd), p), e, nil
}

// List returns up to limit entries of directory dir from cursor ("" for
// the first page), in the directory's own order (a page is sorted by
// name when it is the whole directory). Only one page is read.
func (t *Tree) List(ctx context.Context, dir, cursor string, limit int) (*Page, error) {
	names, err := clean(dir)
	if err != nil {
		return nil, err
	}
	if limit <= 0 {
		limit = 1000
	}
	p := "/" + strings.Join(names, "/")
	var pos int64
	if cursor != "" {
		pos, err = strconv.ParseInt(cursor, 36, 64)
		if err != nil || pos <= 0 {
			return nil, fmt.Errorf("%s: %w: %q (start again from the first page)", p, ErrBadCursor, cursor)
		}
	}
	fd, err := t.openDir(names, unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	d := dirReader{fd: fd}
	if pos > 0 {
		if _, err := unix.Seek(fd, pos, io.SeekStart); err != nil {
			return nil, fmt.Errorf("%s: %w: %q: %v (start again from the first page)", p, ErrBadCursor, cursor, err)
		}
	}
	page := &Page{Dir: p, Entries: []Entry{}}
	var lastOff int64
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		name, off, err := d.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		if len(page.Entries) == limit { // one more: there is a next page
			page.Next = strconv.FormatInt(lastOff, 36)
			break
		}
		e, err := statAt(fd, name, path.Join(p, name))
		if errors.Is(err, ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		page.Entries = append(page.Entries, e)
		lastOff = off
	}
	if cursor == "" && page.Next == "" {
		sort.Slice(page.Entries, func(i, j int) bool { return page.Entries[i].Name < page.Entries[j].Name })
	}
	return page, nil
}

// dirReader reads a directory's entries with getdents64, a buffer at a
// time, skipping "." and "..".
type dirReader struct {
	fd  int
	buf [32 << 10]byte
	n   int // valid bytes of buf
	at  int // next record
}

// next is the next entry's name and the cursor just after it.
func (d *dirReader) next() (string, int64, error) {
	for {
		if d.at >= d.n {
			n, err := unix.Getdents(d.fd, d.buf[:])
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return "", 0, err
			}
			if n <= 0 {
				return "", 0, io.EOF
			}
			d.n, d.at = n, 0
		}
		// struct linux_dirent64 { u64 ino; s64 off; u16 reclen; u8 type; char name[]; }
		rec := d.buf[d.at:d.n]
		if len(rec) < 19 {
			return "", 0, errors.New("short directory record")
		}
		off := int64(binary.NativeEndian.Uint64(rec[8:16]))
		reclen := int(binary.NativeEndian.Uint16(rec[16:18]))
		if reclen < 19 || reclen > len(rec) {
			return "", 0, errors.New("bad directory record")
		}
		name := rec[19:reclen]
		if i := indexNUL(name); i >= 0 {
			name = name[:i]
		}
		d.at += reclen
		if s := string(name); s != "." && s != ".." {
			return s, off, nil
		}
	}
}

func indexNUL(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}

// walk calls fn for every entry under directory dir (dir first), in the
// directories' own order, reading one buffer of names at a time; fn gets
// the directory holding the entry. Special files are passed too.
func (t *Tree) walk(ctx context.Context, dir string, fn func(dfd int, e Entry) error) error {
	names, err := clean(dir)
	if err != nil {
		return err
	}
	root, err := t.lstat(names)
	if err != nil {
		return err
	}
	if root.Kind != KindDir {
		return fmt.Errorf("%s: %w", root.Path, ErrNotDir)
	}
	fd, err := t.openDir(names, unix.O_RDONLY)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := fn(-1, root); err != nil {
		return err
	}
	return walkFD(ctx, fd, root.Path, fn)
}

func walkFD(ctx context.Context, fd int, p string, fn func(dfd int, e Entry) error) error {
	d := &dirReader{fd: fd}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		name, _, err := d.next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		e, err := statAt(fd, name, path.Join(p, name))
		if errors.Is(err, ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if err := fn(fd, e); err != nil {
			return err
		}
		if e.Kind == KindDir {
			how := resolve
			how.Flags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
			sub, err := unix.Openat2(fd, name, &how)
			if err != nil {
				return fmt.Errorf("%s: %w", e.Path, err)
			}
			err = walkFD(ctx, sub, e.Path, fn)
			unix.Close(sub)
			if err != nil {
				return err
			}
		}
	}
}

// archiveName is e's name inside an archive of base: relative to it,
// directories ending in "/".
func archiveName(base, p string, dir bool) string {
	rel := strings.TrimPrefix(strings.TrimPrefix(p, base), "/")
	if base == "/" {
		rel = strings.TrimPrefix(p, "/")
	}
	if dir && rel != "" {
		rel += "/"
	}
	return rel
}

// WriteTar writes directory dir, everything under it, as a tar stream
// (PAX): files, directories and symbolic links (as links), with their
// modes, owners and times; special files are left out.
func (t *Tree) WriteTar(ctx context.Context, w io.Writer, dir string) error {
	base, err := Clean(dir)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(w)
	err = t.walk(ctx, dir, func(dfd int, e Entry) error {
		name := archiveName(base, e.Path, e.Kind == KindDir)
		if name == "" || e.Kind == KindSpecial {
			return nil
		}
		h := &tar.Header{Name: name, Mode: int64(e.Mode.Perm()), ModTime: e.ModTime, Uid: int(e.UID), Gid: int(e.GID), Format: tar.FormatPAX}
		if e.Mode&fs.ModeSetuid != 0 {
			h.Mode |= 0o4000
		}
		if e.Mode&fs.ModeSetgid != 0 {
			h.Mode |= 0o2000
		}
		if e.Mode&fs.ModeSticky != 0 {
			h.Mode |= 0o1000
		}
		switch e.Kind {
		case KindDir:
			h.Typeflag = tar.TypeDir
			return tw.WriteHeader(h)
		case KindSymlink:
			h.Typeflag, h.Linkname = tar.TypeSymlink, e.Target
			return tw.WriteHeader(h)
		}
		f, fe, err := openFileAt(dfd, e.Name, e.Path)
		if err != nil {
			return err
		}
		defer f.Close()
		h.Typeflag, h.Size = tar.TypeReg, fe.Size
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := io.CopyN(tw, f, fe.Size); err != nil {
			return fmt.Errorf("%s: %w", e.Path, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// WriteZip writes directory dir, everything under it, as a zip stream
// (deflated; zip64 where needed): files, directories and symbolic links
// (as links, the way Info-ZIP stores them), with their modes and times;
// special files are left out.
func (t *Tree) WriteZip(ctx context.Context, w io.Writer, dir string) error {
	base, err := Clean(dir)
	if err != nil {
		return err
	}
	zw := zip.NewWriter(w)
	err = t.walk(ctx, dir, func(dfd int, e Entry) error {
		name := archiveName(base, e.Path, e.Kind == KindDir)
		if name == "" || e.Kind == KindSpecial {
			return nil
		}
		h := &zip.FileHeader{Name: name, Modified: e.ModTime, Method: zip.Deflate}
		h.SetMode(e.Mode)
		switch e.Kind {
		case KindDir:
			h.Method = zip.Store
			_, err := zw.CreateHeader(h)
			return err
		case KindSymlink:
			h.Method = zip.Store
			fw, err := zw.CreateHeader(h)
			if err != nil {
				return err
			}
			_, err = io.WriteString(fw, e.Target)
			return err
		}
		f, fe, err := openFileAt(dfd, e.Name, e.Path)
		if err != nil {
			return err
		}
		defer f.Close()
		h.UncompressedSize64 = uint64(fe.Size)
		fw, err := zw.CreateHeader(h)
		if err != nil {
			return err
		}
		if _, err := io.CopyN(fw, f, fe.Size); err != nil {
			return fmt.Errorf("%s: %w", e.Path, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return zw.Close()
}
