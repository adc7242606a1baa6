package cow

import (
	"bytes"
	"errors"
	"testing"
)

func FuzzDecodeMetaHeader(f *testing.F) {
	f.Add(metaHeader{Version: metaVersion, ChunkSize: 4096, VolSize: 1 << 30, Created: 1}.encode())
	f.Add(make([]byte, metaHeaderSize))
	f.Add([]byte("UMBRAMLG"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeMetaHeader(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if got := h.encode(); !bytes.Equal(got, b[:metaHeaderSize]) {
			t.Fatalf("header does not round-trip")
		}
	})
}

func FuzzDecodeRecord(f *testing.F) {
	for _, r := range []record{
		{Type: recSnapCreate, Gen: 3, Persistent: true, Created: 12345, ID: "snap-3", SetID: "set"},
		{Type: recSnapDelete, Gen: 9},
		{Type: recInvalid, Gen: 2, Reason: "shadow storage full"},
		{Type: recMap, Chunk: 77, Gen: 4, Slot: 12},
		{Type: recMap, Chunk: 78, Gen: 4, Slot: zeroSlot},
		{Type: recUnmap, Chunk: 5, Gen: 1},
		{Type: recCursor, Gen: 1, Chunk: 100},
		{Type: recCBT, Gen: 1, Reliable: true, Bitmap: []byte{58, 48, 0, 0, 0, 0, 0, 0}},
		{Type: recClean},
		{Type: recRevertBegin, Gen: 2},
		{Type: recRevertEnd, Gen: 2},
	} {
		f.Add(r.encode())
	}
	f.Add([]byte{4, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, n, err := decodeRecord(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, errTorn) {
				t.Fatalf("error %v is neither corrupt nor torn", err)
			}
			return
		}
		if n <= 0 || n > len(b) {
			t.Fatalf("decoded length %d of %d bytes", n, len(b))
		}
		// What decodes re-encodes to the same bytes.
		if got := r.encode(); !bytes.Equal(got, b[:n]) {
			t.Fatalf("record %+v does not round-trip", r)
		}
	})
}

// FuzzRecover opens a volume whose meta.log holds arbitrary bytes: it must
// not panic, and the origin must stay readable and writable.
func FuzzRecover(f *testing.F) {
	hdr := metaHeader{Version: metaVersion, ChunkSize: 4096, VolSize: 8 * 4096, Created: 1}.encode()
	var log []byte
	log = append(log, hdr...)
	log = append(log, record{Type: recSnapCreate, Gen: 1, Persistent: true, ID: "a"}.encode()...)
	log = append(log, record{Type: recMap, Chunk: 2, Gen: 1, Slot: 0}.encode()...)
	log = append(log, record{Type: recSnapCreate, Gen: 2, Persistent: false, ID: "b"}.encode()...)
	log = append(log, record{Type: recMap, Chunk: 3, Gen: 2, Slot: 1}.encode()...)
	log = append(log, record{Type: recSnapDelete, Gen: 2}.encode()...)
	log = append(log, record{Type: recCursor, Gen: 1, Chunk: 1}.encode()...)
	log = append(log, record{Type: recRevertBegin, Gen: 1}.encode()...)
	f.Add(log)
	f.Add(append(append([]byte(nil), log...), record{Type: recClean}.encode()...))
	f.Add(hdr)
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ffs := newFaultFS()
		ffs.Put("/o", bytes.Repeat([]byte{7}, 8*4096))
		ffs.Put("/d/v.umbra/meta.log", b)
		ffs.Put("/d/v.umbra/store", make([]byte, 3*4096))
		v, err := Open("v", "/o", Options{StorageDir: "/d", FS: ffs})
		if err != nil {
			return // refused with an error (e.g. another chunk size): fine
		}
		defer v.Close()
		if _, err := v.WriteAt([]byte{1, 2, 3}, 4096*5); err != nil {
			t.Fatalf("origin write after recovery: %v", err)
		}
		buf := make([]byte, 8*4096)
		if _, err := v.ReadAt(buf, 0); err != nil {
			t.Fatalf("origin read after recovery: %v", err)
		}
		for _, s := range v.Snapshots() {
			h, err := v.OpenSnapshot(s.ID)
			if err != nil {
				t.Fatal(err)
			}
			h.ReadAt(buf, 0) // any result but a panic
		}
	})
}
