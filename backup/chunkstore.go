package backup

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// chunkStore is the chunk index (hash → pack, blob) in bounded memory:
// a base run (a file, the local index cache when the repository has a
// cache directory), runs spilled by this process (files unlinked as soon
// as they are created, so nothing is left should it die), a buffer of
// recent entries, and, while a backup (or another writer looking up
// chunks it is about to store) wants it, a Bloom filter over all of
// them that spares most lookups of new chunks a page read. What it holds
// in memory is the buffer (at most bufMax entries while it has a filter,
// else smallBufMax), the filter (none, or filterBytes), and 4 bytes a
// 4 KiB page of every run.
type chunkStore struct {
	hashLen int
	tmpDir  string       // where runs are spilled ("": the system's temporary directory)
	lookups atomic.Int64 // get calls, for tests: a restore looks each chunk up once
	// filterBuilds counts the filters built, for tests: only writers
	// build one.
	filterBuilds atomic.Int64
	filterBuilt  atomic.Int64 // bytes of the last one

	mu   sync.RWMutex // guards the fields below; lookups share it
	base *run
	runs []*run // spilled, oldest first; sizes decrease (tiered merges)
	buf  *chunkIndex
	// filt is nil unless filtUsers > 0: verify, prune, stats, restore
	// and mount look up chunks the index holds, for which a filter
	// only costs memory (it was built at every open: 2 MiB at 1 Mi
	// chunks, 8 MiB from 4 Mi on, and the collector's headroom over it).
	filt      *bloom
	filtUsers int
	// filtGrow: the filter starts small and grows with the entries (up
	// to maxFilterBytes), for a store that starts empty and fills
	// (repair's store of the chunks it finds), not at filterBytes.
	filtGrow bool
	// misses counts lookups that found nothing while a writer wanted a
	// filter that was not built yet.
	misses atomic.Int64
	// unchecked: entries were added without looking them up in the
	// runs (no filter to make that cheap), so a chunk may be in two of
	// them; lookups then take its earliest place, as a fold does, and
	// a fold removes the duplicates.
	unchecked bool
	n         int64 // entries in all of them; an upper bound while unchecked
	// changed: entries were added since the cache was last written.
	changed bool
	// cached is how many of the entries the local index cache holds
	// (the base run it was opened as or last written to).
	cached int64

	errMu sync.Mutex // guards err (set by lookups, which share mu)
	err   error      // the first failure to read or write a run
}

var (
	// bufMax is how many entries the buffer holds before it is spilled
	// as a run while the store has a filter: a writer adding many new
	// chunks (a full backup, a copy, repair), whose memory is its
	// pipeline's; a larger buffer means fewer spills and merges.
	// (Variables: tests make them small.)
	bufMax = 1 << 17
	// smallBufMax is the buffer's bound without a filter: entries added
	// by an incremental of a small change, or loaded at an open from the
	// index objects the local cache lacks (up to 1/cacheSlack of the
	// index). 128 Ki entries and their merges held ~16 MiB, twice that
	// resident with the collector's headroom, the largest thing that
	// grew with the volume in the scale benchmark's incremental (1 % of
	// the volume changed: 10 Ki entries at 1 Mi chunks, 160 Ki at
	// 16 Mi; 2026-12-07). 16 Ki is an incremental's index object.
	smallBufMax = 1 << 14
	// minFilterBytes, maxFilterBytes bound a filter sized by newBloom:
	// 16 bits a chunk in between (0.5 % false positives).
	minFilterBytes = 64 << 10
	maxFilterBytes = 8 << 20
	// filterBytes is the size of the store's filter, one size whatever
	// the index holds, so that a backup's memory does not grow with the
	// repository: 0.6 % false positives at 4 Mi chunks, ~16 % at 16 Mi
	// (a false positive costs a page read, usually from the page cache).
	filterBytes = maxFilterBytes
)

var pagePool = sync.Pool{New: func() any { b := make([]byte, runPage); return &b }}

func newChunkStore(hashLen int, tmpDir string) *chunkStore {
	return &chunkStore{hashLen: hashLen, tmpDir: tmpDir, buf: newChunkIndex()}
}

