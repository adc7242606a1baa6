package cow

import (
	"sync"
	"sync/atomic"
	"time"
)

// writeBehind keeps the preserved chunks of non-persistent snapshots in
// memory until a background goroutine writes them to the diff area, many
// at a time. A first write under a snapshot then costs the origin read
// and the origin write in the writer's path; the diff-area write (the
// costliest of the three where it allocates space) runs on another core,
// and for a large write overlaps the writer's next pieces and next
// writes.
//
// Non-persistent snapshots need no durability, so nothing orders these
// writes against the origin's. What holds instead:
//   - a reader of a slot sees its bytes: a pending slot is read from
//     memory (read), and a slot stops being pending only once its bytes
//     are in the file;
//   - a freed slot is never overwritten by a late write: cancel drops a
//     slot from the filling batch and waits for the batch in flight;
//   - a failed write loses nothing: the chunk stays pending (readable)
//     until the volume moves it to a new slot or applies its policy
//     (Volume.settleWriteBehind), which cancels it.
//
// w.mu is a leaf lock: nothing else is locked while it is held, and the
// flusher takes no other lock, so callers may wait for it holding theirs.
type writeBehind struct {
	f     File
	chunk int64

	mu       sync.Mutex
	cond     *sync.Cond // the flusher and waiters
	cur      *wbBatch   // filling
	full     []*wbBatch // filled, waiting for the flusher, oldest first
	flying   *wbBatch   // being written; nil when idle
	failed   []*wbItem  // written with an error; still pending
	kick     bool       // write cur now, full or not
	timer    *time.Timer
	started  bool
	stopped  bool
	draining int               // drain calls waiting
	roomWait int               // reserve calls waiting for room
	idleRuns int               // times the flusher found nothing to take (the tests wait on it)
	spares   [][]byte          // buffers of written batches, for new ones
	pending  map[int64]*wbItem // by slot: the items not yet in the file
	slab     []wbItem          // where addAll puts items, wbSlab at a time

	items     atomic.Int64 // pending items (cur, flying, failed), read without mu
	hasFailed atomic.Bool
	onFail    func() // called (without mu) after a write failed
}

// wbItem is one preserved chunk: its slot, the chunk it holds (to find
// its mapping after a failure) and its bytes.
type wbItem struct {
	slot  int64
	chunk uint64
	off   int    // of the bytes in the batch's buf
	data  []byte // the bytes
	dead  bool   // cancelled: not to be written
}

type wbBatch struct {
	items    []*wbItem
	buf      []byte // the items' bytes, in order
	reserved int    // spaces handed out, not yet released: not to be written
	timed    bool   // the flush timer runs for it
}

// wbSpace is room in a batch that a writer reads a chunk's original
// straight into (the origin read), then names the chunks in it with add
// and hands back with release — no copy between the read and the batch.
// The flusher does not write a batch while a space in it is out.
type wbSpace struct {
	b   *wbBatch
	off int    // of buf in b.buf
	buf []byte // the room
}

// wbBatchBytes is how much is written to the diff area at once (512 KiB:
// waking the idle flusher costs ~10 us of the writer's time on these
// VMs, and 128 first writes of 4 KiB share one wakeup; 256 KiB gave
// 0.38x of the no-snapshot baseline, 512 KiB 0.42x); wbDelay
// bounds how long a partly filled batch waits for more (1 s: nothing
// waits on it but memory, which a batch bounds anyway, and readers find
// its copies there. At 2 ms a slow writer's batches stayed small — first
// writes through the kernel's nbd client in a VM under TCG: 8192 first
// writes, 1291 diff-area writes — and each flush cost a timer goroutine,
// a flusher wakeup and a write that extends the diff area; at 20 ms the
// server spent 2.0-2.1 ms of CPU a first write against 5.1-6.1 and ran
// 2.8-2.9x faster, in alternating passes of bench/vm.sh, 2026-12-07,
// host load 30-38, one round of three the other way at 0.85x. At 20 ms
// that VM's few hundred first writes a second still made batches of ~9
// (2048 first writes, 224 diff-area writes, 2026-12-07), each flush
// with its timer goroutine and wakeups; at 1 s a batch fills first at
// any rate above ~128 first writes a second); wbQueue is how
// many filled batches may wait while one is written, so that a write
// that stalls for a few milliseconds (fresh pages on a busy machine: up
// to ~7 ms at p99 under load here) does not stall the writers behind it
// (8, 4 MiB: the 1 MiB first write measured 0.415x of the no-snapshot
// baseline against 0.393x with 4, seven alternating pairs). At most
// wbQueue+2 buffers are out at once, ~5 MiB a volume.
// (Variables: the model test makes batches tiny.)
var (
	wbBatchBytes = 512 << 10
	wbDelay      = time.Second
	wbQueue      = 8
)

