package cow

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/cespare/xxhash/v2"

	"umbra/internal/zero"
)

// preserver is the copy-before-write path of a Volume: before a write
// overwrites chunks that live snapshots still need, it reads their
// originals (readOriginal), gets them diff-area slots (allocSlot,
// applying the policy when the storage is full), hands them to the
// write-behind (non-persistent snapshots) or writes them and makes them
// durable with their mapping (storeRun, persistent ones), and records
// them in the mapping (placeLocked, claim). It also settles write-behind
// copies whose diff-area write failed (settleWriteBehind).
//
// It owns the buffers runs are read into, the count of copies and the
// write-behind's failure flag, and settleMu, which lets one settlement
// run at a time. What it changes of the volume (the snapshots, the
// mapping, the store's allocator, the log) is guarded by Volume.mu,
// taken for short steps, never across an I/O; the chunks it preserves
// are guarded by their stripe locks, which the caller holds.
type preserver struct {
	v *Volume // the volume it preserves for

	bufs     sync.Pool    // run buffers for runs not read into the write-behind
	copies   atomic.Int64 // chunks preserved since open (for metrics)
	wbFailed atomic.Bool  // a write-behind copy failed: settleWriteBehind
	settleMu sync.Mutex   // one settleWriteBehind at a time
}

// preserveRange preserves, for each chunk in c0..c1 written for the first
// time since the newest snapshot, what live snapshots need. The caller
// holds the chunks' stripe locks and writes the origin after it returns
// nil; an error means the origin write must not be issued (a snapshot's
// invalidation could not be made durable: metaRefused).
func (pr *preserver) preserveRange(c0, c1 uint64, quick bool) error {
	v := pr.v
	if err := v.metaRefused(); err != nil {
		return err
	}
	v.mu.RLock()
	n := v.newest()
	if n == nil {
		v.mu.RUnlock()
		return nil
	}
	var todoBuf [64]uint64 // a 256 KiB piece of 4 KiB chunks
	todo := todoBuf[:0]
	for c := c0; c <= c1; c++ {
		if !n.changed.Contains(uint32(c)) {
			todo = append(todo, c)
		}
	}
	v.mu.RUnlock()
	// Preserve runs of consecutive chunks with one read and as few
	// writes as their slots allow; a run fits one write-behind batch.
	maxRun := max(int(min(preserveBatch, int64(wbBatchBytes))/v.chunk), 1)
	for i := 0; i < len(todo); {
		j := i + 1
		for j < len(todo) && todo[j] == todo[j-1]+1 && j-i < maxRun {
			j++
		}
		if err := pr.preserveRun(todo[i], j-i, quick); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// writePiece is how much of a large write is preserved and written at a
// time: for non-persistent snapshots the write-behind writes one piece's
// originals to the diff area while the writer writes that piece of the
// origin and reads the next piece's originals, a pipeline over two
// cores. (A variable: the model test makes pieces small.)
var writePiece = 256 << 10

// preserveAndWrite preserves what p overwrites and writes p, piece by
// piece; the caller holds the stripe locks of all its chunks. Each
// piece's original is read (and, for persistent snapshots, made durable
// with its mapping) before that piece of the origin is written. With
// quick, the originals are read and p written with raw system calls where
// they can be (quickio.go).
func (pr *preserver) preserveAndWrite(p []byte, off int64, quick bool) (int, error) {
	v := pr.v
	done := 0
	for done < len(p) {
		at := off + int64(done)
		n := len(p) - done
		// A piece is at least a chunk and ends on a chunk boundary, so it
		// is never empty.
		if step := max(int64(writePiece), v.chunk); int64(n) > step {
			n = int((at+step)>>v.shift<<v.shift - at)
		}
		if err := pr.preserveRange(uint64(at)>>v.shift, uint64(at+int64(n)-1)>>v.shift, quick); err != nil {
			return done, err
		}
		k, err := v.writeOrigin(p[done:done+n], at, quick)
		done += k
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// preserveBatch bounds the bytes one preserveRun reads at once.
const preserveBatch = 1 << 20

// preserveRun copies chunks c0..c0+n-1, those written for the first time
// since the newest snapshot and still needed by a live snapshot, to the
// diff area. The caller holds their stripe locks. For non-persistent
// snapshots the copies go to the write-behind (writebehind.go), which
// writes them to the diff area off the writer's path, many at a time;
// readers find them in memory until then. Persistent snapshots keep the
// order their crash invariant needs: the originals and their mapping are
// durable when it returns nil, before the origin is written; an error
// means the origin must not be written (see preserveRange).
func (pr *preserver) preserveRun(c0 uint64, n int, quick bool) error {
	v := pr.v
	// A short run (a 4 KiB write's one chunk) needs no allocation.
	var needBuf [4]preserved
	r := run{need: needBuf[:0]}
	v.mu.Lock()
	nw := v.newest()
	if nw == nil {
		v.mu.Unlock()
		return nil
	}
	r.gen = nw.gen
	for c := c0; c < c0+uint64(n); c++ {
		if !nw.changed.CheckedAdd(uint32(c)) {
			continue
		}
		if v.usersAbove(c, r.gen) {
			if left := c0 + uint64(n) - c; len(r.need) == 0 && left > uint64(cap(r.need)) {
				r.need = make([]preserved, 0, left)
			}
			r.need = append(r.need, preserved{c: c})
		}
	}
	sy := syncers{log: v.log.syncer(), store: v.store.sync}
	wb := v.store.wb
	v.mu.Unlock()
	if len(r.need) == 0 {
		return nil
	}
	r.first = r.need[0].c
	last := r.need[len(r.need)-1].c
	span := int64(last-r.first)<<v.shift + v.chunkLen(last)
	// A run for the write-behind is read straight into its batch.
	behind := sy.log == nil && wb.fitsSpace(span)
	var (
		sp  wbSpace
		bp  *[]byte
		buf []byte // the originals of chunks r.first to last
	)
	if behind {
		sp = wb.reserve(span)
		buf = sp.buf
	} else {
		bp = pr.bufs.Get().(*[]byte)
		if int64(cap(*bp)) < span {
			*bp = make([]byte, max(span, preserveBatch))
		}
		buf = (*bp)[:span]
	}
	if err := pr.readOriginal(buf, int64(r.first)<<v.shift, quick); err != nil {
		pr.releaseRun(wb, sp, bp)
		v.mu.Lock()
		for _, p := range r.need {
			v.invalidateUsers(p.c, r.gen, fmt.Sprintf("reading original of chunk %d from origin %s failed: %v", p.c, v.originPath, err))
		}
		v.mu.Unlock()
		return v.syncInvalidation(sy.log)
	}
	pr.allocSlots(&r, buf)
	if behind {
		pr.queue(&r, wb, sp)
		pr.releaseRun(wb, sp, bp)
		pr.placeAll(&r)
		return nil
	}
	defer pr.releaseRun(wb, sp, bp)
	if sy.log != nil && r.anyData {
		pr.writeAhead(&r)
	}
	return pr.storeRun(&r, buf, sy)
}

// writeAhead zeroes the diff area's next slots (zeroAhead) when r's
// copies go past its written space, so that later persistent copies
// are written over space the file has: their fdatasync commits no
// journal transaction (see zeroBatch).
func (pr *preserver) writeAhead(r *run) {
	v := pr.v
	top := int64(-1)
	for _, p := range r.need {
		if p.keep && p.slot != zeroSlot {
			top = max(top, p.slot)
		}
	}
	v.mu.Lock()
	st := v.store
	from, n := st.reserveZeros(top)
	v.mu.Unlock()
	if n > 0 {
		v.zeroAhead(st, from, n)
	}
}

// run is the chunks one preserveRun preserves, on their way to the diff
// area, and the slot each got. Their originals, read at once, and the
// syncers are kept beside it, not in it: a buffer passed through an
// interface escapes, and so does a syncer, and a run holding either
// would take its chunks (on the stack for a short run) to the heap.
type run struct {
	need    []preserved // the chunks, ascending (with gaps where nothing is needed)
	first   uint64      // the chunk the originals' buffer starts with: need[0].c
	gen     uint64      // the generation they are preserved for
	anyData bool        // some chunk got a slot (not all zero, not given up)
}

// syncers are the group syncers as a run began: the metadata log's (nil:
// no persistent snapshot lived) and the diff area's.
type syncers struct{ log, store *groupSyncer }

// allocSlots gives each chunk of r a slot: zeroSlot for an all-zero
// original (in buf), else one of the diff area's (allocSlot; keep is
// false when the policy gave the chunk up).
func (pr *preserver) allocSlots(r *run, buf []byte) {
	v := pr.v
	v.mu.Lock()
	for i := range r.need {
		p := &r.need[i]
		if zero.All(v.chunkIn(buf, r.first, p.c)) {
			p.slot, p.keep = zeroSlot, true
			continue
		}
		p.slot, p.keep = pr.allocSlot(p.c, r.gen)
		r.anyData = r.anyData || p.keep
	}
	v.mu.Unlock()
}

// queue hands the chunks of r that got a slot to the write-behind, in
// whose room sp their originals were read.
func (pr *preserver) queue(r *run, wb *writeBehind, sp wbSpace) {
	v := pr.v
	var itemBuf [4]wbItem
	items := itemBuf[:0]
	if len(r.need) > len(itemBuf) {
		items = make([]wbItem, 0, len(r.need))
	}
	for _, p := range r.need {
		if !p.keep || p.slot == zeroSlot {
			continue
		}
		off, n := int(p.c-r.first)<<v.shift, int(v.chunkLen(p.c))
		items = append(items, wbItem{slot: p.slot, chunk: p.c, off: off, data: sp.buf[off : off+n : off+n]})
	}
	wb.addAll(sp, items)
}

// readOriginal reads the originals at off into p, before the write that
// overwrites them. A run of 64 KiB or more of an origin in memory (tmpfs)
// is copied from its mapping (MappedRange's): pread goes through tmpfs a
// page at a time, 0.19-0.22 ms a MiB here against 0.09-0.10 for a copy
// from pages already mapped (0.2 with a fault per 64 KiB the first time),
// and this read is on the writer's path. A shorter one is read with
// pread: a first copy from a page not yet mapped costs a fault, ~2.6 us,
// more than a 4 KiB pread (~1.2 us). A copy that faults on an error falls
// back to pread, which reports what is wrong. With quick, a run in the
// page cache is read with a raw system call (readAtQuick).
func (pr *preserver) readOriginal(p []byte, off int64, quick bool) error {
	v := pr.v
	if of, ok := v.origin.(osFile); ok && quick && of.readAtQuick(p, off) {
		return nil
	}
	if of, ok := v.origin.(osFile); ok && len(p) >= mapOriginalMin && of.nowait.Load() == nowaitMemory {
		if b, release, ok := v.MappedRange(off, int64(len(p))); ok {
			ok = copyMapped(p, b)
			release()
			if ok {
				return nil
			}
		}
	}
	if _, err := v.origin.ReadAt(p, off); err != nil && err != io.EOF {
		return err
	}
	return nil
}

const mapOriginalMin = 64 << 10

// preserved is a chunk preserveRun preserves: the slot it got (zeroSlot
// for an all-zero original) and whether it is kept (false when the
// policy gave it up).
type preserved struct {
	c    uint64
	slot int64
	keep bool
	sum  uint64 // xxHash64 of the original, for a persistent snapshot's MAP record (slot >= 0)
}

// releaseRun hands back what preserveRun read a run into: room in the
// write-behind (sp) or a pooled buffer (bp).
func (pr *preserver) releaseRun(wb *writeBehind, sp wbSpace, bp *[]byte) {
	if bp == nil {
		wb.release(sp)
	} else {
		pr.bufs.Put(bp)
	}
}

// storeRun writes the chunks of r, whose originals buf holds, to their
// slots (runs of consecutive slots at once), makes them durable (sy)
// when a persistent snapshot needs it, and records them in the mapping.
// An error means the origin must not be written (see preserveRange).
func (pr *preserver) storeRun(r *run, buf []byte, sy syncers) error {
	v := pr.v
	need := r.need
	// Write runs of consecutive chunks that got consecutive slots at once.
	for i := 0; i < len(need); {
		if !need[i].keep || need[i].slot == zeroSlot {
			i++
			continue
		}
		j := i + 1
		for j < len(need) && need[j].keep && need[j].c == need[j-1].c+1 && need[j].slot == need[j-1].slot+1 {
			j++
		}
		lo := int64(need[i].c-r.first) << v.shift
		hi := int64(need[j-1].c-r.first)<<v.shift + v.chunkLen(need[j-1].c)
		if _, err := v.store.f.WriteAt(buf[lo:hi], need[i].slot*v.chunk); err != nil {
			// Retry one by one: the slow path applies the policy.
			v.mu.Lock()
			for _, p := range need[i:j] {
				v.store.release(p.slot)
			}
			v.mu.Unlock()
			for k := i; k < j; k++ {
				p := &need[k]
				p.slot, p.keep = pr.writeSlot(p.c, r.gen, v.chunkIn(buf, r.first, p.c))
			}
		}
		i = j
	}
	// The mapping records carry their data's checksum, so the data and
	// the records are made durable together, one stage: replay keeps a
	// record only if its slot holds the bytes it was written with, and a
	// record whose data did not reach the disk is one whose origin write
	// was never issued (it waits for both syncs below).
	for i := range need {
		if p := &need[i]; p.keep && p.slot != zeroSlot {
			p.sum = xxhash.Sum64(v.chunkIn(buf, r.first, p.c))
		}
	}
	v.mu.Lock()
	pr.placeLocked(r)
	lsync := v.log.syncer()
	v.mu.Unlock()
	if lsync == nil {
		return nil
	}
	var ssync *groupSyncer
	if r.anyData {
		ssync = sy.store
	}
	serr, lerr := syncPair(ssync, lsync)
	switch {
	case lerr != nil:
		return v.logFailed(lerr)
	case serr != nil:
		// The records may be durable and their data not all: replay
		// would drop those records while the origin write goes ahead.
		// The snapshots are invalid on disk before it does.
		why := fmt.Sprintf("syncing diff area %s failed: %v", v.storePath(), serr)
		v.mu.Lock()
		for _, s := range v.snaps {
			v.invalidate(s, why)
		}
		v.mu.Unlock()
		return v.syncInvalidation(lsync)
	}
	return nil
}

// syncPair runs the diff area's group sync (store; nil: no data to sync)
// and the log's at once, and returns their errors.
func syncPair(store, log *groupSyncer) (storeErr, logErr error) {
	if store == nil {
		return nil, log.sync()
	}
	done := make(chan error, 1)
	go func() { done <- store.sync() }()
	logErr = log.sync()
	return <-done, logErr
}

// placeAll records the kept chunks of r in the mapping at their slots.
// Chunks queued in the write-behind are recorded at once: readers find
// pending slots in memory.
func (pr *preserver) placeAll(r *run) {
	v := pr.v
	v.mu.Lock()
	pr.placeLocked(r)
	v.mu.Unlock()
}

// placeLocked records the kept chunks of r, preserved for generation
// r.gen. If that snapshot was deleted meanwhile, they go where deleting
// it would have put them. Caller holds Volume.mu.
func (pr *preserver) placeLocked(r *run) {
	v := pr.v
	s := v.snapByGen(r.gen)
	if s == nil {
		s = v.predecessor(r.gen)
	}
	placed := make([]entry, 0, len(r.need))
	for _, p := range r.need {
		if p.keep && pr.claim(s, p.c, p.slot, p.sum) {
			placed = append(placed, entry{chunk: p.c, gen: s.gen, slot: p.slot})
		}
	}
	v.entries.insertRun(placed)
}

// settleWriteBehind deals with write-behind copies whose diff-area write
// failed, as a synchronous write would have: each is written to a new
// slot, or, when that fails for lack of space, the policy applies; on
// another error the snapshots that read it are invalidated. With wait,
// it first waits for what is pending, so the outcome shows in the next
// listing.
func (pr *preserver) settleWriteBehind(wait bool) {
	v := pr.v
	v.mu.RLock()
	st := v.store
	v.mu.RUnlock()
	if st == nil {
		return
	}
	if wait {
		st.wb.drain()
	}
	if !st.wb.hasFailed.Load() {
		return
	}
	pr.settleMu.Lock()
	defer pr.settleMu.Unlock()
	pr.wbFailed.Store(false)
	for _, it := range st.wb.failures() {
		pr.resettle(st, it)
	}
}

// resettle moves a failed write-behind copy to a new slot (see
// settleWriteBehind).
func (pr *preserver) resettle(st *store, it *wbItem) {
	v := pr.v
	v.mu.Lock()
	defer v.mu.Unlock()
	// current is the copy's entry as it stands now: each time mu was let
	// go the entry may have been dropped and its slot freed (and handed
	// out again), and acting on an older value would free that slot a
	// second time. Not found: the copy was cancelled with it.
	current := func() (entry, bool) {
		if v.store != st {
			return entry{}, false
		}
		return v.entryAt(it.chunk, it.slot)
	}
	for {
		e, ok := current()
		if !ok {
			return
		}
		ns, full := st.alloc(v.maxSlots())
		if full {
			if v.lackRoom(e, fmt.Sprintf("shadow storage limit of %d bytes in %s reached", v.maxStorage, v.storageDir)) {
				continue
			}
			return
		}
		v.mu.Unlock()
		_, err := st.f.WriteAt(it.data, ns*v.chunk)
		v.mu.Lock()
		if err != nil {
			st.release(ns)
			if e, ok = current(); !ok {
				return
			}
			if isNoSpace(err) {
				if v.lackRoom(e, fmt.Sprintf("filesystem of shadow storage %s is full", v.storageDir)) {
					continue
				}
				return
			}
			v.dropReaders(e, fmt.Sprintf("writing diff area %s failed: %v", v.storePath(), err))
			return
		}
		if e, ok = current(); !ok {
			if v.store == st { // else that store is gone, ns with it
				v.freeSlots([]int64{ns})
			}
			return
		}
		e.slot, ns = ns, e.slot
		v.entries.ReplaceOrInsert(e)
		v.freeSlots([]int64{ns}) // the failed slot: cancels the copy
		return
	}
}

// allocSlot allocates a diff-area slot for chunk c, applying the policy
// when the storage is full; ok is false when the chunk no longer needs
// preserving. Caller holds Volume.mu.
func (pr *preserver) allocSlot(c, gen uint64) (slot int64, ok bool) {
	v := pr.v
	for {
		if !v.usersAbove(c, gen) {
			return 0, false
		}
		s, full := v.store.alloc(v.maxSlots())
		if !full {
			return s, true
		}
		if !v.makeRoom(c, gen, fmt.Sprintf("shadow storage limit of %d bytes in %s reached", v.maxStorage, v.storageDir)) {
			return 0, false
		}
	}
}

// writeSlot allocates a diff-area slot for chunk c (applying the policy
// when full) and writes data to it. ok is false when the chunk is not
// preserved (its users were invalidated or deleted).
func (pr *preserver) writeSlot(c, gen uint64, data []byte) (slot int64, ok bool) {
	v := pr.v
	for {
		v.mu.Lock()
		s, ok := pr.allocSlot(c, gen)
		v.mu.Unlock()
		if !ok {
			return 0, false
		}
		_, err := v.store.f.WriteAt(data, s*v.chunk)
		if err == nil {
			return s, true
		}
		v.mu.Lock()
		v.store.release(s)
		if isNoSpace(err) {
			if !v.makeRoom(c, gen, fmt.Sprintf("filesystem of shadow storage %s is full", v.storageDir)) {
				v.mu.Unlock()
				return 0, false
			}
			v.mu.Unlock()
			continue
		}
		v.invalidateUsers(c, gen, fmt.Sprintf("writing diff area %s failed: %v", v.storePath(), err))
		v.mu.Unlock()
		return 0, false
	}
}

func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) || errors.Is(err, syscall.EFBIG)
}

// claim makes snapshot s (nil: gone) the owner of chunk c's copy in slot
// and logs it (with sum, the copy's checksum, when it has a slot),
// unless s is gone or owns c already: then the slot is freed. True means
// the caller puts the entry in the mapping.
func (pr *preserver) claim(s *snap, c uint64, slot int64, sum uint64) bool {
	v := pr.v
	if s == nil || !s.owned.CheckedAdd(uint32(c)) {
		if slot != zeroSlot {
			v.freeSlots([]int64{slot})
		}
		return false
	}
	pr.copies.Add(1)
	if slot != zeroSlot {
		s.nonzero++
	}
	v.log.append(record{Type: recMap, Chunk: c, Gen: s.gen, Slot: slot, Summed: slot != zeroSlot, Sum: sum})
	return true
}
