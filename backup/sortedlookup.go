package backup

import (
	"bytes"
	"fmt"
	"sync"
)

// Lookups in hash order (a restore's plan of a segment: each distinct
// chunk once) need the pages of the index's runs in page order, most of
// them at a 2 GiB image's density: one pread of 4 KiB a page and a copy
// of the page a lookup (the run's last page) made ~31 600 preads and
// 0.45 s of CPU for restoring a 2 GiB image whose every segment's
// chunks are all over the index (measured 2026-12-07). A runCursor reads
// the pages the coming lookups need in one pread, up to cursorPages,
// and checks each once.
var (
	// cursorPages bounds the pages a cursor reads at once (and its
	// buffer: 128 KiB). (A variable: tests make it small.)
	cursorPages = 32
	// cursorGap is how many pages no lookup needs a read may take in
	// between pages that are needed, rather than making two reads: a
	// page copied costs less than a pread.
	cursorGap = 2
	// sortedBatch bounds the lookups made under one hold of the store's
	// lock, so that a writer waiting for it is not held for a whole
	// segment's.
	sortedBatch = 1 << 13
)

var cursorPool = sync.Pool{New: func() any { b := make([]byte, cursorPages*runPage); return &b }}

// runCursor looks hashes up in a run in increasing order.
type runCursor struct {
	r       *run
	buf     *[]byte // pages lo..hi-1, read; nil until the first read
	lo, hi  int
	checked []int // per page of the window: its entries' bytes once checked, else -1
	start   int   // the first page the last lookup could be on: later ones start there
}

func newRunCursor(r *run) *runCursor { return &runCursor{r: r} }

func (c *runCursor) release() {
	if c.buf != nil {
		cursorPool.Put(c.buf)
		c.buf = nil
	}
}

// pages is the range of pages, first..last, that may hold h, by the
// keys the run keeps (the top 32 bits of each page's first hash, t's
// of h): from the last one whose key is below t (or the first), through
// the last one whose key is t; none when the run starts after t.
// Lookups come in increasing order: from is where the previous one's
// range began, and this one's does not begin before.
func (c *runCursor) pages(h *Hash, from int) (int, int) {
	t := uint32(top64(h) >> 32) // as the run keeps its keys
	keys := c.r.keys
	// The first page at or after from whose key is >= t: gallop, then
	// bisect (the next lookup's page is usually near the last one's).
	lo, hi := from, from+1
	for hi < len(keys) && keys[hi] < t {
		lo, hi = hi, hi+2*(hi-lo)
	}
	hi = min(hi, len(keys))
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if keys[m] < t {
			lo = m + 1
		} else {
			hi = m
		}
	}
	first := max(lo-1, from)
	if keys[first] > t {
		return first, first - 1 // none: h is before the run's first hash
	}
	last := first
	for last+1 < len(keys) && keys[last+1] <= t {
		last++
	}
	return first, last
}

// find looks h up; ahead are the hashes to be looked up after it, in
// order, from which a read of pages takes the ones they need too.
func (c *runCursor) find(h *Hash, ahead func(k int) (*Hash, bool)) (loc, bool, error) {
	r := c.r
	if r == nil || r.n == 0 {
		return loc{}, false, nil
	}
	first, last := c.pages(h, c.start)
	c.start = first
	esz := runEntrySize(r.hashLen)
	for p := first; p <= last; p++ {
		es, err := c.page(p, last, ahead)
		if err != nil {
			return loc{}, false, err
		}
		cnt := len(es) / esz
		lo, hi := 0, cnt
		for lo < hi {
			m := int(uint(lo+hi) >> 1)
			if bytes.Compare(es[m*esz:m*esz+r.hashLen], h[:r.hashLen]) < 0 {
				lo = m + 1
			} else {
				hi = m
			}
		}
		if lo < cnt {
			if bytes.Equal(es[lo*esz:lo*esz+r.hashLen], h[:r.hashLen]) {
				return getRunEntry(es[lo*esz:], r.hashLen).l, true, nil
			}
			return loc{}, false, nil // the next entry is past h
		}
	}
	return loc{}, false, nil
}

