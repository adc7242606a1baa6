package backup

import (
	"bytes"
	"cmp"
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"runtime"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Restore writes image id to the file or device at path, verifying every
// chunk; zero chunks of a regular file are left as holes.
func (r *Repo) Restore(id, path string, progress func(done, total int64)) error {
	return r.RestoreContext(context.Background(), id, path, progress)
}

// restoreCache bounds the chunks a restore keeps for later batches of a
// segment; restoreNextCache those it keeps for the next segment, out of
// blobs opened for this one; adjacentRead bounds one read of adjacent
// blobs of a pack.
var (
	restoreCache     int64 = 64 << 20
	restoreNextCache int64 = 8 << 20
)

const adjacentRead = 2 << 20

// RestoreContext is Restore with a context. Memory is bounded by a batch
// per worker, the chunk cache (restoreCache and restoreNextCache), two
// segments of the image's chunk list and their plans, and the
// repository's index: not by the volume's size.
// A restore that fails removes the file it created; a file or device that
// was there before keeps what was written, and the error says so.
func (r *Repo) RestoreContext(ctx context.Context, id, path string, progress func(done, total int64)) (err error) {
	x, err := r.image(ctx, id)
	if err != nil {
		return err
	}
	f, regular, created, err := openTarget(path, x.Size)
	if err != nil {
		return fmt.Errorf("restore %s to %s: %w", id, path, err)
	}
	defer func() {
		f.Close()
		switch {
		case err == nil:
		case created:
			os.Remove(path)
			err = fmt.Errorf("%w (the partial file %s was removed)", err, path)
		default:
			err = fmt.Errorf("%w (%s now holds part of the image: restore again before using it)", err, path)
		}
	}()
	// Workers take whole batches: fetch, open and check each on its own
	// core; one writer goroutine writes the finished batches. Writes into
	// one file take its inode lock in turn (tmpfs, ext4, xfs), so two
	// writers only spin on each other: on tmpfs two goroutines wrote 1.4
	// GiB in the time one did, at twice the CPU (docs/benchmarks.md,
	// measured 2026-12-03). Memory: workers+2 batch buffers and the shared
	// chunk cache.
	rs := r.newRestoreRun(x, path)
	rs.f, rs.regular, rs.progress = f, regular, progress
	go rs.writer()
	err = r.eachPlannedSegment(ctx, x, nil, rs.cache.ahead, func(first int64, hs []Hash, p *usePlan) error {
		rs.cache.start(p)
		if err := rs.batches(ctx, first, hs); err != nil {
			return fmt.Errorf("restore %s: %w", id, err)
		}
		return nil
	})
	close(rs.writes)
	if werr := <-rs.wrote; werr != nil {
		err = fmt.Errorf("restore %s: %w", id, werr) // the cause: the workers stopped for it
	}
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("restore to %s: %w", path, err)
	}
	return nil
}

// planned and starting, when set (tests), are called with a segment's
// first chunk once its plan is made and before it is restored;
// blobOpened with each blob a restore's worker opens.
var (
	planned, starting func(first int64)
	blobOpened        func(pack, off uint32)
)

