package nbd

import (
	"io"
	"syscall"
	"unsafe"
)

// rawSocket reads and writes a plain socket with raw system calls
// (syscall.RawSyscall), waiting in Go's network poller while it would
// block: the requests and replies of a connection. Reads and writes of a
// non-blocking socket never wait in the kernel, and a raw call does not
// wake the runtime's monitor thread as an ordinary one does when the
// process was idle before it — under the kernel's nbd client the server
// goes idle between the kernel's batches of requests, and that wake, the
// monitor's polling after it and its sleep again were most of the
// server's context switches (see cow/quickio.go, which does the same for
// a volume's small writes). Deadlines (SetReadDeadline, which stops a
// connection) still apply.
//
// One goroutine reads at a time and one writes at a time (the
// connection's reader; the reply writer or the reader under wmu). The
// calls' arguments and results live here, and the functions handed to
// the socket are bound once: a closure per call would be an allocation
// per request and reply.
type rawSocket struct {
	rc syscall.RawConn

	rp     []byte // the read's buffer, while it runs
	rn     uintptr
	rerr   syscall.Errno
	readFn func(fd uintptr) bool

	wp      []byte // the write's bytes, while it runs
	wdone   int
	werr    syscall.Errno
	writeFn func(fd uintptr) bool
}

func newRawSocket(rc syscall.RawConn) *rawSocket {
	s := &rawSocket{rc: rc}
	s.readFn, s.writeFn = s.read, s.write
	return s
}

func (s *rawSocket) read(fd uintptr) bool {
	for {
		s.rn, _, s.rerr = syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&s.rp[0])), uintptr(len(s.rp)))
		switch s.rerr {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		return true
	}
}

func (s *rawSocket) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.rp, s.rn, s.rerr = p, 0, 0
	err := s.rc.Read(s.readFn)
	s.rp = nil
	switch {
	case err != nil:
		return 0, err
	case s.rerr != 0:
		return 0, s.rerr
	case s.rn == 0:
		return 0, io.EOF
	}
	return int(s.rn), nil
}

func (s *rawSocket) write(fd uintptr) bool {
	for s.wdone < len(s.wp) {
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&s.wp[s.wdone])), uintptr(len(s.wp)-s.wdone))
		switch e {
		case 0:
			s.wdone += int(n)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			s.werr = e
			return true
		}
	}
	return true
}

func (s *rawSocket) Write(p []byte) (int, error) {
	s.wp, s.wdone, s.werr = p, 0, 0
	err := s.rc.Write(s.writeFn)
	s.wp = nil
	switch {
	case err != nil:
		return s.wdone, err
	case s.werr != 0:
		return s.wdone, s.werr
	}
	return s.wdone, nil
}