// bloom is a blocked Bloom filter: a hash sets three bits, taken from
// its bits (chunk hashes are uniform: BLAKE3, SHA-256, keyed or not),
// in one 64-byte block of the filter, so that adding or testing it
// touches one cache line, not three anywhere in up to 8 MiB. Building
// the filter of a 4 Mi-chunk index cache at every open spent most of
// its 0.42 s of CPU waiting for those lines (measured 2026-12-07); a
// block holds 32 chunks on average at 16 bits a chunk, for about
// 0.6 % false positives (0.5 % unblocked).
type bloom struct {
	bits   []uint64
	blocks uint64 // len(bits)/8 - 1: a mask of the block numbers
}

func newBloom(n int64) bloom {
	nb := uint64(max(n, 1)) * 16 / 8
	return newBloomBytes(min(max(nb, uint64(minFilterBytes)), uint64(maxFilterBytes)))
}

// newBloomBytes is a filter of nb bytes rounded up to a power of two.
func newBloomBytes(nb uint64) bloom {
	nb = 1 << (64 - bits.LeadingZeros64(max(nb, 64)-1)) // a power of two
	return bloom{bits: make([]uint64, nb/8), blocks: nb/64 - 1}
}

// probes are h's block (the index of its first word) and the bits to
// take its three 9-bit places in the block from.
func (b *bloom) probes(h *Hash) (uint64, uint64) {
	return (binary.LittleEndian.Uint64(h[8:16]) & b.blocks) * 8, top64(h)
}

func (b *bloom) add(h *Hash) {
	w, d := b.probes(h)
	blk := b.bits[w : w+8 : w+8]
	for range 3 {
		i := d & 511
		blk[i>>6] |= 1 << (i & 63)
		d >>= 9
	}
}

func (b *bloom) has(h *Hash) bool {
	w, d := b.probes(h)
	blk := b.bits[w : w+8 : w+8]
	for range 3 {
		i := d & 511
		if blk[i>>6]&(1<<(i&63)) == 0 {
			return false
		}
		d >>= 9
	}
	return true
}

func (b *bloom) bytes() int { return len(b.bits) * 8 }

// len is how many entries the store holds (an upper bound while it is
// unchecked: each counts them exactly).
func (s *chunkStore) len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return int(s.n)
}

// failed is the first error reading or writing a run, if any.
func (s *chunkStore) failed() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.err
}

func (s *chunkStore) get(h Hash) (loc, bool) {
	s.lookups.Add(1)
	s.mu.RLock()
	l, ok := s.getLocked(&h)
	build := !ok && s.missed(1)
	s.mu.RUnlock()
	if build {
		s.mu.Lock()
		if s.filt == nil && s.filtUsers > 0 {
			s.buildFilterLocked()
		}
		s.mu.Unlock()
	}
	return l, ok
}

// A writer's filter is built once its lookups have missed
// max(entries/filterAfter, minFilterAfter) times: building it reads
// every entry (~870 MiB of runs at 16 Mi chunks), a miss without it
// reads one page, so an incremental (its changed chunks: 1 % of the
// volume) reads a few pages instead, and a backup of much new data
// builds it early on. (Variables: tests change them.)
var (
	filterAfter    int64 = 32
	minFilterAfter int64 = 1 << 16
)

