// Command passthrough is the baseline of bench/fuse.sh: a minimal go-fuse
// file that passes reads and writes to a backing file, with go-fuse's
// default options (no direct I/O flags, default max_background).
//
//	passthrough MOUNTPOINT BACKING-FILE
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

type root struct {
	fs.Inode
	f *os.File
}

type file struct {
	fs.Inode
	f *os.File
}

func (r *root) OnAdd(ctx context.Context) {
	r.AddChild("disk", r.NewPersistentInode(ctx, &file{f: r.f}, fs.StableAttr{Mode: syscall.S_IFREG}), false)
}

func (f *file) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	st, err := f.f.Stat()
	if err != nil {
		return fs.ToErrno(err)
	}
	out.Mode = 0o644
	out.Size = uint64(st.Size())
	return 0
}

func (f *file) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, 0, 0
}

func (f *file) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n, err := f.f.ReadAt(dest, off)
	if err != nil && n == 0 {
		return fuse.ReadResultData(nil), 0
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (f *file) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	n, err := f.f.WriteAt(data, off)
	return uint32(n), fs.ToErrno(err)
}

func (f *file) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	return fs.ToErrno(f.f.Sync())
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: passthrough MOUNTPOINT BACKING-FILE")
		os.Exit(2)
	}
	bf, err := os.OpenFile(os.Args[2], os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	srv, err := fs.Mount(os.Args[1], &root{f: bf}, &fs.Options{MountOptions: fuse.MountOptions{AllowOther: true}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sig; srv.Unmount() }()
	srv.Wait()
}
