package backup

import (
	"math/rand/v2"
	"testing"
)

// TestEncodeChunkIndexAllocatesOnce: an index object is encoded into
// one buffer of its size, for both hash lengths (appending into a
// growing one allocated it ~20 times and left as much again as
// garbage: 6.6 MiB for one of prune's 128 Ki-entry objects), and
// decodes to what was encoded.
func TestEncodeChunkIndexAllocatesOnce(t *testing.T) {
	r := rand.New(rand.NewPCG(41, 42))
	for _, hashBytes := range []int{32, 16} {
		var packs []packBlobs
		for range 5 {
			p := packBlobs{}
			for i := range p.ID {
				p.ID[i] = byte(r.Uint32())
			}
			for range 100 + r.IntN(1000) {
				var e blobEntry
				for i := range hashBytes {
					e.Hash[i] = byte(r.Uint32())
				}
				e.Off, e.Len, e.RawOff, e.Raw = r.Uint32(), r.Uint32(), r.Uint32(), r.Uint32()
				p.Blobs = append(p.Blobs, e)
			}
			packs = append(packs, p)
		}
		var b []byte
		if n := testing.AllocsPerRun(3, func() { b = encodeChunkIndex(packs, hashBytes) }); n != 1 {
			t.Fatalf("%d-byte hashes: %v allocations to encode an index object, want 1", hashBytes, n)
		}
		if len(b) != cap(b) {
			t.Fatalf("%d-byte hashes: %d bytes encoded in a buffer of %d", hashBytes, len(b), cap(b))
		}
		got, err := decodeChunkIndex(b, hashBytes)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(packs) {
			t.Fatalf("%d packs decoded, want %d", len(got), len(packs))
		}
		for i := range packs {
			if got[i].ID != packs[i].ID || len(got[i].Blobs) != len(packs[i].Blobs) {
				t.Fatalf("pack %d decoded differently", i)
			}
			for j, e := range packs[i].Blobs {
				if got[i].Blobs[j] != e {
					t.Fatalf("pack %d entry %d: %+v, want %+v", i, j, got[i].Blobs[j], e)
				}
			}
		}
	}
}