// eachPlannedSegment calls fn with each segment of x's chunk list and its
// plan (planUses), in order. One goroutine reads and plans the next
// segment while fn restores the current one: planning (an index lookup
// for each distinct chunk) is otherwise a stretch where one core works
// and the other waits, at every segment. At most two plans exist at
// once: the current one and the next. want (nil: every segment) says
// whether a segment is wanted at all: one that is not is neither planned
// nor given to fn. ahead (nil: none) is given each plan as soon as it is
// made, while the segment before it may still be restoring.
func (r *Repo) eachPlannedSegment(ctx context.Context, x *Image, want func(first int64, hs []Hash) bool, ahead func(*usePlan), fn func(first int64, hs []Hash, p *usePlan) error) error {
	type segPlan struct {
		first int64
		hs    []Hash
		p     *usePlan
		err   error
	}
	pctx, cancel := context.WithCancel(ctx)
	plans := make(chan segPlan) // unbuffered: the next plan waits, made
	var wg sync.WaitGroup
	wg.Go(func() {
		defer close(plans)
		for k := range x.numSegments() {
			first, hs, err := r.segment(pctx, x, k)
			if err == nil && want != nil && !want(first, hs) {
				continue
			}
			var p *usePlan
			if err == nil {
				p = r.planUses(first, hs)
				if ahead != nil {
					ahead(p)
				}
				if planned != nil {
					planned(first)
				}
			}
			select {
			case plans <- segPlan{first, hs, p, err}:
			case <-pctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	})
	defer func() {
		cancel()
		for range plans { // let the planner see the cancel and end
		}
		wg.Wait()
	}()
	for s := range plans {
		if s.err != nil {
			return s.err
		}
		if starting != nil {
			starting(s.first)
		}
		if err := fn(s.first, s.hs, s.p); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// openTarget opens a restore's target for an image of size bytes: a
// regular file, created or emptied and sized to the image (so zero
// chunks stay holes), or a block device, opened exclusively — the
// kernel refuses with EBUSY while it is mounted or held, which would
// otherwise be overwritten under a live filesystem — and checked to hold
// the whole image before anything is written. created says the file is
// new.
func openTarget(path string, size int64) (f *os.File, regular, created bool, err error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, false, false, err
		}
		if err := f.Truncate(size); err != nil {
			f.Close()
			os.Remove(path)
			return nil, false, false, err
		}
		return f, true, true, nil
	case err != nil:
		return nil, false, false, err
	case fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0:
		f, err = os.OpenFile(path, os.O_RDWR|os.O_EXCL, 0)
		if errors.Is(err, syscall.EBUSY) {
			return nil, false, false, fmt.Errorf("%w: the device is in use (mounted, or held by another program); unmount it first", err)
		}
		if err != nil {
			return nil, false, false, err
		}
		n, err := f.Seek(0, io.SeekEnd)
		if err == nil && n < size {
			err = fmt.Errorf("the device holds %d bytes and the image %d: restore to a device at least as large", n, size)
		}
		if err != nil {
			f.Close()
			return nil, false, false, err
		}
		return f, false, false, nil
	case !fi.Mode().IsRegular():
		kind := "a special file"
		switch m := fi.Mode(); {
		case m.IsDir():
			kind = "a directory"
		case m&fs.ModeCharDevice != 0:
			kind = "a character device"
		case m&fs.ModeNamedPipe != 0:
			kind = "a named pipe"
		case m&fs.ModeSocket != 0:
			kind = "a socket"
		}
		return nil, false, false, fmt.Errorf("%s, not a regular file or block device: give a file to create or overwrite, or a block device", kind)
	}
	f, err = os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, false, false, err
	}
	if err = f.Truncate(0); err == nil {
		err = f.Truncate(size)
	}
	if err != nil {
		f.Close()
		return nil, false, false, err
	}
	return f, true, false, nil
}

// restoreRun is one restore's state across the segments of its list.
// newRestoreRun sizes a restore of x, named path in its errors: a worker
// per core (at least 8 from S3, whose reads wait on the network),
// workers+2 batch buffers, the chunk cache. Its caller sets where the
// bytes go and starts the writer.
func (r *Repo) newRestoreRun(x *Image, path string) *restoreRun {
	workers := runtime.GOMAXPROCS(0)
	if _, ok := r.be.(*s3Backend); ok {
		workers = max(workers, 8) // latency-bound
	}
	cs := int64(x.ChunkSize)
	perBatch := max(batchBytes/cs, 1)
	bufs := make(chan []byte, workers+2)
	for range workers + 2 {
		bufs <- make([]byte, perBatch*cs)
	}
	sums := make([]*manyHasher, workers)
	for w := range sums {
		sums[w] = r.manyHasher()
	}
	return &restoreRun{r: r, x: x, path: path, cache: newChunkCache(restoreCache, restoreNextCache), bufs: bufs, perBatch: perBatch, workers: workers,
		sums: sums, scratch: make([]readScratch, workers), writes: make(chan restoreWrite, workers+2), wrote: make(chan error, 1)}
}

type restoreRun struct {
	r        *Repo
	x        *Image
	f        *os.File
	path     string
	regular  bool
	cache    *chunkCache
	bufs     chan []byte // a batch buffer per worker
	perBatch int64       // chunks in a batch
	workers  int
	// A worker's hasher and read buffers, kept from segment to segment:
	// made again for each (8 on a 2 GiB image), the buffers grew again
	// to the largest blob and read, ~0.1 s of a restore's CPU zeroing
	// fresh memory and faulting it in (profiles, 2026-12-07).
	sums     []*manyHasher
	scratch  []readScratch
	progress func(done, total int64)
	done     int64 // bytes written (writer goroutine only)
	writes   chan restoreWrite
	wrote    chan error  // the writer's first error (nil: all written), when writes is closed and drained
	failed   atomic.Bool // the writer failed: workers stop
	// need and put make the run a stream (ImageReader.Stream): need says
	// which chunks to read (nil: all), put takes each batch instead of f.
	need func(i int64) bool
	put  func(StreamBatch) error
}

// restoreWrite is a batch ready for the writer: runs of bytes of buf to
// write at their offsets (a regular file's zero chunks left out), and how
// many bytes of the image the batch covers (for progress).
type restoreWrite struct {
	buf    []byte
	runs   []writeRun
	covers int64
	batch  StreamBatch // a stream's batch (put), without Data
}

type writeRun struct{ at, off, n int64 } // buf[at:at+n] goes to the target at off

// writer writes the batches the workers finish, in the order they
// finish, and hands their buffers back; after an error it only hands
// buffers back. It sends its first error (or nil) on wrote when writes
// is closed.
func (rs *restoreRun) writer() {
	var err error
	for w := range rs.writes {
		if rs.put != nil && err == nil {
			b := w.batch
			if w.buf != nil { // nil: a run of zero chunks (zeroBatch)
				b.Data = w.buf[:w.covers]
			}
			if perr := rs.put(b); perr != nil {
				err = perr
				rs.failed.Store(true)
			}
		}
		for _, run := range w.runs {
			if err != nil {
				break
			}
			if _, werr := rs.f.WriteAt(w.buf[run.at:run.at+run.n], run.off); werr != nil {
				err = fmt.Errorf("restore to %s at %d: %w", rs.path, run.off, werr)
				rs.failed.Store(true)
			}
		}
		if w.buf != nil {
			rs.bufs <- w.buf
		}
		if err == nil {
			rs.done += w.covers
			if rs.progress != nil {
				rs.progress(rs.done, rs.x.Size)
			}
		}
	}
	rs.wrote <- err
}

// batches restores chunks first.. (hashes hs) of the segment the chunk
// cache was started for (its plan), batch by batch on every worker.
func (rs *restoreRun) batches(ctx context.Context, first int64, hs []Hash) error {
	x := rs.x
	cs := int64(x.ChunkSize)
	perBatch := rs.perBatch
	n := int64(len(hs))
	nb := (n + perBatch - 1) / perBatch
	var (
		next   atomic.Int64
		mu     sync.Mutex // guards failed
		failed error
		wg     sync.WaitGroup
	)
	for w := range rs.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sum, scratch := rs.sums[w], &rs.scratch[w]
			for {
				bi := next.Add(1) - 1
				if bi >= nb || ctx.Err() != nil || rs.failed.Load() {
					return
				}
				mu.Lock()
				stop := failed != nil
				mu.Unlock()
				if stop {
					return
				}
				lo, hi := bi*perBatch, min((bi+1)*perBatch, n)
				bhs, batch, skip := rs.wanted(first+lo, hs[lo:hi])
				if skip {
					continue
				}
				var buf []byte
				select {
				case buf = <-rs.bufs:
				case <-ctx.Done():
					return
				}
				batch.Started = time.Now()
				err := rs.r.readChunks(ctx, x, first+lo, bhs, buf, sum, rs.cache, scratch)
				if err != nil {
					rs.bufs <- buf
					mu.Lock()
					if failed == nil {
						failed = err
					}
					mu.Unlock()
					return
				}
				w := restoreWrite{buf: buf, covers: min((first+hi)*cs, x.Size) - (first+lo)*cs, batch: batch}
				if rs.put == nil {
					w.runs = rs.runs(first+lo, hs[lo:hi])
				}
				rs.writes <- w
			}
		}()
	}
	wg.Wait()
	switch {
	case failed != nil:
		return failed
	case rs.failed.Load():
		return errors.New("the target could not be written") // the writer's error says why
	}
	return ctx.Err()
}

