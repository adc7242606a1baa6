package backup

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"testing"
)

// countingFile is a run in memory that counts its reads.
type countingFile struct {
	memFile
	reads atomic.Int64
}

func (c *countingFile) ReadAt(p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.memFile.ReadAt(p, off)
}

// storeOnRun is a store whose base is a run of es in memory, counting
// its reads.
func storeOnRun(t *testing.T, es []indexEntry, hashLen int) (*chunkStore, *countingFile) {
	t.Helper()
	m := writeTestRun(t, es, hashLen, runMeta{Packs: make([]PackID, 3)})
	cf := &countingFile{memFile: *m}
	ru, err := openRun(cf, int64(len(m.b)), hashLen, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := newChunkStore(hashLen, t.TempDir())
	s.setBase(ru)
	return s, cf
}

// TestPlanReadsPagesTogether: a restore's plan of a segment looks its
// distinct chunks up in hash order, and reads the index pages they
// need a window at a time (one pread for up to cursorPages adjacent
// pages), not a pread of 4 KiB a page: a 2 GiB image's segments each
// needed nearly every page of the index, ~31 600 preads for a restore.
// Pages no lookup needs are not read: a segment of a few chunks reads
// no more windows than it has chunks.
func TestPlanReadsPagesTogether(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	const hashLen = 16
	per := runPerPage(hashLen)
	pages := 4 * cursorPages
	es := sortedUnique(randEntries(r, pages*per, hashLen))
	s, cf := storeOnRun(t, es, hashLen)
	defer s.close()
	repo := &Repo{chunks: s}

	// Every chunk of the index, in a segment's order (shuffled, some
	// used twice, zero chunks between).
	var hs []Hash
	for _, e := range es {
		hs = append(hs, e.h)
		if r.IntN(4) == 0 {
			hs = append(hs, e.h, Hash{})
		}
	}
	r.Shuffle(len(hs), func(i, j int) { hs[i], hs[j] = hs[j], hs[i] })
	before := cf.reads.Load()
	p := repo.planUses(0, hs)
	// A window a batch of lookups under one hold of the lock may read
	// again.
	if n, want := cf.reads.Load()-before, int64(pages/cursorPages+(len(es)+sortedBatch-1)/sortedBatch-1); n > want {
		t.Errorf("a plan of %d chunks on %d index pages made %d reads, want at most %d", len(es), pages, n, want)
	}
	checkPlan(t, p, hs, es)

	// A few chunks, far apart: a read each, of their own pages.
	var few []Hash
	for i := 0; i < len(es); i += 5 * per {
		few = append(few, es[i].h)
	}
	before = cf.reads.Load()
	p = repo.planUses(0, few)
	if n := cf.reads.Load() - before; n != int64(len(few)) {
		t.Errorf("a plan of %d chunks on pages 5 apart made %d reads, want one each", len(few), n)
	}
	checkPlan(t, p, few, es)
	if err := s.failed(); err != nil {
		t.Fatal(err)
	}
}

// checkPlan checks that p found every chunk of hs where es has it.
func checkPlan(t *testing.T, p *usePlan, hs []Hash, es []indexEntry) {
	t.Helper()
	for j, h := range hs {
		if h == (Hash{}) {
			if p.at[j] != -1 {
				t.Fatalf("zero chunk %d planned", j)
			}
			continue
		}
		u := p.chunks[p.at[j]]
		i, ok := slices.BinarySearchFunc(es, h, func(e indexEntry, h Hash) int { return cmpHash(&e.h, &h) })
		if u.h != h || !ok || !u.found || u.l != es[i].l {
			t.Fatalf("chunk %d planned at %v (found %v), want %v", j, u.l, u.found, es[i].l)
		}
	}
}

// TestGetSorted: lookups in hash order find what get finds, one by one,
// in a store of several runs and a buffer (also unchecked: a chunk in
// two runs is found at its earliest place), with hashes absent, before
// the first and after the last, hashes whose top 64 bits are equal
// across pages, and windows of a few pages.
func TestGetSorted(t *testing.T) {
	for _, pagesAtOnce := range []int{1, 2, 3, 32} {
		for _, unchecked := range []bool{false, true} {
			t.Run(fmt.Sprintf("window=%d,unchecked=%v", pagesAtOnce, unchecked), func(t *testing.T) {
				defer set(&cursorPages, pagesAtOnce)()
				defer set(&sortedBatch, 700)()
				testGetSorted(t, unchecked)
			})
		}
	}
}

func testGetSorted(t *testing.T, unchecked bool) {
	defer set(&smallBufMax, 500)()
	defer set(&directRunMin, 400)()
	r := rand.New(rand.NewPCG(21, 22))
	const hashLen = 32
	s := newChunkStore(hashLen, t.TempDir())
	defer s.close()
	var all []indexEntry
	for round := range 13 {
		n := 300 + r.IntN(700)
		if round == 12 {
			n = 100 // into the buffer
		}
		es := randEntries(r, n, hashLen)
		if round == 3 { // three pages' worth with one key
			for i := range 3 * runPerPage(hashLen) {
				copy(es[i].h[:8], es[0].h[:8])
			}
		}
		for i := range es {
			switch r.IntN(10) {
			case 0: // the top 64 bits of another: pages may share keys
				if len(all) > 0 {
					copy(es[i].h[:8], all[r.IntN(len(all))].h[:8])
				}
			case 1:
				if len(all) > 0 {
					es[i].h = all[r.IntN(len(all))].h // stored twice
				}
			}
		}
		if !unchecked {
			s.filtUsers++ // adds look the store up: no chunk in two runs
		}
		s.addMany(slices.Clone(es))
		if !unchecked {
			s.filtUsers--
		}
		all = append(all, es...)
		if round == 5 {
			s.mu.Lock()
			if err := s.fold(runMeta{}, ""); err != nil {
				t.Fatal(err)
			}
			s.mu.Unlock()
		}
	}
	if s.unchecked != unchecked || len(s.runs) == 0 || s.base == nil || s.buf.len() == 0 {
		t.Fatalf("unchecked %v with %d runs, a base %v, %d entries in the buffer: the test does not test what it says", s.unchecked, len(s.runs), s.base != nil, s.buf.len())
	}
	// All of them, absent ones, and some with a run's first or last key.
	var hs []Hash
	for _, e := range all {
		hs = append(hs, e.h)
	}
	for _, e := range randEntries(r, 500, hashLen) {
		hs = append(hs, e.h)
	}
	var lo, hi Hash
	copy(hi[:], bytes.Repeat([]byte{0xff}, hashLen))
	hs = append(hs, lo, hi)
	slices.SortFunc(hs, func(a, b Hash) int { return cmpHash(&a, &b) })
	hs = slices.Compact(hs)
	for _, sub := range [][]Hash{hs, everyNth(hs, 7), everyNth(hs, 300)} {
		got := make([]loc, len(sub))
		ok := make([]bool, len(sub))
		last := -1
		s.getSorted(len(sub), func(i int) *Hash { return &sub[i] }, func(i int, l loc) {
			if i <= last {
				t.Fatalf("found %d after %d", i, last)
			}
			last = i
			got[i], ok[i] = l, true
		})
		for i, h := range sub {
			l, found := s.get(h)
			if found != ok[i] || l != got[i] {
				t.Fatalf("hash %d of %d: getSorted %v %v, get %v %v", i, len(sub), got[i], ok[i], l, found)
			}
		}
	}
	if err := s.failed(); err != nil {
		t.Fatal(err)
	}
}

func everyNth(hs []Hash, n int) []Hash {
	var out []Hash
	for i := 0; i < len(hs); i += n {
		out = append(out, hs[i])
	}
	return out
}

// TestGetSortedDamage: a damaged page found by lookups in order is an
// error of the store (ErrCorrupt), and the run says it is damaged, as a
// lookup one by one.
func TestGetSortedDamage(t *testing.T) {
	r := rand.New(rand.NewPCG(31, 32))
	const hashLen = 16
	es := sortedUnique(randEntries(r, 3*runPerPage(hashLen), hashLen))
	s, cf := storeOnRun(t, es, hashLen)
	defer s.close()
	cf.b[2*runPage+100] ^= 1 // page 1
	damaged := 0
	s.base.onDamage = func() { damaged++ }
	found := 0
	s.getSorted(len(es), func(i int) *Hash { return &es[i].h }, func(int, loc) { found++ })
	if err := s.failed(); !errors.Is(err, ErrCorrupt) || damaged != 1 {
		t.Fatalf("failed: %v, damage reported %d times", err, damaged)
	}
	if found >= len(es) {
		t.Fatalf("all %d found on a damaged page", found)
	}
}
