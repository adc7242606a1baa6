package backup

import (
	"math/rand/v2"
	"runtime"
	"testing"
)

// TestChunkStoreBufferBounded: a store without a filter (an incremental
// of a small change, an open loading the index objects its cache lacks)
// spills its buffer of added entries at smallBufMax and writes a batch
// of an index object's size as a run of its own, so that the heap it
// holds does not grow with the entries added: 112 Ki entries in
// batches of 16 Ki leave it under 4 MiB (the buffer held up to 128 Ki
// entries before it spilled: ~7 MiB here, and twice that while
// merging; the scale benchmark's incremental at 16 Mi chunks adds 160
// Ki) and allocate under 100 bytes an entry. Every entry is still
// found, and once a writer's filter is built the buffer takes bufMax
// again.
func TestChunkStoreBufferBounded(t *testing.T) {
	live := func() float64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return float64(ms.HeapAlloc) / (1 << 20)
	}
	r := rand.New(rand.NewPCG(31, 32))
	s := newChunkStore(32, t.TempDir())
	defer s.close()
	const batch, batches = 1 << 14, 7
	var sample []indexEntry // a few of each batch, to look up after
	ess := make([][]indexEntry, batches)
	for i := range ess {
		ess[i] = randEntries(r, batch, 32)
		sample = append(sample, ess[i][:64]...)
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	before, alloc0 := live(), ms.TotalAlloc
	for _, es := range ess {
		s.addMany(es)
	}
	runtime.ReadMemStats(&ms)
	perEntry := float64(ms.TotalAlloc-alloc0) / (batch * batches)
	grew := live() - before
	runtime.KeepAlive(s)
	runtime.KeepAlive(ess)
	t.Logf("%d entries added: %d in the buffer, %d runs, heap grew %.1f MiB, %.0f bytes allocated an entry", s.len(), s.buf.len(), len(s.runs), grew, perEntry)
	if grew > 4 {
		t.Fatalf("%d entries added without a filter: the store holds %.1f MiB of heap (%d entries in its buffer), want under 4 MiB whatever it holds", batch*batches, grew, s.buf.len())
	}
	// Batches of an index object's size go straight into runs (53
	// bytes an entry allocated, the runs' write buffers): through the
	// buffer's map and the array it was sorted into to spill, 522.
	if perEntry > 100 {
		t.Fatalf("adding %d entries in batches of %d allocated %.0f bytes an entry, want under 100 (a batch is sorted in place and written as a run)", batch*batches, batch, perEntry)
	}
	if s.len() != batch*batches {
		t.Fatalf("%d entries, want %d", s.len(), batch*batches)
	}
	for _, e := range sample {
		if l, ok := s.get(e.h); !ok || l != e.l {
			t.Fatalf("get: %v %v, want %v", l, ok, e.l)
		}
	}
	if err := s.failed(); err != nil {
		t.Fatal(err)
	}

	// A writer whose filter is built (many misses) keeps the larger
	// buffer: fewer spills and merges for a full backup.
	defer set(&minFilterAfter, 0)()
	defer set(&filterAfter, 1<<62)()
	defer s.useFilter()()
	s.get(Hash{1}) // a miss builds the filter
	if s.filt == nil {
		t.Fatal("no filter after a miss")
	}
	s.addMany(randEntries(r, 2*smallBufMax, 32))
	if s.buf.len() < 2*smallBufMax {
		t.Fatalf("%d entries in a writer's buffer after %d added, want them all (bufMax %d)", s.buf.len(), 2*smallBufMax, bufMax)
	}
}
