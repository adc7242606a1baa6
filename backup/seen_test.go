package backup

import (
	"context"
	"encoding/binary"
	"path/filepath"
	"runtime"
	"testing"
	"unsafe"
)

// TestUploaderSeenBounded: the set of chunks a backup stored that no
// index object names yet holds, after each index object, only what is
// still on its way: after many index objects of 64 Ki chunks each, the
// heap it keeps is a few KiB, not the room of the most it ever held
// (a Go map keeps that after its entries are deleted).
func TestUploaderSeenBounded(t *testing.T) {
	ctx := context.Background()
	r, err := Init(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer r.chunks.useFilter()()
	u := r.newUploader(ctx)
	defer u.abort()
	u.every = 1 // an index object for every pack
	const per = 64 << 10
	heap := func() float64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return float64(ms.HeapInuse) / (1 << 20)
	}
	for round := range 8 {
		var p packBlobs
		p.ID[0], p.ID[1] = byte(round), 1
		for i := range per {
			var e blobEntry
			binary.LittleEndian.PutUint64(e.Hash[:], uint64(round*per+i)*0x9e3779b97f4a7c15)
			binary.LittleEndian.PutUint64(e.Hash[8:], uint64(round*per+i))
			e.Len, e.Raw, e.RawOff = 100, 4096, uint32(i%64)*4096
			u.mark(e.Hash)
			p.Blobs = append(p.Blobs, e)
		}
		u.mu.Lock()
		u.done, u.doneChunks = append(u.done, p), per
		u.mu.Unlock()
		if err := u.flushIndex(ctx, false); err != nil {
			t.Fatal(err)
		}
		if len(u.seen) != 0 {
			t.Fatalf("round %d: %d chunks left in the set, all were indexed", round, len(u.seen))
		}
	}
	// What the set holds: the heap it frees.
	held := heap()
	u.seen = nil
	freed := held - heap()
	runtime.KeepAlive(u)
	t.Logf("the set holds %.2f MiB after 8 index objects of %d chunks", freed, per)
	if freed > 0.5 {
		t.Fatalf("after 8 index objects of %d chunks each, none left unindexed, the set of chunks not yet indexed holds %.1f MiB: the room of its most", per, freed)
	}
}

// TestUploaderEntriesKeepRoom: a pack's entry list is made once, with
// the room the last pack's took, not grown by appending from nothing
// (each step a new array and a copy: ~5 times the entries' size
// allocated for every pack: 4.0 times here before, 1.1 after).
func TestUploaderEntriesKeepRoom(t *testing.T) {
	defer set(&maxPackEntries, 8192)()
	ctx := context.Background()
	r, err := Init(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	u := r.newUploader(ctx)
	defer u.abort()
	const perBlob, packs = 256, 8
	blob := make([]byte, 64)
	ents := make([]blobEntry, perBlob)
	n := 0
	fill := func() {
		for range maxPackEntries / perBlob {
			for i := range ents {
				binary.LittleEndian.PutUint64(ents[i].Hash[:], uint64(n)*0x9e3779b97f4a7c15)
				ents[i].RawOff, ents[i].Raw = uint32(i)*4096, 4096
				n++
			}
			if err := u.add(blob, ents); err != nil {
				t.Fatal(err)
			}
		}
	}
	fill() // the first pack finds the room
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	for range packs {
		fill()
	}
	runtime.ReadMemStats(&m1)
	if len(u.done) < packs {
		t.Fatalf("%d packs cut, want %d", len(u.done), packs)
	}
	size := uint64(maxPackEntries) * uint64(unsafe.Sizeof(blobEntry{}))
	per := (m1.TotalAlloc - m0.TotalAlloc) / packs
	t.Logf("%d bytes allocated a pack of %d entries (%d bytes of entries)", per, maxPackEntries, size)
	if per > 2*size {
		t.Fatalf("%d bytes allocated a pack of %d entries: want at most twice their %d bytes", per, maxPackEntries, size)
	}
}
