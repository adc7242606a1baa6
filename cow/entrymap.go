package cow

import (
	"slices"

	"github.com/google/btree"
)

// entryMap is the mapping from (chunk, generation) to diff-area slot,
// ordered by chunk, then generation. It is a list of leaves, each a
// sorted slice of at most leafMax entries, and a B-tree (google/btree)
// over the leaves' lower bounds to find the leaf of a key.
//
// Why not one B-tree of entries, as before: an insert there costs ~230 ns
// on these machines (binary searches through comparator calls down four
// levels, node splits), ~0.09 ms of every MiB of first writes under a
// snapshot, which records 256 entries of 4 KiB chunks, all in one region
// of the map. Here those go into their leaf in one merge (insertRun), and
// single inserts from a writer start at the leaf it changed last.
//
// Not safe for concurrent use: readers (Get and the Ascend/Descend
// walks) may run together, and every change needs them all out — the
// volume's lock, shared or exclusive. A walk's callback must not change
// the map.
type entryMap struct {
	idx   *btree.BTreeG[leafRef]
	first *leaf
	n     int
	hint  *leaf // the leaf changed last; only changes use it
}

// leafMax bounds a leaf: an insert moves up to this many entries (24
// bytes each) along its slice.
const leafMax = 128

type leaf struct {
	// lo is the leaf's key in idx: no greater than its first entry and
	// greater than every entry of the leaves before it. Removing a
	// leaf's first entry leaves lo as it is.
	lo         entry
	items      []entry
	prev, next *leaf
	dead       bool // unlinked: a stale hint
}

type leafRef struct {
	lo entry
	l  *leaf
}

func newEntryMap() *entryMap {
	return &entryMap{idx: btree.NewG(16, func(a, b leafRef) bool { return entryLess(a.lo, b.lo) })}
}

// Len is the number of entries.
func (m *entryMap) Len() int { return m.n }

// search returns where k is or would go in items, and whether it is there.
func search(items []entry, k entry) (int, bool) {
	lo, hi := 0, len(items)
	for lo < hi {
		h := int(uint(lo+hi) >> 1)
		if e := items[h]; e.chunk < k.chunk || e.chunk == k.chunk && e.gen < k.gen {
			lo = h + 1
		} else {
			hi = h
		}
	}
	return lo, lo < len(items) && items[lo].chunk == k.chunk && items[lo].gen == k.gen
}

// locate returns the leaf k belongs in: the last whose lo is at most k,
// else the first; nil when the map has no leaf.
func (m *entryMap) locate(k entry) *leaf {
	var found *leaf
	m.idx.DescendLessOrEqual(leafRef{lo: k}, func(r leafRef) bool {
		found = r.l
		return false
	})
	if found == nil {
		return m.first
	}
	return found
}

// leafFor is locate for a change: the hint when k belongs there.
func (m *entryMap) leafFor(k entry) *leaf {
	if h := m.hint; h != nil && !h.dead && (h.prev == nil || !entryLess(k, h.lo)) && (h.next == nil || entryLess(k, h.next.lo)) {
		return h
	}
	return m.locate(k)
}

// Get returns the entry with k's chunk and generation.
func (m *entryMap) Get(k entry) (entry, bool) {
	l := m.locate(k)
	if l == nil {
		return entry{}, false
	}
	if i, ok := search(l.items, k); ok {
		return l.items[i], true
	}
	return entry{}, false
}

// ReplaceOrInsert puts e in the map, over the entry with its chunk and
// generation if there is one.
func (m *entryMap) ReplaceOrInsert(e entry) {
	m.insertRun([]entry{e})
}

// insertRun puts es, sorted and without two of the same key, in the
// map, over entries with the same keys: the entries of one leaf in one
// merge.
func (m *entryMap) insertRun(es []entry) {
	for len(es) > 0 {
		if m.first == nil {
			l := &leaf{lo: es[0]}
			m.first = l
			m.idx.ReplaceOrInsert(leafRef{lo: l.lo, l: l})
		}
		l := m.leafFor(es[0])
		k := len(es)
		if l.next != nil {
			k, _ = search(es, l.next.lo) // es[:k] are below the next leaf
		}
		if entryLess(es[0], l.lo) { // only the first leaf: its bound goes down
			m.idx.Delete(leafRef{lo: l.lo})
			l.lo = es[0]
			m.idx.ReplaceOrInsert(leafRef{lo: l.lo, l: l})
		}
		m.merge(l, es[:k])
		m.hint = l
		m.split(l)
		es = es[k:]
	}
}

