package backup

import (
	"math/rand/v2"
	"runtime"
	"testing"
)

// TestChunkStoreBufferBounded: a store without a filter (an incremental
// of a small change, an open loading the index objects its cache lacks)
// spills its buffer of added entries at smallBufMax, so that the heap
// it holds does not grow with the entries added: 112 Ki entries in
// index-object-sized batches leave it under 4 MiB (the buffer held up
// to 128 Ki entries before it spilled: ~6 MiB here, and twice that
// while merging; the scale benchmark's incremental at 16 Mi chunks
// adds 160 Ki). Every entry is still found, and once a writer's filter
// is built the buffer takes bufMax again.
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
	before := live()
	var sample []indexEntry // a few of each batch, to look up after
	const batch, batches = 1 << 14, 7
	for range batches {
		es := randEntries(r, batch, 32)
		s.addMany(es)
		sample = append(sample, es[:64]...)
	}
	grew := live() - before
	runtime.KeepAlive(s)
	t.Logf("%d entries added: %d in the buffer, %d runs, heap grew %.1f MiB", s.len(), s.buf.len(), len(s.runs), grew)
	if grew > 4 {
		t.Fatalf("%d entries added without a filter: the store holds %.1f MiB of heap (%d entries in its buffer), want under 4 MiB whatever it holds", batch*batches, grew, s.buf.len())
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