// wbSlab is how many items addAll allocates at once: one allocation per
// 64 first writes of a chunk instead of one each (a slab stays in memory
// while one of its items does: 64 items, 3.5 KiB).
const wbSlab = 64

func newWriteBehind(f File, chunk int64) *writeBehind {
	w := &writeBehind{f: f, chunk: chunk, pending: map[int64]*wbItem{}}
	w.cond = sync.NewCond(&w.mu)
	w.cur = w.newBatch()
	return w
}

func (w *writeBehind) newBatch() *wbBatch {
	b := &wbBatch{}
	if n := len(w.spares); n > 0 {
		b.buf, w.spares = w.spares[n-1][:0], w.spares[:n-1]
	} else {
		b.buf = make([]byte, 0, max(int64(wbBatchBytes), 2*w.chunk))
	}
	b.items = make([]*wbItem, 0, int64(cap(b.buf))/w.chunk) // one allocation, not one per doubling
	return b
}

func (b *wbBatch) fits(n int64) bool { return int64(len(b.buf))+n <= int64(cap(b.buf)) }

// fitsSpace reports whether n bytes fit one batch (see reserve).
func (w *writeBehind) fitsSpace(n int64) bool { return n <= max(int64(wbBatchBytes), 2*w.chunk) }

// reserve returns n bytes of room (n within fitsSpace) in the filling
// batch. It waits only while that batch is full and wbQueue filled ones
// wait for the flusher. The caller fills the room, adds the chunks in it
// and releases it, soon: the batch waits for it.
func (w *writeBehind) reserve(n int64) wbSpace {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.started {
		w.started = true
		go w.run()
	}
	for !w.cur.fits(n) && !w.queueCur() {
		w.roomWait++
		w.cond.Wait()
		w.roomWait--
	}
	b := w.cur
	at := len(b.buf)
	b.buf = b.buf[:at+int(n)]
	b.reserved++
	if w.draining > 0 {
		w.cond.Broadcast() // the batch is no longer writable: drain must look again
	}
	return wbSpace{b: b, off: at, buf: b.buf[at : at+int(n) : at+int(n)]}
}

// add queues the n bytes at off in sp, filled already, as chunk c's
// preserved bytes for slot. From now on read finds them.
func (w *writeBehind) add(sp wbSpace, off, n int, slot int64, c uint64) {
	w.addAll(sp, []wbItem{{slot: slot, chunk: c, off: off, data: sp.buf[off : off+n : off+n]}})
}

// addAll is add for many chunks of sp at once (one lock: a 1 MiB write
// preserves 256 of 4 KiB): each item names its slot, chunk, and bytes at
// off in sp.buf (data, a slice of sp.buf). The items are copied into the
// slab, so a first write allocates nothing here.
func (w *writeBehind) addAll(sp wbSpace, items []wbItem) {
	w.mu.Lock()
	for i := range items {
		if len(w.slab) == cap(w.slab) {
			w.slab = make([]wbItem, 0, max(wbSlab, len(items)-i))
		}
		w.slab = append(w.slab, items[i])
		it := &w.slab[len(w.slab)-1]
		it.off += sp.off
		sp.b.items = append(sp.b.items, it)
		w.pending[it.slot] = it
	}
	w.items.Add(int64(len(items)))
	w.mu.Unlock()
}

