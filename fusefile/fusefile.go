// Package fusefile serves block volumes as files in a FUSE directory, so
// that a loop device can carry them where the kernel has no nbd module:
// each volume is a read-write file and each live snapshot a read-only one.
// Read, Write, Fsync and Fallocate (punch hole) go to the backend; the file
// size is the volume size and cannot change.
//
// Files are opened with FOPEN_DIRECT_IO (the loop device and the engine
// each cache; a third copy in the FUSE page cache only costs) and
// FOPEN_PARALLEL_DIRECT_WRITES (without it the kernel serializes direct
// writes per inode, which caps small random writes at one in flight).
package fusefile

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"umbra/provider"
)

// Backend is the data a file serves: the same contract as an NBD
// export's (nbd.Backend), one interface for both.
type Backend = provider.Device

// Entry is one file of the directory.
type Entry struct {
	Name     string
	Backend  Backend
	ReadOnly bool
	// Trim discards a range (fallocate punch hole); nil: unsupported.
	Trim func(off, length int64) error
	// Zero writes zeros to a range and keeps it allocated (fallocate
	// zero range) in one call; nil: zeros are written with WriteAt.
	Zero func(off, length int64) error
	// Release is called when the kernel forgets the file.
	Release func()
	// Opened, if set, is called at each open of the file; the function
	// it returns is called when that open is released (the last close).
	Opened func() (released func())
}

// Source lists and opens the directory's files; its set may change.
type Source interface {
	List() []string
	Open(name string) (*Entry, error)
}

// Options tune the mount.
type Options struct {
	// MaxBackground bounds requests the kernel keeps in flight (default 128).
	MaxBackground int
	// MaxWrite is the largest read or write request (default 512 KiB).
	MaxWrite int
	// Debug logs every FUSE request.
	Debug bool
}

// Server is a mounted directory being served.
type Server struct {
	dir    string
	server *fuse.Server
}

