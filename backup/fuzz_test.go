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

// FuzzDecodeChunkIndex decodes as a repository of 32-byte hashes would
// (version 1), then of 16-byte ones (version 2): at most one accepts, and
// what it accepts round-trips.
func FuzzDecodeChunkIndex(f *testing.F) {
	for _, n := range []int{32, 16} {
		f.Add(encodeChunkIndex([]packBlobs{{ID: PackID{9}, Blobs: sampleBlobs()}, {ID: PackID{8}}}, n))
		f.Add(encodeChunkIndex(nil, n))
	}
	f.Add([]byte(cidxMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		accepted := 0
		for _, n := range []int{32, 16} {
			packs, err := decodeChunkIndex(b, n)
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("error %v does not wrap ErrCorrupt", err)
				}
				continue
			}
			accepted++
			for _, p := range packs {
				for _, e := range p.Blobs {
					if n == 16 && [16]byte(e.Hash[16:]) != [16]byte{} {
						t.Fatal("a 16-byte index gave a 32-byte hash")
					}
				}
			}
			if !bytes.Equal(encodeChunkIndex(packs, n), b) {
				t.Fatalf("chunk index (%d-byte hashes) does not round-trip", n)
			}
		}
		if accepted > 1 {
			t.Fatal("one index accepted for both hash lengths")
		}
	})
}

// TestChunkIndexV2: a 16-byte repository's index round-trips, takes 16
// bytes of hash and 16 of place a chunk, and neither length reads the
// other's.
func TestChunkIndexV2(t *testing.T) {
	in := []packBlobs{{ID: PackID{9}, Blobs: sampleBlobs()}, {ID: PackID{8}, Blobs: sampleBlobs()[:1]}}
	b := encodeChunkIndex(in, 16)
	if want := 8 + 2 + 1 + 4 + 2*36 + 3*32 + 4; len(b) != want {
		t.Fatalf("index of 3 chunks in 2 packs is %d bytes, want %d", len(b), want)
	}
	out, err := decodeChunkIndex(b, 16)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 || !slices.Equal(out[0].Blobs, in[0].Blobs) || !slices.Equal(out[1].Blobs, in[1].Blobs) {
		t.Fatalf("decoded %+v, want %+v", out, in)
	}
	if _, err := decodeChunkIndex(b, 32); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a 16-byte index in a 32-byte repository: %v", err)
	}
	if _, err := decodeChunkIndex(encodeChunkIndex(in, 32), 16); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a 32-byte index in a 16-byte repository: %v", err)
	}
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
	ci := encodeChunkIndex([]packBlobs{{ID: PackID{9}, Blobs: sampleBlobs()}}, 32)
	write("FuzzDecodeChunkIndex", "valid", fmt.Sprintf("[]byte(%q)\n", ci))
	write("FuzzDecodeChunkIndex", "truncated", fmt.Sprintf("[]byte(%q)\n", ci[:len(ci)-9]))
	ci = encodeChunkIndex([]packBlobs{{ID: PackID{9}, Blobs: sampleBlobs()}, {ID: PackID{7}, Blobs: sampleRuns()}}, 16)
	write("FuzzDecodeChunkIndex", "valid-v2", fmt.Sprintf("[]byte(%q)\n", ci))
	write("FuzzDecodeChunkIndex", "truncated-v2", fmt.Sprintf("[]byte(%q)\n", ci[:len(ci)-9]))
	x := &Image{ID: "v-1", Volume: "v", Snapshot: "s", Size: 3*4096 + 5, ChunkSize: 4096, Chunks: make([]Hash, 4)}
	x.Chunks[1][0] = 7
	write("FuzzDecodeChunkList", "valid-v2", fmt.Sprintf("[]byte(%q)\n", x.EncodeChunkList()))
	seg := &Image{ID: "v-1", Volume: "v", Snapshot: "s", Size: 9*4096 + 5, ChunkSize: 4096, First: 4, Chunks: make([]Hash, 3)}
	seg.Chunks[2][0] = 7
	write("FuzzDecodeChunkList", "valid-v3-segment", fmt.Sprintf("[]byte(%q)\n", seg.EncodeChunkList()))
	seg.First, seg.format = 0, 3
	write("FuzzDecodeChunkList", "valid-v3-first-segment", fmt.Sprintf("[]byte(%q)\n", seg.EncodeChunkList()))
	seg.First, seg.format = 4, 4
	write("FuzzDecodeChunkList", "valid-v4-segment", fmt.Sprintf("[]byte(%q)\n", seg.EncodeChunkList()))
}

// FuzzImageRecord: whatever an image record's JSON says, checkRecord
// either refuses it or leaves chunk and segment arithmetic that cannot
// fault: every chunk falls in a listed segment.
func FuzzImageRecord(f *testing.F) {
	for _, x := range []Image{
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
		var x Image
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

func FuzzDecodePatch(f *testing.F) {
	p := &segPatch{chunkSize: 4096, size: 1 << 30, first: 65536, count: 65536, base: Hash{9},
		ents: []patchEntry{{3, Hash{1, 2}}, {4, Hash{}}, {65535, Hash{7}}}}
	f.Add(encodePatch(p, 32), 32)
	f.Add(encodePatch(p, 16), 16)
	f.Add(encodePatch(&segPatch{chunkSize: 4096, size: 4096, count: 1}, 16), 16)
	f.Add([]byte(patchMagic), 32)
	f.Fuzz(func(t *testing.T, b []byte, hashBytes int) {
		if hashBytes != 16 {
			hashBytes = 32
		}
		p, err := decodePatch(b, hashBytes)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		for i, e := range p.ents {
			if int64(e.at) >= p.count || i > 0 && e.at <= p.ents[i-1].at {
				t.Fatalf("accepted entry %d at %d of %d", i, e.at, p.count)
			}
		}
		if !bytes.Equal(encodePatch(p, hashBytes), b) {
			t.Fatal("patch does not round-trip")
		}
	})
}