// release hands sp back: its batch may be written once no other space
// in it is out. Room not added stays unused.
func (w *writeBehind) release(sp wbSpace) {
	w.mu.Lock()
	defer w.mu.Unlock()
	b := sp.b
	b.reserved--
	if b.reserved == 0 && (b != w.cur || w.kick) {
		w.cond.Broadcast() // the flusher may wait for it (not otherwise: a wakeup per write costs)
	}
	if b != w.cur {
		return
	}
	switch {
	case !b.fits(w.chunk):
		w.queueCur()
	case len(b.items) > 0 && !b.timed:
		b.timed = true
		if w.timer == nil {
			w.timer = time.AfterFunc(wbDelay, w.flushSoon)
		} else {
			w.timer.Reset(wbDelay)
		}
	}
}

// queueCur hands the filling batch to the flusher's queue and starts a
// new one; false when the queue is full. Caller holds w.mu.
func (w *writeBehind) queueCur() bool {
	if len(w.full) >= wbQueue {
		return false
	}
	w.full = append(w.full, w.cur)
	w.cur = w.newBatch()
	w.cond.Broadcast()
	return true
}

func (w *writeBehind) flushSoon() {
	w.mu.Lock()
	w.kick = true
	w.cond.Broadcast()
	w.mu.Unlock()
}

// run is the flusher: it writes the queued batches in order, and the
// filling one when it is full (the queue was full when it filled), when
// wbDelay has passed, or when someone waits for it.
func (w *writeBehind) run() {
	w.mu.Lock()
	defer w.mu.Unlock()
	var live []*wbItem // reused from batch to batch
	for {
		if w.stopped {
			return
		}
		b := w.next()
		if b == nil {
			w.idleRuns++
			w.cond.Wait()
			continue
		}
		w.flying = b
		w.cond.Broadcast()
		clear(live)
		live = live[:0]
		for _, it := range b.items {
			if !it.dead {
				live = append(live, it)
			}
		}
		w.mu.Unlock()
		failed := w.write(b.buf, live)
		w.mu.Lock()
		done := int64(0)
		for _, it := range b.items {
			if it.dead {
				continue
			}
			if failed[it] {
				it.data = append([]byte(nil), it.data...) // b.buf is reused
				w.failed = append(w.failed, it)
				continue
			}
			if w.pending[it.slot] == it {
				delete(w.pending, it.slot)
			}
			done++
		}
		w.items.Add(-done)
		w.hasFailed.Store(len(w.failed) > 0)
		w.flying = nil
		if len(w.spares) < wbQueue+1 { // enough for a full queue: a new buffer's pages are faulted in afresh
			w.spares = append(w.spares, b.buf)
		}
		w.cond.Broadcast()
		if len(failed) > 0 && w.onFail != nil {
			w.mu.Unlock()
			w.onFail()
			w.mu.Lock()
		}
	}
}

// next takes the batch to write now, or returns nil: the oldest filled
// batch, else the filling one once it is full, wbDelay has passed or
// someone waits for it — but never one with a space out. Caller holds
// w.mu.
func (w *writeBehind) next() *wbBatch {
	if len(w.full) > 0 {
		b := w.full[0]
		if b.reserved > 0 {
			return nil
		}
		w.full[0] = nil
		w.full = w.full[1:]
		return b
	}
	w.kick = w.kick && len(w.cur.items) > 0
	if len(w.cur.items) == 0 || !w.kick && w.cur.fits(w.chunk) || w.cur.reserved > 0 {
		return nil
	}
	b := w.cur
	w.cur, w.kick = w.newBatch(), false
	return b
}

// write writes items (their bytes are in buf), runs of consecutive slots
// adjacent in buf at once, and returns those that failed.
func (w *writeBehind) write(buf []byte, items []*wbItem) map[*wbItem]bool {
	var failed map[*wbItem]bool
	for i := 0; i < len(items); {
		j := i + 1
		for j < len(items) && items[j].slot == items[j-1].slot+1 && items[j].off == items[j-1].off+len(items[j-1].data) && int64(len(items[j-1].data)) == w.chunk {
			j++
		}
		last := items[j-1]
		// Raw system calls on an OS file (writeAtRaw): an ordinary one woke
		// the runtime's monitor thread.
		if _, err := writeAtRaw(w.f, buf[items[i].off:last.off+len(last.data)], items[i].slot*w.chunk); err != nil {
			if failed == nil {
				failed = map[*wbItem]bool{}
			}
			for _, it := range items[i:j] {
				failed[it] = true
			}
		}
		i = j
	}
	return failed
}

