package nbd

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"umbra/internal/testutil"
)

// serveMem serves exps on a unix socket until the test ends and returns
// a client connection past the greeting (fixed newstyle, no zeroes).
func serveMem(t *testing.T, exps Exports, opts Options) (*Server, func() net.Conn) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(exps, opts)
	done := make(chan struct{})
	go func() { srv.Serve(context.Background(), l); close(done) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	})
	return srv, func() net.Conn {
		t.Helper()
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := io.ReadFull(c, make([]byte, 18)); err != nil {
			t.Fatal(err)
		}
		c.Write([]byte{0, 0, 0, 3})
		return c
	}
}

// goData is the payload of NBD_OPT_GO for export name.
func goData(name string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	return append(append(b, name...), 0, 0)
}

// chunk is one structured reply chunk as read by a test.
type chunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

func readChunk(t *testing.T, c net.Conn) chunk {
	t.Helper()
	h := make([]byte, 20)
	if _, err := io.ReadFull(c, h); err != nil {
		t.Fatalf("reply chunk: %v", err)
	}
	if m := binary.BigEndian.Uint32(h); m != magicStructured {
		t.Fatalf("reply magic %#x, want a structured chunk", m)
	}
	ch := chunk{flags: binary.BigEndian.Uint16(h[4:]), typ: binary.BigEndian.Uint16(h[6:]), cookie: binary.BigEndian.Uint64(h[8:])}
	ch.payload = make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(c, ch.payload); err != nil {
		t.Fatalf("reply chunk payload: %v", err)
	}
	return ch
}

// TestZeroLengthReadChunk: with structured replies a read of 0 bytes is
// answered with one NBD_REPLY_TYPE_NONE chunk (done, length 0), on the
// inline path (even offsets of memBackend) and the handed-off one (odd),
// never with an OFFSET_DATA chunk shorter than 9 bytes.
func TestZeroLengthReadChunk(t *testing.T) {
	_, dial := serveMem(t, memExports{&memBackend{data: make([]byte, 1<<20)}}, Options{})
	c := dial()
	c.SetDeadline(time.Now().Add(testutil.HangGuard))
	if typ := optRoundTrip(t, c, optStructuredReply, nil); typ != repAck {
		t.Fatalf("structured replies: %#x", typ)
	}
	if typ := optRoundTrip(t, c, optGo, goData("m")); typ != repAck {
		t.Fatalf("GO: %#x", typ)
	}
	for i, off := range []uint64{0, 1, 1 << 20} {
		c.Write(request{typ: cmdRead, cookie: uint64(i), offset: off}.encode())
		ch := readChunk(t, c)
		if ch.typ != replyNone || ch.flags != replyFlagDone || len(ch.payload) != 0 || ch.cookie != uint64(i) {
			t.Fatalf("read of 0 bytes at %d: chunk type %d flags %d length %d cookie %d, want NONE, done, 0, %d",
				off, ch.typ, ch.flags, len(ch.payload), ch.cookie, i)
		}
	}
	// The connection is still in step: a 1-byte read gets its data.
	c.Write(request{typ: cmdRead, cookie: 9, offset: 7, length: 1}.encode())
	if ch := readChunk(t, c); ch.typ != replyOffsetData || len(ch.payload) != 9 {
		t.Fatalf("read of 1 byte: chunk type %d length %d", ch.typ, len(ch.payload))
	}
	// Block status of 0 bytes is refused with EINVAL (no descriptor can
	// describe it), not answered with an empty chunk.
	c.Write(request{typ: cmdBlockStatus, cookie: 10, offset: 0}.encode())
	if ch := readChunk(t, c); ch.typ != replyError || binary.BigEndian.Uint32(ch.payload) != errInval {
		t.Fatalf("block status of 0 bytes: chunk type %d payload %x", ch.typ, ch.payload)
	}
}

// TestClipString: messages stay within the protocol's 4096 bytes and
// valid UTF-8.
func TestClipString(t *testing.T) {
	for _, s := range []string{"", "short", strings.Repeat("a", 5000), strings.Repeat("é", 3000), "x" + strings.Repeat("€", 2000)} {
		got := clipString(s)
		if len(got) > maxString || !utf8.ValidString(got) || !strings.HasPrefix(s, got) || (len(s) <= maxString && got != s) {
			t.Errorf("clipString of %d bytes: %d bytes, valid %v", len(s), len(got), utf8.ValidString(got))
		}
	}
}

// longExports has an export whose description (a volume's origin path,
// say) is longer than the protocol's strings may be.
type longExports struct{ memExports }

func (e longExports) Lookup(name string) (*Export, error) {
	x, err := e.memExports.Lookup(name)
	if x != nil {
		x.Description = strings.Repeat("d", 5000)
	}
	return x, err
}

// TestLongDescriptionClipped: NBD_INFO_DESCRIPTION stays within 4096
// bytes.
func TestLongDescriptionClipped(t *testing.T) {
	_, dial := serveMem(t, longExports{memExports{&memBackend{data: make([]byte, 4096)}}}, Options{})
	c := dial()
	c.SetDeadline(time.Now().Add(testutil.HangGuard))
	d := binary.BigEndian.AppendUint32(nil, 1)
	d = append(d, 'm', 0, 1)
	d = binary.BigEndian.AppendUint16(d, infoDescription)
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, optInfo)
	b = binary.BigEndian.AppendUint32(b, uint32(len(d)))
	c.Write(append(b, d...))
	for {
		h := make([]byte, 20)
		if _, err := io.ReadFull(c, h); err != nil {
			t.Fatal(err)
		}
		data := make([]byte, binary.BigEndian.Uint32(h[16:]))
		io.ReadFull(c, data)
		typ := binary.BigEndian.Uint32(h[12:])
		if typ != repInfo {
			if typ != repAck {
				t.Fatalf("INFO answered %#x", typ)
			}
			t.Fatal("no description in the INFO replies")
		}
		if binary.BigEndian.Uint16(data) == infoDescription {
			if len(data)-2 != maxString {
				t.Fatalf("description of %d bytes, want it clipped to %d", len(data)-2, maxString)
			}
			return
		}
	}
}