// runs lists the writes of chunks first.. (hashes hs) from a batch
// buffer; a regular file keeps zero chunks as holes.
func (rs *restoreRun) runs(first int64, hs []Hash) []writeRun {
	cs := int64(rs.x.ChunkSize)
	var out []writeRun
	for j := 0; j < len(hs); {
		if rs.regular && hs[j] == (Hash{}) {
			j++
			continue
		}
		k := j + 1
		for k < len(hs) && !(rs.regular && hs[k] == (Hash{})) {
			k++
		}
		off := (first + int64(j)) * cs
		end := min((first+int64(k))*cs, rs.x.Size)
		out = append(out, writeRun{at: int64(j) * cs, off: off, n: end - off})
		j = k
	}
	return out
}

// chunkCache keeps the chunks that later batches of a restore still
// need, taken out of the blobs opened for earlier ones: it knows how many
// uses each chunk of the segment has left and which of them each blob
// holds (counted from the chunk list up front), keeps a copy of a chunk
// with uses left when its blob is opened, drops it at its last use, and
// keeps at most max bytes (beyond that a blob is opened again when
// needed). Once the next segment's plan is made (ahead), a blob opened
// for this segment also gives the chunks the next one needs of it, up to
// nextMax bytes: they are kept in that plan and counted against max once
// it starts. Without it an incremental image's blobs — chunks from all
// over the volume compressed together — and a full image's deduplicated
// chunks would open a blob (up to groupRaw bytes) for each use; keeping
// whole blobs instead costs their full size for a few chunks each.
type chunkCache struct {
	mu      sync.Mutex // guards the fields below and the plans' entries
	plan    *usePlan   // the segment being restored
	next    *usePlan   // the next segment's, once made (nil: not yet)
	max     int64      // bytes kept for plan
	nextMax int64      // bytes kept for next
}

