package backup

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"slices"
)

// chunkIndex is the in-memory chunk index: where each stored chunk is.
// Every operation holds it (restic does too), so it is compact: a
// sorted array of 52-byte entries with a directory on the hashes' top
// bits (chunk hashes are uniform, so a bucket holds a handful of
// entries and a lookup touches two or three cache lines), plus a map of
// chunks added since the array was last rebuilt. A Go map of the same
// entries took ~170 bytes a chunk.
type chunkIndex struct {
	sorted []indexEntry
	dir    []uint32 // dir[b] = first entry whose top bits are >= b; len 2^bits+1
	bits   uint
	recent map[Hash]loc
}

type indexEntry struct {
	h Hash
	l loc
}

func newChunkIndex() *chunkIndex { return &chunkIndex{recent: map[Hash]loc{}} }

func top64(h *Hash) uint64 { return binary.BigEndian.Uint64(h[:8]) }

func cmpHash(a, b *Hash) int {
	if x, y := top64(a), top64(b); x != y {
		return cmp.Compare(x, y)
	}
	return bytes.Compare(a[8:], b[8:])
}

func (x *chunkIndex) len() int { return len(x.sorted) + len(x.recent) }

func (x *chunkIndex) get(h Hash) (loc, bool) {
	if len(x.sorted) > 0 {
		b := top64(&h) >> (64 - x.bits)
		for i := x.dir[b]; i < x.dir[b+1]; i++ {
			if c := cmpHash(&x.sorted[i].h, &h); c == 0 {
				return x.sorted[i].l, true
			} else if c > 0 {
				break
			}
		}
	}
	l, ok := x.recent[h]
	return l, ok
}

// add records chunk h at l unless it is known.
func (x *chunkIndex) add(h Hash, l loc) {
	if _, ok := x.get(h); ok {
		return
	}
	x.recent[h] = l
	if len(x.recent) > x.recentMax() {
		x.merge(nil)
	}
}

// recentMax is how many entries recent holds before a merge.
func (x *chunkIndex) recentMax() int { return max(1<<14, len(x.sorted)/4) }

// addMany records es: one by one while they fit in recent (a merge
// copies the whole sorted array), else with one sort and merge.
func (x *chunkIndex) addMany(es []indexEntry) {
	if len(x.recent)+len(es) <= x.recentMax() {
		for _, e := range es {
			x.add(e.h, e.l)
		}
		return
	}
	x.addBulk(es)
}

// addBulk records many entries at once (an index being loaded): one
// sort and one merge. A chunk already known keeps its place; one given
// twice gets the lowest (pack, offset).
func (x *chunkIndex) addBulk(es []indexEntry) {
	if len(x.recent) > 0 {
		x.merge(nil) // the earlier additions win ties
	}
	x.merge(es)
}

// merge rebuilds the sorted array with recent and es folded in.
func (x *chunkIndex) merge(es []indexEntry) {
	for h, l := range x.recent {
		es = append(es, indexEntry{h, l})
	}
	clear(x.recent)
	// Ties (a chunk stored twice) go to the lowest place, so the result
	// does not depend on the order entries came in.
	slices.SortFunc(es, func(a, b indexEntry) int {
		if c := cmpHash(&a.h, &b.h); c != 0 {
			return c
		}
		return cmp.Or(cmp.Compare(a.l.pack, b.l.pack), cmp.Compare(a.l.off, b.l.off), cmp.Compare(a.l.rawOff, b.l.rawOff))
	})
	var out []indexEntry
	if len(x.sorted) == 0 {
		out = es[:0] // in place: nothing to merge with
	} else {
		out = make([]indexEntry, 0, len(x.sorted)+len(es))
	}
	i, j := 0, 0
	for i < len(x.sorted) || j < len(es) {
		var e indexEntry
		switch {
		case j == len(es):
			e, i = x.sorted[i], i+1
		case i == len(x.sorted):
			e, j = es[j], j+1
		default:
			if cmpHash(&es[j].h, &x.sorted[i].h) < 0 {
				e, j = es[j], j+1
			} else {
				e, i = x.sorted[i], i+1 // the array's place wins ties
			}
		}
		if n := len(out); n > 0 && out[n-1].h == e.h {
			continue
		}
		out = append(out, e)
	}
	x.sorted = out
	// About 4 entries a bucket.
	x.bits = 1
	for x.bits < 28 && len(out)>>(x.bits+2) > 0 {
		x.bits++
	}
	x.dir = make([]uint32, 1<<x.bits+1)
	k := 0
	for b := range x.dir {
		for k < len(out) && top64(&out[k].h)>>(64-x.bits) < uint64(b) {
			k++
		}
		x.dir[b] = uint32(k)
	}
}

// each calls fn for every entry.
func (x *chunkIndex) each(fn func(Hash, loc)) {
	for _, e := range x.sorted {
		fn(e.h, e.l)
	}
	for h, l := range x.recent {
		fn(h, l)
	}
}

// frozen is the index as one sorted array (recent folded in), which
// later additions do not change (a merge builds a new array): positions
// in it name chunks compactly, e.g. as bits of a set. Callers hold the
// repository's mu.
func (x *chunkIndex) frozen() frozenIndex {
	if len(x.recent) > 0 {
		x.merge(nil)
	}
	return frozenIndex{x.sorted, x.dir, x.bits}
}

// frozenIndex is a sorted array of entries and its directory.
type frozenIndex struct {
	sorted []indexEntry
	dir    []uint32
	bits   uint
}

// pos is where h is, if it is.
func (f frozenIndex) pos(h Hash) (int, bool) {
	if len(f.sorted) == 0 {
		return 0, false
	}
	b := top64(&h) >> (64 - f.bits)
	for i := f.dir[b]; i < f.dir[b+1]; i++ {
		if c := cmpHash(&f.sorted[i].h, &h); c == 0 {
			return int(i), true
		} else if c > 0 {
			break
		}
	}
	return 0, false
}

// bitset is a set of small integers.
type bitset []uint64

func newBitset(n int) bitset    { return make(bitset, (n+63)/64) }
func (b bitset) set(i int)      { b[i/64] |= 1 << (i % 64) }
func (b bitset) clear(i int)    { b[i/64] &^= 1 << (i % 64) }
func (b bitset) has(i int) bool { return b[i/64]&(1<<(i%64)) != 0 }
