package backup

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"path/filepath"
	"runtime"
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

// TestPutObjectOneBuffer: a metadata object is compressed, sealed and
// wrapped in one buffer, not copied at each step (three copies of ~5
// MiB for each of prune's index objects, 128 of them at 16 Mi chunks),
// and reads back, unencrypted and encrypted.
func TestPutObjectOneBuffer(t *testing.T) {
	ctx := context.Background()
	rnd := rand.New(rand.NewPCG(43, 44))
	raw := make([]byte, 1<<20) // an index's hashes do not compress
	for i := range raw {
		raw[i] = byte(rnd.Uint32())
	}
	for _, pw := range []string{"", "secret"} {
		r, err := InitWith(ctx, filepath.Join(t.TempDir(), "repo"), Settings{Password: pw})
		if err != nil {
			t.Fatal(err)
		}
		r.putObject(ctx, "index/warm", raw) // the codecs' own first allocations
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		if err := r.putObject(ctx, "index/x", raw); err != nil {
			t.Fatal(err)
		}
		runtime.ReadMemStats(&after)
		if got := after.TotalAlloc - before.TotalAlloc; got > uint64(len(raw))*3/2 {
			t.Errorf("password %q: storing a %d-byte object allocated %d bytes: want under 1.5 times it (one buffer)", pw, len(raw), got)
		}
		back, err := r.getObject(ctx, "index/x")
		if err != nil || !bytes.Equal(back, raw) {
			t.Fatalf("password %q: read back %d bytes, %v", pw, len(back), err)
		}
		r.Close()
	}
}

// TestIndexWriterReusesMemory: prune's index writer keeps its entries'
// memory from object to object (128 objects of 128 Ki entries at 16 Mi
// chunks; a map of a slice a pack, grown by appending, was made again
// for each, ~6 MiB and as much again let go), and writes each object's
// packs in ID order and their entries by place.
func TestIndexWriterReusesMemory(t *testing.T) {
	defer func(n int) { indexEveryChunks = n }(indexEveryChunks)
	indexEveryChunks = 4096
	r := rand.New(rand.NewPCG(47, 48))
	pids := make([]PackID, 50)
	for i := range pids {
		for j := range pids[i] {
			pids[i][j] = byte(r.Uint32())
		}
	}
	objects := 0
	w := &indexWriter{write: func(ps []packBlobs) error {
		objects++
		n := 0
		for i, p := range ps {
			if i > 0 && bytes.Compare(ps[i-1].ID[:], p.ID[:]) >= 0 {
				t.Fatalf("object %d: packs out of order", objects)
			}
			for j, b := range p.Blobs {
				if j > 0 && (p.Blobs[j-1].Off > b.Off || p.Blobs[j-1].Off == b.Off && p.Blobs[j-1].RawOff >= b.RawOff) {
					t.Fatalf("object %d: entries out of place order", objects)
				}
				if pids[b.Raw] != p.ID {
					t.Fatalf("object %d: an entry of pack %d under another", objects, b.Raw)
				}
			}
			n += len(p.Blobs)
		}
		if n != indexEveryChunks {
			t.Fatalf("object %d: %d entries, want %d", objects, n, indexEveryChunks)
		}
		return nil
	}}
	add := func(k int) {
		for i := range k {
			p := r.IntN(len(pids))
			w.add(pids[p], blobEntry{Off: uint32(r.IntN(1 << 20)), RawOff: uint32(i), Raw: uint32(p)})
		}
	}
	add(indexEveryChunks) // the first object grows the writer's memory
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	add(16 * indexEveryChunks)
	runtime.ReadMemStats(&after)
	if err := w.finish(); err != nil {
		t.Fatal(err)
	}
	if objects != 17 {
		t.Fatalf("%d objects, want 17", objects)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 64<<10 {
		t.Fatalf("16 more objects of %d entries allocated %d bytes: want under 64 KiB (the entries' memory kept)", indexEveryChunks, got)
	}
}

// wordVolume is a volume whose every 8-byte word is its offset: each
// 4 KiB chunk unique, and compressible.
type wordVolume int64

func (v wordVolume) Size() int64 { return int64(v) }
func (v wordVolume) ReadAt(b []byte, off int64) (int, error) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.BigEndian.PutUint64(b[i:], uint64(off)+uint64(i))
	}
	return len(b), nil
}

// TestPruneIndexObjectsSmall: prune writes the new index as objects of
// at most pruneIndexEvery entries (a quarter of a backup's): what it
// holds to write one (its entries, encoded, compressed) was its peak,
// ~20 MiB at 128 Ki entries; and every chunk is in one of them.
func TestPruneIndexObjectsSmall(t *testing.T) {
	defer func(n int) { indexEveryChunks = n }(indexEveryChunks)
	indexEveryChunks = 1 << 20 // the backup writes one object
	ctx := context.Background()
	r, err := InitWith(ctx, filepath.Join(t.TempDir(), "repo"), Settings{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	const chunks = 40 << 10
	if _, _, err := r.Backup(ctx, wordVolume(chunks*4096), Options{Volume: "v"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Prune(ctx, Policy{Last: 1}, false); err != nil {
		t.Fatal(err)
	}
	names, err := r.be.List(ctx, "index/")
	if err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, n := range names {
		b, err := r.getObject(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		ps, err := decodeChunkIndex(b, r.hashLen())
		if err != nil {
			t.Fatal(err)
		}
		k := 0
		for _, p := range ps {
			k += len(p.Blobs)
		}
		if k > 1<<15 {
			t.Fatalf("prune wrote an index object of %d entries: want at most %d", k, 1<<15)
		}
		total += k
	}
	if total != chunks {
		t.Fatalf("prune's index holds %d entries, want %d", total, chunks)
	}
}