// usePlan is what a segment's restore needs to know of its chunks before
// it starts: one entry per distinct chunk (its place, from one index
// lookup, and its uses), which entry each position of the segment uses,
// and the entries each blob holds. It is made without the cache
// (planUses), so the next segment's plan can be made while the current
// one restores; with no map from hashes it costs ~90 bytes a distinct
// chunk and 4 a position (~6 MiB for a segment of 64 Ki chunks).
type usePlan struct {
	first  int64                   // the segment's first chunk
	hs     []Hash                  // the segment's hashes
	at     []int32                 // position → index in chunks (-1: a zero chunk)
	chunks []chunkUse              // the distinct chunks, in hash order
	inuse  map[blobKey][]*chunkUse // the segment's chunks each blob holds
	kept   int64                   // bytes of its chunks' data held
}

// chunkUse is a distinct chunk of a segment: where it is (found: in the
// index), the uses it has left and, while cached, its bytes.
type chunkUse struct {
	h     Hash
	l     loc
	found bool
	left  int32
	data  []byte
}

type chunkRef struct {
	h Hash
	l loc
}

type blobKey struct{ pack, off uint32 }

func newChunkCache(max, nextMax int64) *chunkCache {
	return &chunkCache{max: max, nextMax: nextMax}
}

// planUses counts the uses of each chunk of hs (chunks first.. of an
// image) and looks each distinct one up in the index, in hash order:
// the index on disk is read a window of pages at a time (getSorted).
// The index has locks of its own: planning holds none of the
// repository's, so workers reading chunks meanwhile do not wait for it.
func (r *Repo) planUses(first int64, hs []Hash) *usePlan {
	p := &usePlan{first: first, hs: hs, at: make([]int32, len(hs)), inuse: map[blobKey][]*chunkUse{}}
	// The positions sorted by hash, each with its hash's top 64 bits:
	// most comparisons end there, without reading the hashes (all over
	// hs) — half the time of sorting positions alone.
	type posKey struct {
		top uint64
		j   int32
	}
	order := make([]posKey, 0, len(hs))
	for j := range hs {
		p.at[j] = -1
		if hs[j] != (Hash{}) {
			order = append(order, posKey{top64(&hs[j]), int32(j)})
		}
	}
	slices.SortFunc(order, func(a, b posKey) int {
		if a.top != b.top {
			return cmp.Compare(a.top, b.top)
		}
		return cmpHash(&hs[a.j], &hs[b.j])
	})
	distinct := func(k int) bool {
		return k == 0 || order[k].top != order[k-1].top || hs[order[k].j] != hs[order[k-1].j]
	}
	n := 0
	for k := range order {
		if distinct(k) {
			n++
		}
	}
	p.chunks = make([]chunkUse, 0, n)
	for k, o := range order {
		if distinct(k) {
			p.chunks = append(p.chunks, chunkUse{h: hs[o.j]})
		}
		u := &p.chunks[len(p.chunks)-1]
		u.left++
		p.at[o.j] = int32(len(p.chunks) - 1)
	}
	r.chunks.getSorted(len(p.chunks), func(i int) *Hash { return &p.chunks[i].h }, func(i int, l loc) {
		u := &p.chunks[i]
		u.l, u.found = l, true
		k := blobKey{l.pack, l.off}
		p.inuse[k] = append(p.inuse[k], u)
	})
	return p
}