// Mount mounts src at dir.
func Mount(dir string, src Source, opts Options) (*Server, error) {
	if opts.MaxBackground == 0 {
		opts.MaxBackground = 128
	}
	if opts.MaxWrite == 0 {
		opts.MaxWrite = 512 << 10 // a request plus its header must fit one pipe for splice
	}
	ttl := time.Second
	root := &dirNode{src: src}
	server, err := fs.Mount(dir, root, &fs.Options{
		EntryTimeout: &ttl,
		AttrTimeout:  &ttl,
		MountOptions: fuse.MountOptions{
			FsName:        "umbra",
			Name:          "umbra",
			AllowOther:    true,
			MaxBackground: opts.MaxBackground,
			MaxWrite:      opts.MaxWrite,
			DirectMount:   true,
			Debug:         opts.Debug,
			// Asynchronous direct I/O: the kernel submits a loop device's
			// (or any AIO caller's) O_DIRECT requests without waiting for
			// each, so they reach us in parallel instead of one by one.
			ExtraCapabilities: fuse.CAP_ASYNC_DIO,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("mount FUSE at %s: %w", dir, err)
	}
	return &Server{dir: dir, server: server}, nil
}

// Dir is the mount point.
func (m *Server) Dir() string { return m.dir }

// Unmount unmounts; it fails while a loop device still holds a file.
func (m *Server) Unmount() error {
	if err := m.server.Unmount(); err != nil {
		return fmt.Errorf("unmount %s (detach loop devices first): %w", m.dir, err)
	}
	return nil
}

// Wait blocks until the mount is gone.
func (m *Server) Wait() { m.server.Wait() }

type dirNode struct {
	fs.Inode
	src Source
}

var (
	_ fs.NodeLookuper  = (*dirNode)(nil)
	_ fs.NodeReaddirer = (*dirNode)(nil)
)

func ino(name string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(name))
	return h.Sum64() | 1<<63
}

func (d *dirNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	e, err := d.src.Open(name)
	if err != nil {
		return nil, syscall.ENOENT
	}
	n := &fileNode{e: e}
	n.attr(&out.Attr)
	return d.NewInode(ctx, n, fs.StableAttr{Mode: syscall.S_IFREG, Ino: ino(name)}), 0
}

func (d *dirNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	var list []fuse.DirEntry
	for _, name := range d.src.List() {
		list = append(list, fuse.DirEntry{Name: name, Mode: syscall.S_IFREG, Ino: ino(name)})
	}
	return fs.NewListDirStream(list), 0
}

type fileNode struct {
	fs.Inode
	e *Entry
}

var (
	_ fs.NodeGetattrer   = (*fileNode)(nil)
	_ fs.NodeSetattrer   = (*fileNode)(nil)
	_ fs.NodeOpener      = (*fileNode)(nil)
	_ fs.NodeReader      = (*fileNode)(nil)
	_ fs.NodeWriter      = (*fileNode)(nil)
	_ fs.NodeFsyncer     = (*fileNode)(nil)
	_ fs.NodeFlusher     = (*fileNode)(nil)
	_ fs.NodeAllocater   = (*fileNode)(nil)
	_ fs.NodeOnForgetter = (*fileNode)(nil)
)

func (f *fileNode) attr(a *fuse.Attr) {
	a.Mode = syscall.S_IFREG | 0o644
	if f.e.ReadOnly {
		a.Mode = syscall.S_IFREG | 0o444
	}
	a.Size = uint64(f.e.Backend.Size())
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = 4096
	a.Nlink = 1
}

func (f *fileNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f.attr(&out.Attr)
	return 0
}

func (f *fileNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != f.e.Backend.Size() {
		return syscall.EINVAL // a volume's size is fixed
	}
	f.attr(&out.Attr)
	return 0
}

func (f *fileNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if f.e.ReadOnly && flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	var fh fs.FileHandle
	if f.e.Opened != nil {
		fh = &handle{released: f.e.Opened()}
	}
	return fh, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

// handle is one open of a file whose Entry watches opens; I/O goes to
// the node's methods.
type handle struct{ released func() }

var _ fs.FileReleaser = (*handle)(nil)

func (h *handle) Release(ctx context.Context) syscall.Errno {
	h.released()
	return 0
}

func errno(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return syscall.EIO
}

func (f *fileNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	size := f.e.Backend.Size()
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	if int64(len(dest)) > size-off {
		dest = dest[:size-off]
	}
	n, err := f.e.Backend.ReadAt(dest, off)
	if err != nil && !(errors.Is(err, io.EOF) && n == len(dest)) {
		return nil, errno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (f *fileNode) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if f.e.ReadOnly {
		return 0, syscall.EROFS
	}
	if off+int64(len(data)) > f.e.Backend.Size() {
		return 0, syscall.ENOSPC
	}
	n, err := f.e.Backend.WriteAt(data, off)
	if err != nil {
		return uint32(n), errno(err)
	}
	return uint32(n), 0
}

func (f *fileNode) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	if err := f.e.Backend.Flush(); err != nil {
		return errno(err)
	}
	return 0
}

func (f *fileNode) Flush(ctx context.Context, fh fs.FileHandle) syscall.Errno { return 0 }

const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

func (f *fileNode) Allocate(ctx context.Context, fh fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	if f.e.ReadOnly {
		return syscall.EROFS
	}
	if off+size > uint64(f.e.Backend.Size()) {
		return syscall.EINVAL
	}
	switch {
	case mode == 0 || mode == fallocKeepSize:
		return 0 // a volume is fully addressable already
	case mode&fallocPunchHole != 0:
		if f.e.Trim == nil {
			return syscall.EOPNOTSUPP
		}
		if err := f.e.Trim(int64(off), int64(size)); err != nil {
			return errno(err)
		}
		return 0
	case mode&fallocZeroRange != 0:
		if f.e.Zero != nil {
			if err := f.e.Zero(int64(off), int64(size)); err != nil {
				return errno(err)
			}
			return 0
		}
		z := make([]byte, min(size, 1<<20))
		for done := uint64(0); done < size; {
			n := min(uint64(len(z)), size-done)
			if _, err := f.e.Backend.WriteAt(z[:n], int64(off+done)); err != nil {
				return errno(err)
			}
			done += n
		}
		return 0
	}
	return syscall.EOPNOTSUPP
}

func (f *fileNode) OnForget() {
	if f.e.Release != nil {
		f.e.Release()
	}
}
