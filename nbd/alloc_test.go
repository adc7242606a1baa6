package nbd

import (
	"encoding/binary"
	"io"
	"testing"
)

// TestWriteRepliesAllocateNothing: a 4 KiB write served on the reading
// goroutine allocates nothing in the server, from its request to its
// reply; one handed to a goroutine allocates only that goroutine's
// closure. Under an emulated CPU (bench/vm.sh) every allocation, and the
// garbage collection it brings, is paid per request.
func TestWriteRepliesAllocateNothing(t *testing.T) {
	b := &memBackend{data: make([]byte, 1<<20)}
	_, dial := serveMem(t, memExports{b}, Options{})
	c := dial()
	if typ := optRoundTrip(t, c, optGo, goData("m")); typ != repAck {
		t.Fatalf("GO: %#x", typ)
	}
	req := request{typ: cmdWrite, length: 4096}.encode()
	req = append(req, make([]byte, 4096)...)
	var rep [16]byte
	roundTrip := func(off uint64) func() {
		return func() {
			binary.BigEndian.PutUint64(req[16:], off) // memBackend: even inline, odd handed
			if _, err := c.Write(req); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, rep[:]); err != nil {
				t.Fatal(err)
			}
			if errno := binary.BigEndian.Uint32(rep[4:]); errno != 0 {
				t.Fatalf("write at %d failed: NBD error %d", off, errno)
			}
		}
	}
	if n := testing.AllocsPerRun(200, roundTrip(8192)); n != 0 {
		t.Errorf("a write served inline allocated %v times, want 0", n)
	}
	if n := testing.AllocsPerRun(200, roundTrip(8193)); n > 1 {
		t.Errorf("a write handed to a goroutine allocated %v times, want at most 1 (the goroutine's closure)", n)
	}
}