// merge puts run (sorted) into l's items.
func (m *entryMap) merge(l *leaf, run []entry) {
	items := l.items
	i, found := search(items, run[0])
	if !found && (i == len(items) || entryLess(run[len(run)-1], items[i])) {
		// The whole run falls between two entries (or after the last):
		// one move.
		l.items = slices.Insert(items, i, run...)
		m.n += len(run)
		return
	}
	out := make([]entry, 0, len(items)+len(run))
	out = append(out, items[:i]...)
	j := i
	for _, e := range run {
		for j < len(items) && entryLess(items[j], e) {
			out = append(out, items[j])
			j++
		}
		if j < len(items) && !entryLess(e, items[j]) { // same key: replace
			j++
		} else {
			m.n++
		}
		out = append(out, e)
	}
	l.items = append(out, items[j:]...)
}

// split cuts a leaf longer than leafMax into leaves of about three
// quarters of it, linked after it in order.
func (m *entryMap) split(l *leaf) {
	n := len(l.items)
	if n <= leafMax {
		return
	}
	pieces := (n + leafMax*3/4 - 1) / (leafMax * 3 / 4)
	size := (n + pieces - 1) / pieces
	items := l.items
	next := l.next
	prev := l
	for at := size; at < n; at += size {
		r := &leaf{items: slices.Clone(items[at:min(at+size, n)]), prev: prev}
		r.lo = r.items[0]
		prev.next = r
		m.idx.ReplaceOrInsert(leafRef{lo: r.lo, l: r})
		prev = r
	}
	prev.next = next
	if next != nil {
		next.prev = prev
	}
	l.items = slices.Clip(items[:size])
	if cap(items) > 2*leafMax {
		l.items = slices.Clone(l.items)
	}
}

// Delete removes the entry with k's chunk and generation and returns it.
func (m *entryMap) Delete(k entry) (entry, bool) {
	l := m.leafFor(k)
	if l == nil {
		return entry{}, false
	}
	i, ok := search(l.items, k)
	if !ok {
		return entry{}, false
	}
	e := l.items[i]
	l.items = slices.Delete(l.items, i, i+1)
	m.n--
	m.hint = l
	switch {
	case len(l.items) == 0:
		m.unlink(l)
	case len(l.items) < leafMax/4 && l.next != nil && len(l.items)+len(l.next.items) <= leafMax/2:
		nx := l.next
		l.items = append(l.items, nx.items...)
		m.unlink(nx)
	}
	return e, true
}

// unlink removes l from the list and the index.
func (m *entryMap) unlink(l *leaf) {
	m.idx.Delete(leafRef{lo: l.lo})
	if l.prev != nil {
		l.prev.next = l.next
	} else {
		m.first = l.next
	}
	if l.next != nil {
		l.next.prev = l.prev
	}
	l.dead = true
	if m.hint == l {
		m.hint = nil
	}
}

// Ascend calls fn for every entry in order until it returns false.
func (m *entryMap) Ascend(fn func(entry) bool) {
	m.ascendFrom(m.first, 0, nil, fn)
}

// AscendGreaterOrEqual calls fn for the entries from pivot on.
func (m *entryMap) AscendGreaterOrEqual(pivot entry, fn func(entry) bool) {
	l := m.locate(pivot)
	if l == nil {
		return
	}
	i, _ := search(l.items, pivot)
	m.ascendFrom(l, i, nil, fn)
}

// AscendRange calls fn for the entries in [lo, hi).
func (m *entryMap) AscendRange(lo, hi entry, fn func(entry) bool) {
	l := m.locate(lo)
	if l == nil {
		return
	}
	i, _ := search(l.items, lo)
	m.ascendFrom(l, i, &hi, fn)
}

func (m *entryMap) ascendFrom(l *leaf, i int, hi *entry, fn func(entry) bool) {
	for ; l != nil; l, i = l.next, 0 {
		for _, e := range l.items[i:] {
			if hi != nil && !entryLess(e, *hi) {
				return
			}
			if !fn(e) {
				return
			}
		}
	}
}

// DescendLessOrEqual calls fn for the entries from pivot down.
func (m *entryMap) DescendLessOrEqual(pivot entry, fn func(entry) bool) {
	l := m.locate(pivot)
	if l == nil {
		return
	}
	i, ok := search(l.items, pivot)
	if ok {
		i++
	}
	for ; l != nil; l = l.prev {
		for j := i - 1; j >= 0; j-- {
			if !fn(l.items[j]) {
				return
			}
		}
		if l.prev != nil {
			i = len(l.prev.items)
		}
	}
}