// page returns page p's entries, checked, reading it (with the pages
// through last, which the lookup may need next, and those the lookups
// ahead need) unless the window holds it.
func (c *runCursor) page(p, last int, ahead func(k int) (*Hash, bool)) ([]byte, error) {
	if p < c.lo || p >= c.hi {
		if err := c.read(p, last, ahead); err != nil {
			return nil, err
		}
	}
	w := p - c.lo
	if c.checked[w] < 0 {
		page := (*c.buf)[w*runPage : (w+1)*runPage]
		cnt, err := c.r.checkPage(p, page)
		if err != nil {
			return nil, c.r.damagedPage(p, err)
		}
		c.checked[w] = cnt * runEntrySize(c.r.hashLen)
	}
	return (*c.buf)[w*runPage : w*runPage+c.checked[w]], nil
}

// read reads pages p..last and after them the pages the lookups ahead
// need, while they are at most cursorGap pages apart and cursorPages in
// all.
func (c *runCursor) read(p, last int, ahead func(k int) (*Hash, bool)) error {
	end := min(last+1, p+cursorPages) // pages p..end-1
	from := p
	for k := 0; ; k++ {
		h, ok := ahead(k)
		if !ok {
			break
		}
		a, b := c.pages(h, from)
		from = a
		if b < a {
			continue // not in the run
		}
		if a-end > cursorGap || b >= p+cursorPages {
			break
		}
		end = max(end, b+1)
	}
	n := end - p
	if c.buf == nil {
		c.buf = cursorPool.Get().(*[]byte)
	}
	if len(*c.buf) < n*runPage { // cursorPages changed (tests)
		*c.buf = make([]byte, cursorPages*runPage)
	}
	if _, err := c.r.r.ReadAt((*c.buf)[:n*runPage], runPage+int64(p)*runPage); err != nil {
		c.lo, c.hi = 0, 0
		return fmt.Errorf("index run: pages %d-%d: %w", p, end-1, err)
	}
	c.lo, c.hi = p, end
	c.checked = c.checked[:0]
	for range n {
		c.checked = append(c.checked, -1)
	}
	return nil
}

// getSorted looks up n hashes given in increasing order by hash(i), as
// get would each, and calls found for each one the store holds. A run's
// pages are read a window at a time (runCursor).
func (s *chunkStore) getSorted(n int, hash func(i int) *Hash, found func(i int, l loc)) {
	s.lookups.Add(int64(n))
	for lo := 0; lo < n; lo += sortedBatch {
		hi := min(lo+sortedBatch, n)
		s.mu.RLock()
		misses := s.getSortedLocked(lo, hi, hash, found)
		build := misses > 0 && s.missed(misses)
		s.mu.RUnlock()
		if build {
			s.mu.Lock()
			if s.filt == nil && s.filtUsers > 0 {
				s.buildFilterLocked()
			}
			s.mu.Unlock()
		}
	}
}

// getSortedLocked looks up hashes lo..hi-1 (getSorted) and returns how
// many it did not find. Callers hold mu (read or write).
func (s *chunkStore) getSortedLocked(lo, hi int, hash func(i int) *Hash, found func(i int, l loc)) int64 {
	srcs := append([]*run{s.base}, s.runs...)
	cursors := make([]*runCursor, len(srcs))
	for i, r := range srcs {
		cursors[i] = newRunCursor(r)
	}
	defer func() {
		for _, c := range cursors {
			c.release()
		}
	}()
	var misses int64
	for i := lo; i < hi; i++ {
		h := hash(i)
		ahead := func(k int) (*Hash, bool) {
			if j := i + 1 + k; j < hi {
				return hash(j), true
			}
			return nil, false
		}
		l, ok := s.getWith(h, cursors, ahead)
		if ok {
			found(i, l)
		} else {
			misses++
		}
	}
	return misses
}

// getWith is getLocked through cursors over the base and the runs.
func (s *chunkStore) getWith(h *Hash, cursors []*runCursor, ahead func(k int) (*Hash, bool)) (loc, bool) {
	if s.filt != nil && !s.filt.has(h) {
		return loc{}, false
	}
	bl, inBuf := s.buf.get(*h)
	if inBuf && !s.unchecked {
		return bl, true
	}
	// The base first, then the runs oldest first: where a chunk is
	// twice (unchecked), its earliest place.
	for _, c := range cursors {
		l, ok, err := c.find(h, ahead)
		if err != nil {
			s.noteErr(err)
			return loc{}, false
		}
		if ok {
			return l, true
		}
	}
	return bl, inBuf
}