// start begins a segment with its plan. Every use of the previous
// segment has been taken by then; what the plan holds already was kept
// for it while it was the next one.
func (c *chunkCache) start(p *usePlan) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.plan = p
	if c.next == p {
		c.next = nil
	}
}

// ahead gives the cache the next segment's plan, made while the current
// one restores: blobs opened from now on also give it their chunks.
func (c *chunkCache) ahead(p *usePlan) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.next = p
}

// countUses starts a segment: it counts the uses of each chunk of hs
// (chunks first.. of the image) and notes which blob holds each.
func (r *Repo) countUses(c *chunkCache, first int64, hs []Hash) {
	c.start(r.planUses(first, hs))
}

// take counts one use of chunk i of the image (hash h) and returns it if
// it is cached, else where the plan found it (planned: the index holds
// it), so that reading it needs no second index lookup (a page read on
// disk). A chunk the plan does not have at i is not planned.
func (c *chunkCache) take(i int64, h Hash) (data []byte, l loc, planned bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.plan
	j := i - p.first
	if j < 0 || j >= int64(len(p.at)) || p.at[j] < 0 {
		return nil, loc{}, false
	}
	u := &p.chunks[p.at[j]]
	if u.h != h {
		return nil, loc{}, false
	}
	u.left--
	data = u.data
	if data != nil && u.left <= 0 {
		u.data = nil
		p.kept -= int64(len(data))
	}
	return data, u.l, u.found
}

// wanted lists the chunks of blob k that later batches of the segment,
// or the next segment, still need and the cache lacks, as far as there
// is room for them.
func (c *chunkCache) wanted(k blobKey) []chunkRef {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []chunkRef
	for _, p := range [2]*usePlan{c.plan, c.next} {
		if p == nil {
			continue
		}
		room := c.room(p)
		for _, u := range p.inuse[k] {
			if u.left <= 0 || u.data != nil {
				continue
			}
			if int64(u.l.raw) > room {
				continue
			}
			room -= int64(u.l.raw)
			out = append(out, chunkRef{u.h, u.l})
		}
	}
	return out
}

// room is how many more bytes plan p may keep (c.mu held).
func (c *chunkCache) room(p *usePlan) int64 {
	if p == c.plan {
		return c.max - p.kept
	}
	return c.nextMax - p.kept
}

