package cow

import (
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Quick reads and writes: the small reads and writes of the origin that a
// server makes on the goroutine reading its connection (TryWriteAt) are
// system calls made without telling Go's scheduler (syscall.RawSyscall).
// An ordinary one wakes the runtime's monitor thread (sysmon) whenever
// the process was idle before it, and the monitor then polls every 20 µs
// while the process is busy: under the kernel's nbd client in a VM,
// where the server goes idle between the kernel's batches of requests,
// that was one futex wake and sleep and one nanosleep a first write, and
// 1.0-1.2 of the server's 1.2-1.4 voluntary context switches a request
// (measured 2026-12-07, bench/vm.sh). A raw call keeps its P while the
// kernel works, which is what a read from the page cache or a write into
// it costs anyway: the read says would-block rather than wait for a disk
// (preadv2 RWF_NOWAIT; the caller then reads the ordinary way); the
// write may wait where the kernel throttles a writer with too many dirty
// pages, and then holds that one P for as long.

// readAtQuick reads [off, off+len(p)) from the page cache without waiting
// for a disk; ok false means it read nothing usable (some of it is not
// cached, the file does not support it, or it failed): read it the
// ordinary way.
func (f osFile) readAtQuick(p []byte, off int64) (ok bool) {
	if len(p) == 0 || f.nowait.Load() != nowaitFlag {
		return false
	}
	iov := unix.Iovec{Base: &p[0]}
	iov.SetLen(len(p))
	for {
		n, _, e := syscall.RawSyscall6(unix.SYS_PREADV2, f.Fd(), uintptr(unsafe.Pointer(&iov)), 1, uintptr(off), 0, unix.RWF_NOWAIT)
		switch {
		case e == syscall.EINTR:
			continue
		case e == syscall.EOPNOTSUPP:
			f.nowait.Store(nowaitUnsupported)
			return false
		}
		return e == 0 && int(n) == len(p)
	}
}

// writeAtQuick is WriteAt made with raw system calls.
func (f osFile) writeAtQuick(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, _, e := syscall.RawSyscall6(unix.SYS_PWRITE64, f.Fd(), uintptr(unsafe.Pointer(&p[done])), uintptr(len(p)-done), uintptr(off+int64(done)), 0, 0)
		switch {
		case e == syscall.EINTR:
			continue
		case e != 0:
			return done, &os.PathError{Op: "write", Path: f.Name(), Err: e}
		case n == 0:
			return done, &os.PathError{Op: "write", Path: f.Name(), Err: syscall.EIO}
		}
		done += int(n)
	}
	return done, nil
}

// writeOrigin writes p at off to the origin, quickly (writeAtQuick) when
// quick and the origin is an OS file.
func (v *Volume) writeOrigin(p []byte, off int64, quick bool) (int, error) {
	if quick {
		return writeAtRaw(v.origin, p, off)
	}
	return v.origin.WriteAt(p, off)
}

// writeAtRaw is f.WriteAt, with raw system calls when f is an OS file:
// the write-behind's diff-area writes. Made the ordinary way, the
// flusher's write woke the monitor thread each time a batch was written
// after the server had been idle, and the monitor then polled and
// preempted the connection's reading goroutine while it stayed busy:
// under the kernel's nbd client in the VM of bench/vm.sh (8 MiB, five
// alternating rounds, 2026-12-08) that was about half of a first write's
// voluntary context switches under a snapshot, 0.36-0.51 a request
// against 0.17-0.26 with raw writes and 0.07-0.13 without a snapshot.
// The price is that of writeAtQuick: a write the kernel throttles holds
// the flusher's P while it waits.
func writeAtRaw(f File, p []byte, off int64) (int, error) {
	if of, ok := f.(osFile); ok {
		return of.writeAtQuick(p, off)
	}
	return f.WriteAt(p, off)
}
