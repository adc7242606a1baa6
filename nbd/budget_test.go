package nbd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"umbra/internal/testutil"
)

// waitFor polls cond until it holds; the deadline only turns a server
// that never gets there into a failure instead of a hang.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
	}
}

// TestStalledReaderBounded: a client that sends many large READ requests
// and never reads a reply makes the connection stop reading requests once
// ConnBuffer bytes of replies wait; what it holds stays within the budget
// (with and without structured replies), and every reply arrives once the
// client reads.
func TestStalledReaderBounded(t *testing.T) {
	const budget = MinConnBuffer // 32 MiB + 4 KiB
	const size = 4 << 20         // 4 MiB reads (not inline; pooled buffers are not used above 1 MiB)
	const reads = 16             // 64 MiB asked for
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprint("structured=", structured), func(t *testing.T) {
			b := &memBackend{data: make([]byte, 20<<20)}
			for i := 0; i < len(b.data); i += 1 << 20 {
				copy(b.data[i:], bytes.Repeat([]byte{byte(i >> 20)}, 1<<20))
			}
			srv, dial := serveMem(t, memExports{b}, Options{ConnBuffer: budget})
			c := dial()
			c.SetDeadline(time.Now().Add(2 * time.Minute))
			if structured {
				if typ := optRoundTrip(t, c, optStructuredReply, nil); typ != repAck {
					t.Fatalf("structured replies: %#x", typ)
				}
			}
			if typ := optRoundTrip(t, c, optGo, goData("m")); typ != repAck {
				t.Fatalf("GO: %#x", typ)
			}
			var reqs []byte
			for i := range reads {
				// Odd offsets: the handed-off (buffered) path, not inline.
				reqs = append(reqs, request{typ: cmdRead, cookie: uint64(i), offset: uint64(i%15)<<20 + 1, length: size}.encode()...)
			}
			if _, err := c.Write(reqs); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the connection waits for its client", func() bool { return srv.BufferStats().Waiting == 1 })
			if st := srv.BufferStats(); st.PeakConn > budget || st.Held > budget {
				t.Fatalf("connection held %d bytes at most (%d now), budget %d", st.PeakConn, st.Held, budget)
			}
			// Every reply arrives, whole and right.
			for range reads {
				var cookie uint64
				var data []byte
				if structured {
					ch := readChunk(t, c)
					if ch.typ != replyOffsetData {
						t.Fatalf("reply chunk type %d", ch.typ)
					}
					cookie, data = ch.cookie, ch.payload[8:]
				} else {
					h := make([]byte, 16)
					if _, err := io.ReadFull(c, h); err != nil {
						t.Fatal(err)
					}
					cookie, data = binary.BigEndian.Uint64(h[8:]), make([]byte, size)
					if _, err := io.ReadFull(c, data); err != nil {
						t.Fatal(err)
					}
				}
				off := int(cookie%15)<<20 + 1
				if len(data) != size || data[0] != b.data[off] || data[size-1] != b.data[off+size-1] {
					t.Fatalf("reply %d: %d bytes, wrong data", cookie, len(data))
				}
			}
			waitFor(t, "the budget comes back", func() bool { return srv.BufferStats().Held == 0 })
			if st := srv.BufferStats(); st.PeakConn > budget {
				t.Fatalf("connection held %d bytes at most, budget %d", st.PeakConn, budget)
			}
		})
	}
}

// gatedBackend is a memBackend whose writes wait until gate is closed,
// as writes wait for a hold.
type gatedBackend struct {
	memBackend
	gate chan struct{}
}

func (g *gatedBackend) WriteAt(p []byte, off int64) (int, error) {
	<-g.gate
	return g.memBackend.WriteAt(p, off)
}

type gatedExports struct{ b *gatedBackend }

func (e gatedExports) List() []string { return []string{"m"} }
func (e gatedExports) Lookup(name string) (*Export, error) {
	return &Export{Name: "m", Backend: e.b}, nil
}

// TestWaitingWritesBounded: write payloads waiting for the export (a
// hold) count against the same budget: the connection stops reading
// requests instead of holding every payload the client sends.
func TestWaitingWritesBounded(t *testing.T) {
	const budget = MinConnBuffer
	const size = 4 << 20
	const writes = 16 // 64 MiB sent
	g := &gatedBackend{memBackend: memBackend{data: make([]byte, 20<<20)}, gate: make(chan struct{})}
	srv, dial := serveMem(t, gatedExports{g}, Options{ConnBuffer: budget})
	c := dial()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	if typ := optRoundTrip(t, c, optGo, goData("m")); typ != repAck {
		t.Fatalf("GO: %#x", typ)
	}
	sent := make(chan error, 1)
	go func() {
		payload := make([]byte, size)
		for i := range writes {
			payload[0] = byte(i)
			if _, err := c.Write(append(request{typ: cmdWrite, cookie: uint64(i), offset: uint64(i%16) << 20, length: size}.encode(), payload...)); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	waitFor(t, "the connection waits for its writes", func() bool { return srv.BufferStats().Waiting == 1 })
	if st := srv.BufferStats(); st.PeakConn > budget {
		t.Fatalf("connection held %d bytes of write payloads at most, budget %d", st.PeakConn, budget)
	}
	close(g.gate)
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	h := make([]byte, 16)
	for range writes {
		if _, err := io.ReadFull(c, h); err != nil {
			t.Fatal(err)
		}
		if errno := binary.BigEndian.Uint32(h[4:]); errno != 0 {
			t.Fatalf("write %d: errno %d", binary.BigEndian.Uint64(h[8:]), errno)
		}
	}
	if st := srv.BufferStats(); st.PeakConn > budget {
		t.Fatalf("connection held %d bytes at most, budget %d", st.PeakConn, budget)
	}
}

// TestMaxConns: past MaxConns a connection is closed at once; those
// being served go on.
func TestMaxConns(t *testing.T) {
	_, dial := serveMem(t, memExports{&memBackend{data: make([]byte, 1<<20)}}, Options{MaxConns: 2})
	a, b := dial(), dial()
	for _, c := range []net.Conn{a, b} {
		c.SetDeadline(time.Now().Add(testutil.HangGuard))
		if typ := optRoundTrip(t, c, optGo, goData("m")); typ != repAck {
			t.Fatalf("GO: %#x", typ)
		}
	}
	c, err := net.Dial("unix", a.RemoteAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(testutil.HangGuard))
	if n, err := io.ReadFull(c, make([]byte, 18)); err == nil {
		t.Fatalf("a third connection got the greeting (%d bytes); want it closed", n)
	}
	a.Write(request{typ: cmdFlush, cookie: 1}.encode())
	h := make([]byte, 16)
	if _, err := io.ReadFull(a, h); err != nil || binary.BigEndian.Uint32(h[4:]) != 0 {
		t.Fatalf("flush on a served connection: %v %x", err, h)
	}
}