// keep copies the chunks of the opened blob k that have uses left and
// are not cached yet, while there is room: got holds the ones checked
// against their hashes (wanted's, by hash). A chunk not in got, or for
// which there is no room, stays listed: its blob is opened again when
// it is needed.
func (c *chunkCache) keep(k blobKey, got map[Hash][]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var copied map[Hash][]byte // a chunk both plans keep is copied once
	for _, p := range [2]*usePlan{c.plan, c.next} {
		if p == nil {
			continue
		}
		us, ok := p.inuse[k]
		if !ok {
			continue
		}
		room := c.room(p)
		rest := us[:0]
		for _, u := range us {
			if u.left <= 0 {
				continue // all its uses are taken
			}
			if u.data != nil {
				continue
			}
			data, ok := got[u.h]
			if !ok || int64(len(data)) > room {
				rest = append(rest, u) // no room: the blob is opened again
				continue
			}
			kept, ok := copied[u.h]
			if !ok {
				kept = bytes.Clone(data)
				if copied == nil {
					copied = map[Hash][]byte{}
				}
				copied[u.h] = kept
			}
			u.data = kept
			p.kept += int64(len(kept))
			room -= int64(len(kept))
		}
		if len(rest) == 0 {
			delete(p.inuse, k)
		} else {
			p.inuse[k] = rest
		}
	}
}

// readScratch is memory a reader of chunks reuses from batch to batch
// and segment to segment: the bytes read from a pack and an opened
// blob.
type readScratch struct{ read, blob []byte }

// blobUse is one blob a batch needs and the chunks it gives.
type blobUse struct {
	key   blobKey
	pack  PackID
	l     loc // the blob's place (off, len) in its pack
	items []blobItem
}

type blobItem struct {
	slot int // chunk index within the batch
	h    Hash
	l    loc
}

// readChunks fills buf with chunks first.. of x (hashes hs): zero chunks are
// zeroed, others taken from the chunk cache or from the packs — each blob
// the batch needs is read and opened once, adjacent blobs of a pack in
// one read — and every chunk is checked against its hash.
func (r *Repo) readChunks(ctx context.Context, x *Image, first int64, hs []Hash, buf []byte, sum *manyHasher, cache *chunkCache, scratch *readScratch) error {
	cs := int64(x.ChunkSize)
	need := map[blobKey]*blobUse{}
	var uses []*blobUse
	for slot, h := range hs {
		i := first + int64(slot)
		dst := buf[int64(slot)*cs : int64(slot+1)*cs]
		if h == (Hash{}) {
			clear(dst)
			continue
		}
		data, l, planned := cache.take(i, h)
		if data != nil {
			clear(dst[copy(dst, data):])
			continue
		}
		var pid PackID
		if planned {
			pid = r.packOf(l)
		} else {
			var ok bool
			if l, pid, ok = r.lookup(h); !ok {
				return fmt.Errorf("at %d: %w", i*cs, r.missing(h))
			}
		}
		k := blobKey{l.pack, l.off}
		u := need[k]
		if u == nil {
			u = &blobUse{key: k, pack: pid, l: l}
			need[k] = u
			uses = append(uses, u)
		}
		u.items = append(u.items, blobItem{slot: slot, h: h, l: l})
	}
	sort.Slice(uses, func(i, j int) bool {
		a, b := uses[i].key, uses[j].key
		return a.pack < b.pack || a.pack == b.pack && a.off < b.off
	})
	for i := 0; i < len(uses); {
		// One read for a run of adjacent blobs of a pack (up to adjacentRead).
		j, end := i+1, int64(uses[i].l.off)+int64(uses[i].l.len)
		for j < len(uses) && uses[j].key.pack == uses[i].key.pack && int64(uses[j].l.off) == end && end-int64(uses[i].l.off) < adjacentRead {
			end += int64(uses[j].l.len)
			j++
		}
		start := int64(uses[i].l.off)
		b, err := r.be.GetInto(ctx, uses[i].pack.name(), start, end-start, scratch.read)
		if err != nil {
			return fmt.Errorf("pack %s: %w", uses[i].pack, err)
		}
		scratch.read = b[:0]
		for _, u := range uses[i:j] {
			o := int64(u.l.off) - start
			group, err := r.openBlobInto(scratch.blob, b[o:o+int64(u.l.len)])
			if err != nil {
				return fmt.Errorf("chunk %s in pack %s: %w", u.items[0].h, u.pack, err)
			}
			scratch.blob = group[:0]
			if blobOpened != nil {
				blobOpened(u.key.pack, u.key.off)
			}
			// The batch's chunks of the blob and those later batches
			// want kept, each checked once, all in one call.
			want := cache.wanted(u.key)
			refs := make([]chunkRef, 0, len(u.items)+len(want))
			seen := make(map[Hash]int, len(u.items)+len(want))
			for _, it := range u.items {
				if _, ok := seen[it.h]; !ok {
					seen[it.h] = len(refs)
					refs = append(refs, chunkRef{it.h, it.l})
				}
			}
			for _, ref := range want {
				if _, ok := seen[ref.h]; !ok {
					seen[ref.h] = len(refs)
					refs = append(refs, ref)
				}
			}
			data, err := sum.chunksIn(refs, group)
			if err != nil {
				return fmt.Errorf("pack %s: %w", u.pack, err)
			}
			if len(want) > 0 {
				got := make(map[Hash][]byte, len(want))
				for _, ref := range want {
					got[ref.h] = data[seen[ref.h]]
				}
				cache.keep(u.key, got)
			}
			for _, it := range u.items {
				dst := buf[int64(it.slot)*cs : int64(it.slot+1)*cs]
				clear(dst[copy(dst, data[seen[it.h]]):])
			}
		}
		i = j
	}
	return nil
}