func (s *chunkStore) getLocked(h *Hash) (loc, bool) {
	if s.filt != nil && !s.filt.has(h) {
		return loc{}, false
	}
	bl, inBuf := s.buf.get(*h)
	if inBuf && !s.unchecked {
		return bl, true
	}
	bp := pagePool.Get().(*[]byte)
	defer pagePool.Put(bp)
	// The base first, then the runs oldest first: where a chunk is
	// twice (unchecked), its earliest place.
	for i := -1; i < len(s.runs); i++ {
		r := s.base
		if i >= 0 {
			r = s.runs[i]
		}
		_, l, ok, err := r.find(h, *bp)
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

// noteErr keeps the first error.
func (s *chunkStore) noteErr(err error) {
	s.errMu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.errMu.Unlock()
}

// addMany records es (entries already known keep their place; es is
// reordered). With a filter, or for a writer that wants one, each is
// looked up first (and a miss counts towards building it); else only
// in the buffer (a lookup in the runs is a page read, and an index
// being loaded whole would make one for every entry): the store is
// then unchecked until a fold. Many entries and no filter: see
// addRun.
func (s *chunkStore) addMany(es []indexEntry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.filt == nil && len(es) >= directRunMin && s.addRun(es, s.checksAdds()) {
		return
	}
	s.addManyLocked(es)
}

// addFresh records es, entries of chunks the caller looked up and did
// not find (a backup's new chunks): many of them with no filter go into
// a run of their own without a lookup each (an incremental's 10 Ki new
// chunks at 1 Mi chunks were 10 Ki page reads, 40 ms of its 0.4 s of
// CPU, measured 2026-12-07); the store is then unchecked, as another
// writer may have added one of them meanwhile. Else as addMany.
func (s *chunkStore) addFresh(es []indexEntry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.filt == nil && len(es) >= directRunMin && s.addRun(es, false) {
		return
	}
	s.addManyLocked(es)
}

func (s *chunkStore) addManyLocked(es []indexEntry) {
	for i := range es {
		if s.checksAdds() {
			if _, ok := s.getLocked(&es[i].h); ok {
				continue
			}
			if s.missed(1) {
				s.buildFilterLocked()
			}
		} else {
			if _, ok := s.buf.get(es[i].h); ok {
				continue
			}
			s.unchecked = true
		}
		s.buf.add(es[i].h, es[i].l)
		if s.filt != nil {
			s.filt.add(&es[i].h)
		}
		s.n++
		s.changed = true
		if s.buf.len() >= s.bufLimit() {
			s.spill()
		}
	}
	if s.filt != nil && s.filtGrow {
		s.growFilter()
	}
}

// directRunMin: addMany writes a batch of at least this many entries
// as a run of its own when the store has no filter (a variable: tests
// make it small).
var directRunMin = 1 << 12

// addRun writes es (looked up first when checked, then sorted, each
// hash once: its first entry) as a run of its own, after spilling the
// buffer (runs are searched oldest first: an earlier place wins); where
// that run cannot be written its entries go into the buffer. It reports
// false, having changed nothing, when the buffer did not spill (the
// error is noted). An index object loaded at open, an incremental's:
// 16 Ki entries through the buffer's map and the array it is sorted
// into to spill held ~5 MiB, the largest part of the heap of a 16
// Mi-chunk repository's open after an incremental (160 Ki entries the
// local cache lacks; 2026-12-07). Callers hold mu; there is no filter.
func (s *chunkStore) addRun(es []indexEntry, checked bool) bool {
	s.spill()
	if s.buf.len() > 0 {
		return false // not spilled (noted): through the buffer
	}
	k := 0
	misses := int64(0)
	for i := range es {
		if checked {
			if _, ok := s.getLocked(&es[i].h); ok {
				continue
			}
			misses++
		}
		es[i], es[k] = es[k], es[i]
		k++
	}
	fresh := es[:k]
	slices.SortStableFunc(fresh, func(a, b indexEntry) int { return cmpHash(&a.h, &b.h) })
	n := 0 // each hash once, its first entry (not slices.Compact: it zeroes the rest of es)
	for i := range fresh {
		if n == 0 || fresh[i].h != fresh[n-1].h {
			fresh[i], fresh[n] = fresh[n], fresh[i]
			n++
		}
	}
	fresh = fresh[:n]
	if len(fresh) > 0 {
		nr, err := s.writeRun(runMeta{}, "", func(add func(indexEntry) error) error {
			for _, e := range fresh {
				if err := add(e); err != nil {
					return err
				}
			}
			return nil
		})
		if !checked {
			s.unchecked = true // a chunk may be in an older run too
		}
		s.n += int64(len(fresh))
		s.changed = true
		if err != nil {
			s.noteErr(err)
			for _, e := range fresh {
				s.buf.add(e.h, e.l)
			}
		} else {
			s.pushRun(nr)
		}
	}
	if s.missed(misses) {
		s.buildFilterLocked()
	}
	return true
}

// checksAdds reports whether an entry added is looked up in the whole
// store first: with a filter, for a writer that wants one, or while
// the store has nothing but its buffer. Else only the buffer is looked
// in (a lookup in the runs is a page read) and the store becomes
// unchecked. Callers hold mu.
func (s *chunkStore) checksAdds() bool {
	return s.filt != nil || s.filtUsers > 0 || (s.base == nil || s.base.n == 0) && len(s.runs) == 0
}

// missed counts k lookups that missed while a writer wants a filter and
// none is built, and reports whether enough did to build it (see
// filterAfter). Callers hold mu (read or write).
func (s *chunkStore) missed(k int64) bool {
	return s.filt == nil && s.filtUsers > 0 && s.misses.Add(k) > max(s.n/filterAfter, minFilterAfter)
}

// bufLimit is how many entries the buffer holds before it is
// spilled: bufMax once a filter is built (a writer adding many new
// chunks), else smallBufMax. Callers hold mu.
func (s *chunkStore) bufLimit() int {
	if s.filt != nil {
		return bufMax
	}
	return smallBufMax
}

// growFilter rebuilds a growing filter larger when it holds under 8
// bits a chunk and may grow. Callers hold mu.
func (s *chunkStore) growFilter() {
	if int64(s.filt.bytes())*8 >= s.n*8 || s.filt.bytes() >= maxFilterBytes {
		return
	}
	f := newBloom(s.n)
	if f.bytes() <= s.filt.bytes() {
		return
	}
	if err := s.eachLocked(func(h Hash, _ loc) { f.add(&h) }); err != nil {
		s.noteErr(err)
		return // keep the old one: it still has every chunk
	}
	s.filt = &f
}

// useFilter asks for the filter (of filterBytes, built from every
// entry once lookups miss enough: see filterAfter; at once for a
// growing one); a writer looking up chunks it is about to store calls
// it and calls the function it returns when done: the filter goes with
// its last user.
func (s *chunkStore) useFilter() func() {
	s.mu.Lock()
	s.useFilterLocked()
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.filtUsers--; s.filtUsers == 0 {
				s.filt = nil
				s.misses.Store(0)
			}
		})
	}
}

