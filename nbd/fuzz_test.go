package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"umbra/internal/testutil"
)

func FuzzDecodeRequest(f *testing.F) {
	f.Add(request{typ: cmdRead, cookie: 1, offset: 4096, length: 512}.encode())
	f.Add(request{typ: cmdWrite, flags: cmdFlagFUA, cookie: 2, length: 1}.encode())
	f.Add([]byte{0x25, 0x60, 0x95, 0x13})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeRequest(b)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %v does not wrap ErrProtocol", err)
			}
			return
		}
		if got := r.encode(); !bytes.Equal(got, b[:requestSize]) {
			t.Fatal("request does not round-trip")
		}
	})
}

func FuzzDecodeOptions(f *testing.F) {
	info := binary.BigEndian.AppendUint32(nil, 3)
	info = append(info, "vol"...)
	info = append(info, 0, 1, 0, 3)
	f.Add(info)
	meta := binary.BigEndian.AppendUint32(nil, 3)
	meta = append(meta, "vol"...)
	meta = binary.BigEndian.AppendUint32(meta, 1)
	meta = binary.BigEndian.AppendUint32(meta, 15)
	meta = append(meta, "base:allocation"...)
	f.Add(meta)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, dec := range []func([]byte) error{
			func(b []byte) error { _, err := decodeInfoRequest(b); return err },
			func(b []byte) error { _, err := decodeMetaRequest(b); return err },
			func(b []byte) error { _, _, err := decodeOptionHeader(b); return err },
		} {
			if err := dec(b); err != nil && !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %v does not wrap ErrProtocol", err)
			}
		}
	})
}

type memExports struct{ b *memBackend }

func (m memExports) List() []string { return []string{"m"} }
func (m memExports) Lookup(name string) (*Export, error) {
	if name != "m" {
		return nil, errors.New("no such export")
	}
	return &Export{Name: "m", Backend: m.b}, nil
}

// memBackend is an export in memory; requests run concurrently, so it
// locks as a real backend would.
type memBackend struct {
	mu   sync.RWMutex
	data []byte
}

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return copy(p, m.data[off:]), nil
}

func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}

// TryWriteAt takes the inline path for writes at even offsets and hands
// the others to a goroutine, so sessions exercise both.
func (m *memBackend) TryWriteAt(p []byte, off int64) (int, bool, error) {
	if off%2 != 0 {
		return 0, false, nil
	}
	n, err := m.WriteAt(p, off)
	return n, true, err
}

// TryReadAt likewise serves reads at even offsets inline.
func (m *memBackend) TryReadAt(p []byte, off int64) (int, bool, error) {
	if off%2 != 0 {
		return 0, false, nil
	}
	n, err := m.ReadAt(p, off)
	return n, true, err
}

func (m *memBackend) Size() int64  { return int64(len(m.data)) }
func (m *memBackend) Flush() error { return nil }

// FuzzSession feeds arbitrary client bytes to a server connection: the
// server must neither panic nor hang.
func FuzzSession(f *testing.F) {
	var s []byte
	s = append(s, 0, 0, 0, 3)
	opt := func(code uint32, data []byte) {
		s = binary.BigEndian.AppendUint64(s, magicIHaveOpt)
		s = binary.BigEndian.AppendUint32(s, code)
		s = binary.BigEndian.AppendUint32(s, uint32(len(data)))
		s = append(s, data...)
	}
	opt(optStructuredReply, nil)
	opt(optList, nil)
	opt(optGo, append(append(binary.BigEndian.AppendUint32(nil, 1), 'm'), 0, 0))
	s = append(s, request{typ: cmdRead, cookie: 1, length: 16}.encode()...)
	s = append(s, request{typ: cmdWrite, cookie: 2, length: 4}.encode()...)
	s = append(s, 1, 2, 3, 4)
	s = append(s, request{typ: cmdBlockStatus, cookie: 3, length: 16}.encode()...)
	s = append(s, request{typ: cmdDisc}.encode()...)
	f.Add(s)
	f.Add([]byte{0, 0, 0, 1})
	s = append([]byte(nil), s[:len(s)-requestSize]...) // without the DISC
	s = append(s, request{typ: cmdWrite, cookie: 4, offset: 0, length: 70000}.encode()...)
	s = append(s, make([]byte, 70000)...)
	s = append(s, request{typ: cmdRead, cookie: 5, offset: 0, length: 70000}.encode()...)
	s = append(s, request{typ: cmdWrite, cookie: 6, offset: 512, length: 90000}.encode()...)
	f.Add(append(s, make([]byte, 1000)...)) // the payload cut short
	file, err := os.CreateTemp("", "umbra-fuzz-")
	if err != nil {
		f.Fatal(err)
	}
	defer os.Remove(file.Name())
	defer file.Close()
	file.Truncate(256 << 10)
	f.Fuzz(func(t *testing.T, in []byte) {
		// Over net.Pipe with a backend in memory, and over a unix socket
		// pair with a file backend, where inline reads, sendfile and
		// spliced writes run.
		session(t, memExports{&memBackend{data: make([]byte, 4096)}}, in, false)
		session(t, fileExports{fileBackend{file}}, in, true)
	})
}

func session(t *testing.T, exps Exports, in []byte, socket bool) {
	srv := NewServer(exps, Options{})
	var a, b net.Conn
	if socket {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		a, b = fileConn(t, fds[0]), fileConn(t, fds[1])
	} else {
		a, b = net.Pipe()
	}
	c := &conn{srv: srv, nc: a, log: srv.log}
	done := make(chan struct{})
	go func() { c.serve(); close(done) }()
	go io.Copy(io.Discard, b)
	b.SetWriteDeadline(time.Now().Add(2 * time.Second))
	b.Write(in)
	if uc, ok := b.(*net.UnixConn); ok {
		uc.CloseWrite() // EOF for the server; its replies still drain
	} else {
		b.Close()
	}
	testutil.Receive(t, done, "the server connection ends on closed input (does it hang?)")
	b.Close()
}

func fileConn(t *testing.T, fd int) net.Conn {
	f := os.NewFile(uintptr(fd), "socket")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

type fileExports struct{ b fileBackend }

func (e fileExports) List() []string { return []string{"m"} }
func (e fileExports) Lookup(name string) (*Export, error) {
	if name != "m" {
		return nil, errors.New("no such export")
	}
	return &Export{Name: "m", Backend: e.b}, nil
}

// fileBackend is an export in a file, offering the server every fast
// path: TryReader, FileReader and SpliceWriter.
type fileBackend struct{ f *os.File }

func (b fileBackend) ReadAt(p []byte, off int64) (int, error)  { return b.f.ReadAt(p, off) }
func (b fileBackend) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }
func (b fileBackend) Size() int64                              { return 256 << 10 }
func (b fileBackend) Flush() error                             { return nil }
func (b fileBackend) TryReadAt(p []byte, off int64) (int, bool, error) {
	n, err := b.f.ReadAt(p, off)
	return n, true, err
}
func (b fileBackend) CachedFile(off, n int64) (*os.File, bool) { return b.f, true }
func (b fileBackend) TryWriteFrom(off, n int64, fill func(*os.File, int64) error) (bool, error) {
	return true, fill(b.f, off)
}