// ImageReader reads an image in place (for `umbra mount` and live
// restores): an io.ReaderAt over the repository, safe for concurrent use,
// with a small cache of recently opened blobs. Concurrent reads of
// chunks of one blob share one opening of it.
type ImageReader struct {
	r *Repo
	x *Image

	mu     sync.Mutex // guards blobs, lru, cached
	blobs  map[blobKey]*openBlob
	lru    list.List // the opened blobs' keys, least recently used first
	cached int64     // bytes of the opened blobs

	// listMu guards list, which keeps the chunk list segments read last
	// (readerSegments), so that reads hopping between a few places of
	// the image do not read a segment (up to 2 MiB) again at every hop.
	// A read that must fetch a segment holds it, and blob reads go on.
	listMu sync.Mutex
	list   listCursor
}

// openBlob is a blob of an ImageReader's cache: being opened until ready
// is closed, then data (the opened blob) or err.
type openBlob struct {
	ready chan struct{}
	data  []byte
	err   error
	use   *list.Element // in lru, once opened
}

// readerSegments bounds the chunk list segments an ImageReader keeps: 8
// are at most 16 MiB, and name 2 GiB of volume at 4 KiB chunks.
var readerSegments = 8

// OpenImage opens image id for reading.
func (r *Repo) OpenImage(ctx context.Context, id string) (*ImageReader, error) {
	x, err := r.image(ctx, id)
	if err != nil {
		return nil, err
	}
	ir := &ImageReader{r: r, x: x, blobs: map[blobKey]*openBlob{}, list: listCursor{r: r, x: x, keep: readerSegments}}
	if _, err := ir.hash(0); err != nil && x.Size > 0 {
		return nil, err
	}
	return ir, nil
}

// hash is chunk i's hash (the zero hash for an all-zero chunk).
func (ir *ImageReader) hash(i int64) (Hash, error) {
	ir.listMu.Lock()
	defer ir.listMu.Unlock()
	return ir.list.hash(context.Background(), i)
}

// Zero reports whether chunk i of the image is all zeros (never stored).
func (ir *ImageReader) Zero(i int64) (bool, error) {
	h, err := ir.hash(i)
	return h == (Hash{}), err
}

// Cached reports whether chunk i reads without fetching a blob: it is
// all zeros, or its blob is open in the cache. A reader that has paid
// for a blob can take its other chunks for little more (a live restore
// restores them along).
func (ir *ImageReader) Cached(i int64) bool {
	h, err := ir.hash(i)
	if err != nil {
		return false
	}
	if h == (Hash{}) {
		return true
	}
	l, ok := ir.r.chunks.get(h)
	if !ok {
		return false
	}
	ir.mu.Lock()
	defer ir.mu.Unlock()
	b, ok := ir.blobs[blobKey{l.pack, l.off}]
	return ok && b.data != nil
}