func (s *chunkStore) useFilterLocked() {
	s.filtUsers++
	if s.filt != nil || !s.filtGrow {
		return // built by get once lookups miss enough
	}
	s.buildFilterLocked()
}

func (s *chunkStore) buildFilterLocked() {
	var f bloom
	if s.filtGrow {
		f = newBloom(s.n)
	} else {
		f = newBloomBytes(uint64(filterBytes))
	}
	if err := s.eachLocked(func(h Hash, _ loc) { f.add(&h) }); err != nil {
		s.noteErr(err) // lookups stay right without it, only slower
		return
	}
	s.filt = &f
	s.filterBuilds.Add(1)
	s.filterBuilt.Store(int64(f.bytes()))
}

// spill writes the buffer as a run, then merges the newest runs while
// the last is at least half the one before it, so that runs stay few
// (about log2 of the chunks over the buffer's bound). Callers hold mu.
func (s *chunkStore) spill() {
	if s.buf.len() == 0 {
		return
	}
	f := s.buf.frozen()
	nr, err := s.writeRun(runMeta{}, "", func(add func(indexEntry) error) error {
		for _, e := range f.sorted {
			if err := add(e); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		s.noteErr(err)
		return // the buffer stays; it spills again later
	}
	s.buf = newChunkIndex()
	s.pushRun(nr)
}

// pushRun adds a run (the newest), then merges the newest runs while
// the last is at least half the one before it. Callers hold mu.
func (s *chunkStore) pushRun(nr *run) {
	s.runs = append(s.runs, nr)
	for k := len(s.runs); k >= 2 && s.runs[k-1].n*2 >= s.runs[k-2].n; k = len(s.runs) {
		a, b := s.runs[k-2], s.runs[k-1]
		m, err := s.writeRun(runMeta{}, "", func(add func(indexEntry) error) error {
			return mergeRuns([]*run{a, b}, nil, add)
		})
		if err != nil {
			s.noteErr(err)
			return
		}
		a.close()
		b.close()
		s.n -= a.n + b.n - m.n // a chunk in both (unchecked) is in m once
		s.runs = append(s.runs[:k-2], m)
	}
}

// writeRun writes the entries fill gives as a run: a file renamed to
// path once complete, or an unlinked temporary file when path is "".
func (s *chunkStore) writeRun(meta runMeta, path string, fill func(add func(indexEntry) error) error) (*run, error) {
	dir := s.tmpDir
	if path != "" {
		dir = filepath.Dir(path)
	}
	if path == "" {
		// A temporary run goes where there is room: the cache's
		// directory (a full one too, prune's first job being to free
		// it), else the system's temporary directory.
		r, err := s.writeRunIn(dir, meta, "", fill)
		if err != nil && dir != "" && dir != os.TempDir() {
			r, err = s.writeRunIn(os.TempDir(), meta, "", fill)
		}
		return r, err
	}
	return s.writeRunIn(dir, meta, path, fill)
}

func (s *chunkStore) writeRunIn(dir string, meta runMeta, path string, fill func(add func(indexEntry) error) error) (*run, error) {
	f, err := os.CreateTemp(dir, ".tmp-run-*")
	if err != nil {
		return nil, fmt.Errorf("index run: %w", err)
	}
	if path == "" {
		os.Remove(f.Name())
	}
	fail := func(err error) (*run, error) {
		f.Close()
		if path != "" {
			os.Remove(f.Name())
		}
		return nil, fmt.Errorf("index run: %w", err)
	}
	w := newRunWriter(f, s.hashLen)
	if err := fill(w.add); err != nil {
		w.release()
		return fail(err)
	}
	r, err := w.finish(meta)
	w.release()
	if err != nil {
		return fail(err)
	}
	r.f = f
	if path != "" {
		if err := f.Sync(); err != nil {
			return fail(err)
		}
		if err := os.Rename(f.Name(), path); err != nil {
			return fail(err)
		}
		if d, err := os.Open(dir); err == nil {
			d.Sync()
			d.Close()
		}
	}
	return r, nil
}

// mergeRuns gives the entries of rs and then sorted (a buffer's array)
// in hash order, each hash once (the earlier source's place wins).
func mergeRuns(rs []*run, sorted []indexEntry, add func(indexEntry) error) error {
	type src struct {
		it  *runIter
		cur indexEntry
		ok  bool
	}
	srcs := make([]*src, 0, len(rs)+1)
	defer func() {
		for _, s := range srcs {
			s.it.release()
		}
	}()
	for _, r := range rs {
		if r == nil {
			continue
		}
		s := &src{it: r.iter()}
		s.cur, s.ok = s.it.next()
		if s.it.err != nil {
			return s.it.err
		}
		srcs = append(srcs, s)
	}
	j := 0
	for {
		var best *src
		for _, s := range srcs {
			if s.ok && (best == nil || cmpHash(&s.cur.h, &best.cur.h) < 0) {
				best = s
			}
		}
		var e indexEntry
		switch {
		case best != nil && (j == len(sorted) || cmpHash(&best.cur.h, &sorted[j].h) <= 0):
			e = best.cur
		case j < len(sorted):
			e = sorted[j]
		default:
			return nil
		}
		// Skip e everywhere it is.
		for _, s := range srcs {
			for s.ok && s.cur.h == e.h {
				s.cur, s.ok = s.it.next()
				if s.it.err != nil {
					return s.it.err
				}
			}
		}
		for j < len(sorted) && sorted[j].h == e.h {
			j++
		}
		if err := add(e); err != nil {
			return err
		}
	}
}

// fold merges everything into one base run (at path, with meta, when
// path is not ""), so that positions in it name chunks. Callers hold
// mu.
func (s *chunkStore) fold(meta runMeta, path string) error {
	if len(s.runs) == 0 && s.buf.len() == 0 && s.base != nil && path == "" {
		return nil
	}
	f := s.buf.frozen()
	srcs := append([]*run{s.base}, s.runs...)
	nb, err := s.writeRun(meta, path, func(add func(indexEntry) error) error {
		return mergeRuns(srcs, f.sorted, add)
	})
	if err != nil {
		s.noteErr(err)
		return err
	}
	for _, r := range srcs {
		r.close()
	}
	s.base, s.runs, s.buf, s.n, s.unchecked = nb, nil, newChunkIndex(), nb.n, false
	return nil
}

// setBase makes r the base of an empty store.
func (s *chunkStore) setBase(r *run) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.base.close()
	s.base, s.n, s.cached = r, r.n, r.n
	if s.filt != nil {
		s.filt = nil
		s.filtUsers--
		s.useFilterLocked()
	}
}

// each calls fn for every entry, once (in hash order when the store
// is unchecked). Callers hold mu for writing.
func (s *chunkStore) eachLocked(fn func(Hash, loc)) error {
	srcs := append([]*run{s.base}, s.runs...)
	if s.unchecked {
		return mergeRuns(srcs, s.buf.frozen().sorted, func(e indexEntry) error {
			fn(e.h, e.l)
			return nil
		})
	}
	for _, r := range srcs {
		if r == nil {
			continue
		}
		it := r.iter()
		for e, ok := it.next(); ok; e, ok = it.next() {
			fn(e.h, e.l)
		}
		it.release()
		if it.err != nil {
			return it.err
		}
	}
	s.buf.each(fn)
	return nil
}

func (s *chunkStore) each(fn func(Hash, loc)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.eachLocked(fn)
}

// frozen folds the store into its base and returns it: a sorted run
// whose positions name chunks (e.g. as bits of a set); later additions
// do not change it. The caller unpins it when done.
func (s *chunkStore) frozen() (*run, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.base == nil || len(s.runs) > 0 || s.buf.len() > 0 {
		if err := s.fold(runMeta{}, ""); err != nil {
			return nil, err
		}
	}
	s.base.pins.Add(1)
	return s.base, nil
}

// cacheSlack: the local index cache is written again (whole) once the
// entries it lacks reach 1/cacheSlack of those it holds. Until then an
// open reads the index objects written since (a few small ones after
// an incremental) and adds them in memory, rather than a close of a
// repository that added a few entries rewriting a file of all of them
// (55 MiB at 1 Mi chunks; measured 2026-12-07: 0.5–0.7 s of a 1 Mi
// incremental's 5 s). The rewrites then cost at most cacheSlack times
// the entries added. (A variable: tests change it.)
var cacheSlack int64 = 8

// cacheBehind reports whether the cache should be written again: it
// lacks entries, and enough of them (cacheSlack).
func (s *chunkStore) cacheBehind() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.changed && (s.n-s.cached)*cacheSlack >= s.cached
}

