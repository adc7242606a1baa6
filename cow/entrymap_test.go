package cow

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/google/btree"
)

// TestEntryMapModel runs random inserts (single and runs, over existing
// keys too), deletes, lookups and walks (from random pivots, stopped at
// random points) on an entryMap and on a plain B-tree of entries, and
// compares every answer; after every change it checks the leaves'
// invariants. Seeds are logged so a failure replays.
func TestEntryMapModel(t *testing.T) {
	for seed := uint64(1); seed <= 6; seed++ {
		r := rand.New(rand.NewPCG(seed, 77))
		m := newEntryMap()
		ref := btree.NewG(8, entryLess)
		chunks := uint64(16 + r.IntN(2000))
		key := func() entry { return entry{chunk: r.Uint64N(chunks), gen: 1 + r.Uint64N(6)} }
		for step := 0; step < 1500; step++ {
			switch op := r.IntN(10); {
			case op < 3:
				e := key()
				e.slot = r.Int64N(1 << 20)
				m.ReplaceOrInsert(e)
				ref.ReplaceOrInsert(e)
			case op < 5:
				// A run: consecutive chunks of one generation, as a first write does.
				c0, gen := r.Uint64N(chunks), 1+r.Uint64N(6)
				n := 1 + r.IntN(300)
				var run []entry
				for c := c0; c < c0+uint64(n); c++ {
					e := entry{chunk: c, gen: gen, slot: r.Int64N(1 << 20)}
					run = append(run, e)
					ref.ReplaceOrInsert(e)
				}
				m.insertRun(run)
			case op < 8:
				k := key()
				if r.IntN(2) == 0 && ref.Len() > 0 { // a key that is there
					i := r.IntN(ref.Len())
					ref.Ascend(func(e entry) bool {
						if i == 0 {
							k = e
							return false
						}
						i--
						return true
					})
				}
				got, ok := m.Delete(k)
				want, wok := ref.Delete(k)
				if ok != wok || got != want {
					t.Fatalf("seed %d step %d: Delete(%v) = %v %v, want %v %v", seed, step, k, got, ok, want, wok)
				}
			default:
				k := key()
				got, ok := m.Get(k)
				want, wok := ref.Get(k)
				if ok != wok || got != want {
					t.Fatalf("seed %d step %d: Get(%v) = %v %v, want %v %v", seed, step, k, got, ok, want, wok)
				}
			}
			checkEntryMap(t, seed, step, m, ref)
			compareWalks(t, seed, step, r, m, ref, key)
		}
	}
}

// collect records a walk's entries, stopping after stop of them (or
// never, for stop < 0).
func collect(stop int) (*[]entry, func(entry) bool) {
	var out []entry
	return &out, func(e entry) bool {
		out = append(out, e)
		return stop < 0 || len(out) < stop
	}
}

func compareWalks(t *testing.T, seed uint64, step int, r *rand.Rand, m *entryMap, ref *btree.BTreeG[entry], key func() entry) {
	t.Helper()
	stop := -1
	if r.IntN(2) == 0 {
		stop = 1 + r.IntN(20)
	}
	lo, hi := key(), key()
	if entryLess(hi, lo) {
		lo, hi = hi, lo
	}
	walks := []struct {
		name     string
		got, ref func(func(entry) bool)
	}{
		{"Ascend", m.Ascend, func(f func(entry) bool) { ref.Ascend(f) }},
		{"AscendGreaterOrEqual", func(f func(entry) bool) { m.AscendGreaterOrEqual(lo, f) }, func(f func(entry) bool) { ref.AscendGreaterOrEqual(lo, f) }},
		{"AscendRange", func(f func(entry) bool) { m.AscendRange(lo, hi, f) }, func(f func(entry) bool) { ref.AscendRange(lo, hi, f) }},
		{"DescendLessOrEqual", func(f func(entry) bool) { m.DescendLessOrEqual(hi, f) }, func(f func(entry) bool) { ref.DescendLessOrEqual(hi, f) }},
	}
	for _, w := range walks {
		got, f := collect(stop)
		w.got(f)
		want, g := collect(stop)
		w.ref(g)
		if !slices.Equal(*got, *want) {
			t.Fatalf("seed %d step %d: %s (lo %v hi %v stop %d) = %v, want %v", seed, step, w.name, lo, hi, stop, *got, *want)
		}
	}
}

// checkEntryMap checks the leaves: linked both ways, none empty, none
// longer than leafMax, items sorted, each lo at most its first item and
// above the previous leaf's last, every leaf in the index under its lo,
// and the count.
func checkEntryMap(t *testing.T, seed uint64, step int, m *entryMap, ref *btree.BTreeG[entry]) {
	t.Helper()
	fail := func(format string, a ...any) {
		t.Helper()
		t.Fatalf("seed %d step %d: "+format, append([]any{seed, step}, a...)...)
	}
	n, leaves := 0, 0
	var prev *leaf
	for l := m.first; l != nil; prev, l = l, l.next {
		leaves++
		if l.prev != prev {
			fail("leaf %d: prev link broken", leaves)
		}
		if l.dead {
			fail("leaf %d is linked but dead", leaves)
		}
		if len(l.items) == 0 || len(l.items) > leafMax {
			fail("leaf %d has %d entries (max %d)", leaves, len(l.items), leafMax)
		}
		if !slices.IsSortedFunc(l.items, func(a, b entry) int {
			if entryLess(a, b) {
				return -1
			}
			if entryLess(b, a) {
				return 1
			}
			return 0
		}) {
			fail("leaf %d not sorted", leaves)
		}
		if entryLess(l.items[0], l.lo) {
			fail("leaf %d: lo %v above its first entry %v", leaves, l.lo, l.items[0])
		}
		if prev != nil && !entryLess(prev.items[len(prev.items)-1], l.lo) {
			fail("leaf %d: lo %v not above the previous leaf's last %v", leaves, l.lo, prev.items[len(prev.items)-1])
		}
		if got, ok := m.idx.Get(leafRef{lo: l.lo}); !ok || got.l != l {
			fail("leaf %d not in the index under its lo", leaves)
		}
		n += len(l.items)
	}
	if m.idx.Len() != leaves {
		fail("index has %d leaves, list %d", m.idx.Len(), leaves)
	}
	if n != m.Len() || n != ref.Len() {
		fail("%d entries in leaves, Len %d, model %d", n, m.Len(), ref.Len())
	}
}
