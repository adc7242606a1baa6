package backup

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func sampleBlobs() []blobEntry {
	return []blobEntry{{Hash: Hash{1}, Off: 0, Len: 10, Raw: 4096}, {Hash: Hash{2, 3}, Off: 10, Len: 7, Raw: 100}}
}

// sampleRuns: two blobs, the first with a run of three full chunks and a
// short one, as a backup of a volume's end writes them.
func sampleRuns() []blobEntry {
	return []blobEntry{
		{Off: 0, Len: 10, RawOff: 0, Raw: 4096}, {Off: 0, Len: 10, RawOff: 4096, Raw: 4096},
		{Off: 0, Len: 10, RawOff: 8192, Raw: 4096}, {Off: 0, Len: 10, RawOff: 12288, Raw: 100},
		{Off: 10, Len: 7, RawOff: 0, Raw: 4096},
	}
}

func FuzzDecodePackTrailer(f *testing.F) {
	f.Add(encodePackTrailer(sampleRuns()), int64(17))
	f.Add(encodePackTrailerV1(sampleBlobs()), int64(17))
	f.Add(encodePackTrailer(nil), int64(0))
	f.Add([]byte(packMagic), int64(5))
	f.Fuzz(func(t *testing.T, b []byte, packLen int64) {
		ents, hashed, err := decodePackTrailer(b, packLen)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		for _, e := range ents {
			if int64(e.Off)+int64(e.Len) > packLen {
				t.Fatal("accepted a blob outside the pack")
			}
			if !hashed && (e.Raw == 0 || uint64(e.RawOff)+uint64(e.Raw) > maxDecoded) {
				t.Fatalf("accepted a chunk at %d+%d of its blob", e.RawOff, e.Raw)
			}
		}
		enc := encodePackTrailer
		if hashed {
			enc = encodePackTrailerV1
		}
		if !bytes.Equal(enc(ents), b) {
			t.Fatal("trailer does not round-trip")
		}
	})
}

// TestPackTrailerV2: entries round-trip through the version 2 trailer
// (hashes aside) in two blobs and two runs, in 24 + 12 bytes a blob and
// run instead of 48 a chunk.
func TestPackTrailerV2(t *testing.T) {
	in := sampleRuns()
	b := encodePackTrailer(in)
	ents, hashed, err := decodePackTrailer(b, 17)
	if err != nil || hashed {
		t.Fatalf("decode: %v (hashed %v)", err, hashed)
	}
	if !slices.Equal(ents, in) {
		t.Fatalf("decoded %+v, want %+v", ents, in)
	}
	if want := 14 + 2*12 + 3*12 + 4; len(b) != want {
		t.Fatalf("trailer of 2 blobs, 3 runs is %d bytes, want %d", len(b), want)
	}
	if _, _, err := decodePackTrailer(b, 16); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a blob past the pack's end: %v", err)
	}
}

func FuzzDecodeChunkIndex(f *testing.F) {
	f.Add(encodeChunkIndex([]packBlobs{{ID: PackID{9}, Blobs: sampleBlobs()}, {ID: PackID{8}}}))
	f.Add(encodeChunkIndex(nil))
	f.Add([]byte(cidxMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		packs, err := decodeChunkIndex(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if !bytes.Equal(encodeChunkIndex(packs), b) {
			t.Fatal("chunk index does not round-trip")
		}
	})
}

// TestWriteSeedCorpus refreshes the committed seed corpora from valid
// encodings when UMBRA_WRITE_CORPUS=1.
func TestWriteSeedCorpus(t *testing.T) {
	if os.Getenv("UMBRA_WRITE_CORPUS") == "" {
		t.Skip("set UMBRA_WRITE_CORPUS=1 to rewrite testdata/fuzz seeds")
	}
	write := func(fuzz, name, body string) {
		d := filepath.Join("testdata", "fuzz", fuzz)
		os.MkdirAll(d, 0o755)
		os.WriteFile(filepath.Join(d, name), []byte("go test fuzz v1\n"+body), 0o644)
	}
	tr := encodePackTrailerV1(sampleBlobs())
	write("FuzzDecodePackTrailer", "valid", fmt.Sprintf("[]byte(%q)\nint64(17)\n", tr))
	write("FuzzDecodePackTrailer", "short-pack", fmt.Sprintf("[]byte(%q)\nint64(16)\n", tr))
	tr = encodePackTrailer(sampleRuns())
	write("FuzzDecodePackTrailer", "valid-v2", fmt.Sprintf("[]byte(%q)\nint64(17)\n", tr))
	write("FuzzDecodePackTrailer", "short-pack-v2", fmt.Sprintf("[]byte(%q)\nint64(16)\n", tr))
	ci := encodeChunkIndex([]packBlobs{{ID: PackID{9}, Blobs: sampleBlobs()}})
	write("FuzzDecodeChunkIndex", "valid", fmt.Sprintf("[]byte(%q)\n", ci))
	write("FuzzDecodeChunkIndex", "truncated", fmt.Sprintf("[]byte(%q)\n", ci[:len(ci)-9]))
	x := &Index{ID: "v-1", Volume: "v", Snapshot: "s", Size: 3*4096 + 5, ChunkSize: 4096, Chunks: make([]Hash, 4)}
	x.Chunks[1][0] = 7
	write("FuzzDecodeIndex", "valid-v2", fmt.Sprintf("[]byte(%q)\n", x.Encode()))
	seg := &Index{ID: "v-1", Volume: "v", Snapshot: "s", Size: 9*4096 + 5, ChunkSize: 4096, First: 4, Chunks: make([]Hash, 3)}
	seg.Chunks[2][0] = 7
	write("FuzzDecodeIndex", "valid-v3-segment", fmt.Sprintf("[]byte(%q)\n", seg.Encode()))
	seg.First, seg.format = 0, 3
	write("FuzzDecodeIndex", "valid-v3-first-segment", fmt.Sprintf("[]byte(%q)\n", seg.Encode()))
}

// FuzzImageRecord: whatever an image record's JSON says, checkRecord
// either refuses it or leaves chunk and segment arithmetic that cannot
// fault: every chunk falls in a listed segment.
func FuzzImageRecord(f *testing.F) {
	for _, x := range []Index{
		{ID: "v-1", Volume: "v", Size: 1 << 20, ChunkSize: 4096, Segments: []Hash{{1}}, SegmentChunks: 1 << 16},
		{ID: "v-1", Size: 3 * 4096, ChunkSize: 4096, Segments: []Hash{{1}, {2}}, SegmentChunks: 2},
		{ID: "v-1", Size: 0, ChunkSize: 4096, SegmentChunks: 1 << 16},
		{ID: "v-1", Size: 1 << 62, ChunkSize: 4096, ListHash: Hash{3}},
		{ID: "v-1", Size: 4096, ChunkSize: 4096, Segments: []Hash{}, SegmentChunks: 0},
	} {
		b, _ := json.Marshal(x)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var x Index
		if json.Unmarshal(b, &x) != nil || x.checkRecord(4096) != "" {
			return
		}
		n := x.NumChunks()
		if n < 0 {
			t.Fatalf("accepted a record of %d chunks", n)
		}
		if n > 0 && x.segmentOf(n-1) >= x.numSegments() {
			t.Fatalf("chunk %d is in segment %d of %d", n-1, x.segmentOf(n-1), x.numSegments())
		}
	})
}