// close releases the runs' files.
func (s *chunkStore) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.base.close()
	for _, r := range s.runs {
		r.close()
	}
	s.base, s.runs, s.buf, s.n, s.changed, s.cached, s.unchecked = nil, nil, newChunkIndex(), 0, false, 0, false
	if s.filt != nil { // a writer still uses it: empty, as the store
		f := newBloom(0)
		if !s.filtGrow {
			f = newBloomBytes(uint64(filterBytes))
		}
		s.filt = &f
	}
}

// cacheDirFor is the local index cache's directory for a repository:
// dir when given, else cache/ inside a local repository's directory
// (skipped by its listings), else $UMBRA_CACHE_DIR or the user's cache
// directory under umbra/index/, in a directory per repository. Where
// none can be made, "" (the index is then rebuilt at every open, in
// unlinked temporary files).
func cacheDirFor(be Backend, cfg Config, dir string) string {
	var tries []string
	if dir != "" {
		tries = append(tries, dir)
	} else {
		if lb, ok := be.(*localBackend); ok {
			tries = append(tries, filepath.Join(lb.dir, localCacheDir))
		}
		sum := sha256.Sum256([]byte(be.Location()))
		sub := filepath.Join("umbra", "index", cfg.ID+"-"+hex.EncodeToString(sum[:6]))
		if d := os.Getenv("UMBRA_CACHE_DIR"); d != "" {
			tries = append(tries, filepath.Join(d, sub))
		} else if d, err := os.UserCacheDir(); err == nil {
			tries = append(tries, filepath.Join(d, sub))
		}
	}
	for _, d := range tries {
		if err := os.MkdirAll(d, 0o700); err == nil && unix.Access(d, unix.W_OK) == nil {
			return d
		}
	}
	return ""
}

// localCacheDir is the cache's directory in a local repository.
const localCacheDir = "cache"

// lockCacheDir takes the cache directory's flock (blocking) and returns
// its release; without a lock file it returns a no-op.
func lockCacheDir(dir string) func() {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return func() {}
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return func() {}
	}
	return func() { f.Close() }
}