// find returns the pending item for slot, or nil (cancel drops what it
// kills from pending). Caller holds w.mu.
func (w *writeBehind) find(slot int64) *wbItem { return w.pending[slot] }

// anyPending reports whether one of the n slots from slot on is still
// pending; when not, their bytes are in the file (a slot in use never
// becomes pending again).
func (w *writeBehind) anyPending(slot int64, n int) bool {
	if w.items.Load() == 0 {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for s := slot; s < slot+int64(n); s++ {
		if w.find(s) != nil {
			return true
		}
	}
	return false
}

// read copies slot's pending bytes from inChunk on into p; false when the
// slot is not pending (its bytes are in the file).
func (w *writeBehind) read(slot int64, p []byte, inChunk int64) bool {
	if w.items.Load() == 0 {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	it := w.find(slot)
	if it == nil {
		return false
	}
	n := copy(p, it.data[min(inChunk, int64(len(it.data))):])
	clear(p[n:]) // past a short last chunk
	return true
}

// cancel forgets freed slots. When one is being written, it waits for
// that write, so the slot can be handed out again at once.
func (w *writeBehind) cancel(slots []int64) {
	if w.items.Load() == 0 {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	wait := false
	for _, s := range slots {
		it := w.find(s)
		if it == nil {
			continue
		}
		it.dead = true
		delete(w.pending, s)
		w.items.Add(-1)
		for i, f := range w.failed {
			if f == it {
				w.failed = append(w.failed[:i], w.failed[i+1:]...)
				break
			}
		}
		if w.flying != nil {
			for _, f := range w.flying.items {
				wait = wait || f == it
			}
		}
	}
	w.hasFailed.Store(len(w.failed) > 0)
	for wait && w.flying != nil {
		w.cond.Wait()
	}
}

// drain writes everything pending and waits for it; failures stay in
// failed. It does not wait for a batch with room out, nor for those
// queued behind it (they go in order): the writer holding the room may
// be waiting for a lock the caller holds (the volume empties its store
// under Volume.mu). Its items are written when the room comes back.
//
// Every change that can make writable false wakes the drainers: the
// flusher finishing or taking a batch, and a reserve while one drains
// (the room it takes makes its batch unwritable; without the wakeup the
// drainer would sleep on a batch that waits for a writer blocked behind
// the drainer's caller).
func (w *writeBehind) drain() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.draining++
	defer func() { w.draining-- }()
	for !w.stopped && w.writable() {
		w.kick = true
		w.cond.Broadcast()
		w.cond.Wait()
	}
}

// writable reports whether a batch is in flight or the flusher can take
// one with items now or after those before it. Caller holds w.mu.
func (w *writeBehind) writable() bool {
	if w.flying != nil {
		return true
	}
	for _, b := range w.full {
		if b.reserved > 0 {
			return false
		}
		if len(b.items) > 0 {
			return true
		}
	}
	return w.cur.reserved == 0 && len(w.cur.items) > 0
}

// dropSpares lets the buffers of written batches go: the volume has no
// snapshot left and gives its diff area's space back.
func (w *writeBehind) dropSpares() {
	w.mu.Lock()
	w.spares = nil
	w.mu.Unlock()
}

// failures returns the items whose write failed (they stay pending).
func (w *writeBehind) failures() []*wbItem {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]*wbItem(nil), w.failed...)
}

// stop ends the flusher; what is pending is dropped. The store is being
// closed or emptied: no slot is in use.
func (w *writeBehind) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.flying != nil {
		w.cond.Wait()
	}
	w.stopped = true
	if w.timer != nil {
		w.timer.Stop()
	}
	w.cond.Broadcast()
}