// Image returns the image being read (its record, without the chunk list).
func (ir *ImageReader) Image() *Image { return ir.x }

// Size is the image's size.
func (ir *ImageReader) Size() int64 { return ir.x.Size }

// readerCache bounds the opened blobs an ImageReader keeps, in bytes:
// 16 blobs of 4 MiB. With 8, reading an image through a mount in order
// took 1.8x as long as with 64 MiB (a full image's duplicate chunks
// point back to blobs opened long before), and reads hopping within 16
// MiB 3.4x (docs/benchmarks.md, measured 2026-11-24). Blobs being opened
// are counted once they are: at most one per concurrent reader.
var readerCache int64 = 64 << 20

// ReadAt reads from the image as of its snapshot.
func (ir *ImageReader) ReadAt(p []byte, off int64) (int, error) {
	cs := int64(ir.x.ChunkSize)
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		if pos >= ir.x.Size {
			return n, fmt.Errorf("read past the end of image %s (%d bytes)", ir.x.ID, ir.x.Size)
		}
		i := pos / cs
		c, err := ir.chunk(i)
		if err != nil {
			return n, err
		}
		n += copy(p[n:], c[pos-i*cs:min(cs, ir.x.Size-i*cs)])
	}
	return n, nil
}

func (ir *ImageReader) chunk(i int64) ([]byte, error) {
	cs := int64(ir.x.ChunkSize)
	h, err := ir.hash(i)
	if err != nil {
		return nil, err
	}
	if h == (Hash{}) {
		return zeroChunk[:cs], nil
	}
	l, pid, ok := ir.r.lookup(h)
	if !ok {
		return nil, fmt.Errorf("image %s at %d: %w", ir.x.ID, i*cs, ir.r.missing(h))
	}
	group, err := ir.blob(blobKey{l.pack, l.off}, pid, l)
	if err != nil {
		return nil, fmt.Errorf("image %s at %d: chunk %s in pack %s: %w", ir.x.ID, i*cs, h, pid, err)
	}
	// Hashing every read keeps a mounted image as trustworthy as a
	// restore; at 4 GB/s it costs little next to decompression.
	return chunkIn(h, l, group, ir.r.hasher())
}

// blob returns the opened blob k (at l in pack pid): from the cache, or
// opened once for every reader that asks while it is opened. A failed
// opening is not kept: the next read tries again, and a reader that
// waited for an opening begun before it asked, which failed, tries once
// itself (the repository may have come back meanwhile).
func (ir *ImageReader) blob(k blobKey, pid PackID, l loc) ([]byte, error) {
	ir.mu.Lock()
	if b, ok := ir.blobs[k]; ok {
		if b.use != nil {
			ir.lru.MoveToBack(b.use)
		}
		ir.mu.Unlock()
		<-b.ready
		if b.err == nil {
			return b.data, nil
		}
		ir.mu.Lock()
		if b, ok := ir.blobs[k]; ok { // opened again since
			ir.mu.Unlock()
			<-b.ready
			return b.data, b.err
		}
	}
	b := &openBlob{ready: make(chan struct{})}
	ir.blobs[k] = b
	ir.mu.Unlock()
	raw, err := ir.r.be.Get(context.Background(), pid.name(), int64(l.off), int64(l.len))
	var data []byte
	if err == nil {
		data, err = ir.r.openBlobInto(nil, raw)
	}
	ir.mu.Lock()
	if err != nil {
		delete(ir.blobs, k)
		b.err = err
	} else {
		for ir.lru.Len() > 0 && ir.cached+int64(len(data)) > readerCache {
			old := ir.lru.Remove(ir.lru.Front()).(blobKey)
			ir.cached -= int64(len(ir.blobs[old].data))
			delete(ir.blobs, old)
		}
		b.data = data
		ir.cached += int64(len(data))
		b.use = ir.lru.PushBack(k)
	}
	ir.mu.Unlock()
	close(b.ready)
	return data, err
}
