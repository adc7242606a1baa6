package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
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
	f.Fuzz(func(t *testing.T, in []byte) {
		srv := NewServer(memExports{&memBackend{data: make([]byte, 4096)}}, Options{})
		a, b := net.Pipe()
		c := &conn{srv: srv, nc: a, log: srv.log}
		done := make(chan struct{})
		go func() { c.serve(); close(done) }()
		go io.Copy(io.Discard, b)
		b.SetWriteDeadline(time.Now().Add(2 * time.Second))
		b.Write(in)
		b.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("server connection hung on closed input")
		}
		_ = context.Background
	})
}
