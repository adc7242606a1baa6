package backup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeebo/blake3"
	"golang.org/x/sys/unix"

	"umbra/internal/zero"
	"umbra/provider"
)

// Source is what an image is read from: a snapshot, a file, a device.
type Source interface {
	ReadAt(p []byte, off int64) (int, error)
	Size() int64
}

// Range is a byte range of a volume.
type Range struct{ Off, Len int64 }

// Options of one backup.
type Options struct {
	Volume   string
	Snapshot string
	// Parent is the volume's previous image; with Changed (the chunks that
	// may differ since Parent's snapshot) only those are read.
	Parent  *Image
	Changed *provider.Bitmap
	// Allocated, when set, returns the parts of [off, off+n) that may hold
	// data; the rest reads as zeros and is neither read nor stored (the
	// engine's allocation map, SEEK_DATA/SEEK_HOLE on a file). A backup
	// asks about allocWindow bytes at a time and keeps the answer.
	Allocated func(off, n int64) ([]Range, error)
	// Cursor is told how far the ascending read has come (the COW
	// engine's backup cursor releases preserved data behind it).
	Cursor   func(off int64)
	Progress func(done, total int64)
}

// Stats of one backup.
type Stats struct {
	Incremental bool    `json:"incremental"`
	Read        int64   `json:"bytes_read"`
	Reused      int64   `json:"bytes_reused_from_parent"`
	Unallocated int64   `json:"bytes_unallocated"` // holes, not read
	Zero        int64   `json:"bytes_zero"`        // read, found all zero
	Dedup       int64   `json:"bytes_deduplicated"`
	Stored      int64   `json:"bytes_new"`     // new chunks, uncompressed
	Compressed  int64   `json:"bytes_written"` // new chunks as stored
	Index       int64   `json:"bytes_index"`   // chunk list and index, as stored
	Seconds     float64 `json:"seconds"`
	// WhyFull says why a backup given a parent read everything anyway.
	WhyFull string `json:"why_full,omitempty"`
}

// batchBytes is how much is read and processed at once.
const batchBytes = 4 << 20

// patchBatchBytes bounds a batch of an incremental's changed chunks read
// alone (a segment's few changes, patched into the parent's): the
// batches read ahead and their blobs are then sized to the change, not
// to a full batch (1 % of a volume changed at scattered places is ~650
// chunks a segment). A group never spans two batches, so this is also
// their groups' size: 1 MiB stores as small as 4 MiB (docs/benchmarks.md)
// and a chunk read back opens less. (A variable: tests change it.)
var patchBatchBytes = 1 << 20

// chunk kinds in a batch
const (
	kindRead   = iota // read from the source
	kindReused        // unchanged since the parent
	kindHole          // unallocated: zero without reading
)

type chunkWork struct {
	kind  int
	data  []byte
	hash  Hash
	prev  Hash // the parent's hash of this chunk (incrementals)
	zero  bool
	known bool // the repository has it already
}

// groupRaw bounds the chunks compressed together into one blob (a
// group never spans two batches). Measured on a 2 GiB ext4 image
// (docs/benchmarks.md) with the C encoder: at the fastest level 1 MiB
// groups store 478 MiB at 777 MB/s, 4 MiB 476 MiB at 937 MB/s; at the
// default level 437 and 427 MiB (with the Go encoder at the fastest
// level, 64 KiB groups stored 505 MiB). Larger groups are also fewer
// frames to set up, seal and pack.
// Reading one chunk opens its whole group: ~2-4 ms for 4 MiB — Proxmox
// Backup Server's chunk size, which restores and mounts amortise through
// their caches.
var groupRaw = 4 << 20

// Backup reads src in ascending order and writes an image. The image is
// listed only after its packs, index and chunk list are durable. It
// holds a shared lock on the repository while it runs.
func (r *Repo) Backup(ctx context.Context, src Source, opts Options) (*Image, Stats, error) {
	var st Stats
	unlock, err := r.Lock(ctx, "backup "+opts.Volume, false)
	if err != nil {
		return nil, st, err
	}
	defer unlock()
	start := time.Now()
	cs := int64(r.cfg.ChunkSize)
	size := src.Size()
	x := &Image{Volume: opts.Volume, Snapshot: opts.Snapshot, Size: size, ChunkSize: int(cs), Created: time.Now().UTC()}
	x.ID = imageID(opts.Volume, x.Created)
	incr := opts.Parent != nil && opts.Changed != nil && opts.Parent.Size == size && opts.Parent.ChunkSize == int(cs)
	if incr {
		// A parent deleted or pruned between being chosen and this lock,
		// or damaged, cannot lend its chunks: read everything instead
		// (unchanged chunks still deduplicate) and say why.
		if _, _, err := r.segment(ctx, opts.Parent, 0); err != nil {
			incr = false
			st.WhyFull = fmt.Sprintf("the previous image %s cannot be read (%v): reading everything, unchanged chunks deduplicate", opts.Parent.ID, err)
		} else {
			x.Parent, st.Incremental = opts.Parent.ID, true
		}
	}
	if err := r.upgradeFormat(ctx); err != nil {
		return nil, st, fmt.Errorf("backup %s: %w", opts.Volume, err)
	}
	lw := r.newListWriter(x)
	if incr && opts.Parent.Shared && opts.Parent.SegmentChunks == x.SegmentChunks && r.version.Load() >= patchFormat {
		lw.parent = opts.Parent // its segments are the bases of patches
		x.Patches = []Hash{}
	}
	hashes := make([]Hash, 0, max(batchBytes/cs, 1))
	var prevs []Hash // the parent's hashes of the same chunks
	// Most chunks of a backup are new or the parent's: the filter
	// answers most lookups of new ones without a read of the index.
	defer r.chunks.useFilter()()
	up := r.newUploader(ctx)
	defer up.abort()
	up.fresh = true
	if incr {
		up.everyCh = min(up.everyCh, incrementalIndexEveryChunks)
	}
	workers := runtime.GOMAXPROCS(0)
	hashers := make([]*manyHasher, workers)
	for i := range hashers {
		hashers[i] = r.manyHasher()
	}
	// Hashing and compression take a token each while they run, so no
	// more of them run at once than there are cores: C zstd runs on
	// threads of its own (cgo), and without the tokens hashing would
	// time-slice with it, each evicting the other's tables from the
	// core's caches (7 % slower backups measured, docs/benchmarks.md).
	cpu := make(chan struct{}, workers)
	// A reader goroutine plans and reads batches ahead while this one
	// hashes, compresses and packs the previous (an incremental's
	// changed chunks of a segment are read and hashed by readers of
	// their own, several segments at once). Backup returns only once
	// they stopped: the source is not read after it returns.
	rctx, cancel := context.WithCancel(ctx)
	batches, readersDone := r.readBatches(rctx, src, x, opts, incr, lw.parent != nil, cpu, &up.indexed)
	defer func() { cancel(); readersDone() }()
	comp := r.newCompressor(up, workers, cpu)
	compClosed := false
	defer func() {
		if !compClosed {
			comp.close()
		}
	}()
	for b := range batches {
		if b.err != nil {
			return nil, st, fmt.Errorf("backup %s: %w", opts.Volume, b.err)
		}
		first, last, w := b.first, b.last, b.w
		if b.segment != nil {
			if err := lw.reuse(ctx, *b.segment, last-first); err != nil {
				return nil, st, fmt.Errorf("backup %s: %w", opts.Volume, err)
			}
			st.Reused += min(last*cs, size) - first*cs
			if opts.Cursor != nil {
				opts.Cursor(last * cs)
			}
			if opts.Progress != nil {
				opts.Progress(min(last*cs, size), size)
			}
			continue
		}
		st.Read += b.read
		st.Reused += b.reused
		if !b.hashed {
			r.hashBatch(w, hashers, cpu)
		} else if b.indexed != up.indexed.Load() {
			// An index object was written since the reader looked the
			// chunks up: chunks this backup stored before it are
			// findable now, and no longer among those on their way.
			for i := range w {
				if c := &w[i]; c.kind == kindRead && !c.zero && !c.known {
					_, _, c.known = r.lookup(c.hash)
				}
			}
		}
		var fresh []int // chunks to store, each hash once
		hashes = hashes[:0]
		prevs = prevs[:0]
		for i := range w {
			c := &w[i]
			if lw.parent != nil && b.at == nil {
				prevs = append(prevs, c.prev)
			}
			switch {
			case c.kind == kindReused:
				st.Reused += int64(len(c.data))
				hashes = append(hashes, c.hash)
			case c.kind == kindHole:
				st.Unallocated += chunkLen(first+int64(i), cs, size)
				hashes = append(hashes, Hash{})
			case c.zero:
				st.Zero += int64(len(c.data))
				hashes = append(hashes, Hash{})
			default:
				hashes = append(hashes, c.hash)
				if c.known || up.has(c.hash) {
					st.Dedup += int64(len(c.data))
					continue
				}
				up.mark(c.hash)
				fresh = append(fresh, i)
				st.Stored += int64(len(c.data))
			}
		}
		if b.at != nil {
			err = lw.addChanged(ctx, b.at, hashes, b.segDone)
		} else {
			err = lw.add(ctx, hashes, prevs)
		}
		if err != nil {
			b.release()
			return nil, st, fmt.Errorf("backup %s: %w", opts.Volume, err)
		}
		own := new(sync.WaitGroup)
		err := comp.queue(w, fresh, own)
		go func() { own.Wait(); b.release() }()
		if err != nil {
			return nil, st, fmt.Errorf("backup %s: %w", opts.Volume, err)
		}
		if err := up.flushIndex(ctx, false); err != nil {
			return nil, st, fmt.Errorf("backup %s: %w", opts.Volume, err)
		}
		if opts.Cursor != nil {
			opts.Cursor(last * cs)
		}
		if opts.Progress != nil {
			opts.Progress(min(last*cs, size), size)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, st, err
	}
	stored, err := comp.close()
	compClosed = true
	if err != nil {
		return nil, st, fmt.Errorf("backup %s: %w", opts.Volume, err)
	}
	st.Compressed = stored
	if err := lw.finish(ctx); err != nil {
		return nil, st, fmt.Errorf("backup %s: %w", opts.Volume, err)
	}
	idxBytes, err := up.finish()
	if err != nil {
		return nil, st, fmt.Errorf("backup %s: %w", opts.Volume, err)
	}
	st.Index = idxBytes + lw.bytes
	st.Seconds = time.Since(start).Seconds()
	x.Stats = &st
	if err := r.writeImage(ctx, x); err != nil {
		return nil, st, fmt.Errorf("backup %s: write image: %w", opts.Volume, err)
	}
	st.Seconds = time.Since(start).Seconds()
	return x, st, nil
}

// batch is a run of chunks planned and read, on its way to packing.
type batch struct {
	first, last int64
	w           []chunkWork
	read        int64
	err         error
	release     func() // gives the buffers back to the reader
	// segment: the batch is a whole segment of the chunk list that did
	// not change since the parent, whose segment it names (w is nil).
	segment *segRef
	// at, when set, are the chunks of w (ascending, in one segment of
	// the chunk list): the changed chunks of a segment that an
	// incremental stores as a patch of its parent's, read alone; the
	// segment's other chunks are the parent's, neither read nor looked
	// at. segDone: the segment's last such batch. reused: the bytes of
	// the segment's unchanged chunks (on its first batch).
	at      []int64
	segDone bool
	reused  int64
	// hashed: the reader hashed w's chunks and looked them up, when
	// the uploader had written indexed index objects.
	hashed  bool
	indexed int64
}

// segRef names a stored segment of a chunk list and its patch (zero:
// none).
type segRef struct{ base, patch Hash }

// maxReaders bounds the goroutines reading and hashing an incremental's
// changed chunks: each holds a batch's buffer (up to patchBatchBytes).
const maxReaders = 4

// readWorkers, when not 0, is how many readers an incremental's changed
// chunks get instead of one per core up to maxReaders (tests).
var readWorkers int

// readAhead, when set, is told how many batches are taken from the
// free buffers and not yet given back, each time one is taken (tests).
var readAhead func(n int)

// readBatches plans and reads the volume batch by batch, in ascending
// order, and hands the batches on in that order; the buffers bound how
// far ahead: two batches beyond the one being packed, or with an
// incremental's changed chunks read by several readers, one beyond
// those being read. Such a batch (a segment's changed chunks, few:
// 1/patchDivisor of it at most) is read and hashed by one of the
// readers, so that the next segments' chunks are read (scattered
// reads, one per run of adjacent chunks) and hashed on every core while
// the caller patches the segment before and stores its chunks: an
// incremental's segments one after another held one core each in turn
// (measured 2026-12-07: 72-88 ms of a 130-150 ms incremental on 2 GiB).
// Reading ahead takes a cpu token while it hashes. wait returns once
// every goroutine stopped (cancel ctx first unless all was received).
func (r *Repo) readBatches(ctx context.Context, src Source, x *Image, opts Options, incr, patch bool, cpu chan struct{}, indexed *atomic.Int64) (_ <-chan batch, wait func()) {
	cs := int64(r.cfg.ChunkSize)
	n := x.NumChunks()
	perBatch := max(batchBytes/cs, 1)
	perPatch := max(int64(patchBatchBytes)/cs, 1)
	var parent *listCursor
	if incr {
		parent = &listCursor{r: r, x: opts.Parent}
	}
	var alloc *allocCache
	if opts.Allocated != nil {
		alloc = &allocCache{fn: opts.Allocated, size: x.Size}
	}
	type bufs struct {
		buf []byte
		w   []chunkWork
	}
	readers := 0 // goroutines reading an incremental's changed chunks
	if patch {
		readers = min(runtime.GOMAXPROCS(0), maxReaders)
		if readWorkers > 0 {
			readers = readWorkers
		}
	}
	depth := max(3, readers+1)
	// The buffers are made as batches need them, each the size of the
	// largest batch it held: an incremental's batches of changed chunks
	// alone (at most perPatch of them) do not take a full batch's 4 MiB.
	free := make(chan bufs, depth)
	for range depth {
		free <- bufs{}
	}
	var taken atomic.Int64 // buffers out of free
	give := func(b bufs) func() {
		return func() { taken.Add(-1); free <- b }
	}
	// Each batch has a ticket, handed on in order; a batch read by a
	// reader fills its ticket when done.
	type job struct {
		bt     batch
		buf    []byte
		ticket chan batch
	}
	order := make(chan chan batch, depth)
	jobs := make(chan job)
	out := make(chan batch, depth-1)
	var all sync.WaitGroup
	for range readers {
		all.Go(func() {
			m := r.manyHasher()
			for j := range jobs {
				bt := j.bt
				var st Stats
				bt.err = readRuns(src, j.buf, bt.w, bt.at, 0, cs, x.Size, &st)
				bt.read = st.Read
				if bt.err == nil {
					cpu <- struct{}{}
					bt.indexed = indexed.Load()
					r.hashChunks(bt.w, m)
					bt.hashed = true
					<-cpu
				}
				j.ticket <- bt // room for one: never waits
			}
		})
	}
	all.Go(func() {
		// The tickets in order: each batch waited for, then handed on.
		defer close(out)
		for t := range order {
			var bt batch
			select {
			case bt = <-t:
			case <-ctx.Done():
				return
			}
			select {
			case out <- bt:
			case <-ctx.Done():
				return
			}
			if bt.err != nil {
				return
			}
		}
	})
	all.Go(func() {
		defer close(order)
		defer close(jobs)
		// take waits for free buffers; send hands a batch on, queue
		// hands one to the readers. They report false when the reading
		// stops: the backup was cancelled, or (send) the batch carries
		// an error.
		take := func(chunks int64) (bufs, bool) {
			select {
			case b := <-free:
				if n := taken.Add(1); readAhead != nil {
					readAhead(int(n))
				}
				if int64(len(b.buf)) < chunks*cs {
					b.buf = make([]byte, chunks*cs)
				}
				if int64(len(b.w)) < chunks {
					b.w = make([]chunkWork, chunks)
				}
				return b, true
			case <-ctx.Done():
				return bufs{}, false
			}
		}
		send := func(bt batch) bool {
			t := make(chan batch, 1)
			t <- bt
			select {
			case order <- t:
			case <-ctx.Done():
				return false
			}
			return bt.err == nil
		}
		queue := func(bt batch, buf []byte) bool {
			t := make(chan batch, 1)
			select {
			case order <- t:
			case <-ctx.Done():
				return false
			}
			select {
			case jobs <- job{bt, buf, t}:
			case <-ctx.Done():
				return false
			}
			return true
		}
		for first := int64(0); first < n; first += perBatch {
			if h, end, changed, ok := segmentChanges(x, opts, incr, patch, first, perBatch); ok {
				if len(changed) == 0 {
					if !send(batch{first: first, last: end, release: func() {}, segment: &h}) {
						return
					}
					first = end - perBatch
					continue
				}
				if patch && int64(len(changed)) <= (end-first)/patchDivisor {
					// Few changes: read those alone, the list writer
					// patches the parent's segment with them.
					reused := min(end*cs, x.Size) - first*cs
					for _, c := range changed {
						reused -= chunkLen(c, cs, x.Size)
					}
					for j := 0; j < len(changed); j += int(perPatch) {
						at := changed[j:min(j+int(perPatch), len(changed))]
						b, ok := take(int64(len(at)))
						if !ok {
							return
						}
						bt := batch{first: at[0], last: at[len(at)-1] + 1, w: b.w[:len(at)], at: at, release: give(b)}
						if j == 0 {
							bt.reused = reused
						}
						if j+len(at) == len(changed) {
							bt.last, bt.segDone = end, true
						}
						for i := range bt.w {
							bt.w[i] = chunkWork{kind: kindRead}
						}
						if !queue(bt, b.buf) {
							return
						}
					}
					first = end - perBatch
					continue
				}
			}
			last := min(first+perBatch, n)
			b, ok := take(last - first)
			if !ok {
				return
			}
			bt := batch{first: first, last: last, w: b.w[:last-first], release: give(b)}
			var st Stats
			bt.err = r.planBatch(ctx, x, opts, parent, alloc, first, last, bt.w, &st)
			if bt.err == nil {
				bt.err = readRuns(src, b.buf, bt.w, nil, first, cs, x.Size, &st)
			}
			bt.read = st.Read
			if !send(bt) {
				return
			}
		}
	})
	return out, all.Wait
}

// segmentChanges reports whether the chunks from first on are a whole
// segment of the chunk list of an incremental whose parent shares its
// segments (segments a whole number of batches), and then the parent's
// segment, where it ends and its chunks Changed marks: all of them when
// they are few enough for a patch (patch: the list writer makes
// patches), else just past that many. A segment with no changes is
// named without reading it or the volume there, one with few has only
// those read, so that an incremental's work follows its changes, not
// the size of the volume.
func segmentChanges(x *Image, opts Options, incr, patch bool, first, perBatch int64) (segRef, int64, []int64, bool) {
	p := opts.Parent
	sc := x.SegmentChunks
	if !incr || !p.Shared || p.SegmentChunks != sc || sc%perBatch != 0 || first%sc != 0 {
		return segRef{}, 0, nil, false
	}
	k := first / sc
	if k >= int64(len(p.Segments)) {
		return segRef{}, 0, nil, false
	}
	end := min(first+sc, x.NumChunks())
	limit := int64(0)
	if patch {
		limit = (end - first) / patchDivisor
	}
	var changed []int64
	eachChanged(opts.Changed, first, end, int64(x.ChunkSize), func(i int64) bool {
		changed = append(changed, i)
		return int64(len(changed)) <= limit
	})
	ref := segRef{base: p.Segments[k]}
	ref.patch, _ = p.patched(int(k))
	return ref, end, changed, true
}

// eachChanged calls fn with the chunks in [first, end) that bm marks,
// in order, until fn returns false. With a bit per chunk it skips
// unmarked chunks a word (or a compressed container) at a time.
func eachChanged(bm *provider.Bitmap, first, end, cs int64, fn func(i int64) bool) {
	if bm.Granule != cs {
		for i := first; i < end; i++ {
			if changedChunk(bm, i, cs) && !fn(i) {
				return
			}
		}
		return
	}
	bm.Each(first, end, fn)
}

func chunkLen(i, cs, size int64) int64 { return min(cs, size-i*cs) }

// planBatch decides, for chunks [first,last), which are reused from the
// parent, which are holes, and which must be read.
func (r *Repo) planBatch(ctx context.Context, x *Image, opts Options, parent *listCursor, alloc *allocCache, first, last int64, w []chunkWork, st *Stats) error {
	cs := int64(r.cfg.ChunkSize)
	var changed []bool
	if parent != nil {
		// The batch's changed chunks from the map at once (a
		// compressed one answers a run faster than chunk by chunk).
		changed = make([]bool, len(w))
		eachChanged(opts.Changed, first, last, cs, func(i int64) bool {
			changed[i-first] = true
			return true
		})
	}
	for i := range w {
		w[i] = chunkWork{kind: kindRead}
		idx := first + int64(i)
		if parent == nil {
			continue
		}
		h, err := parent.hash(ctx, idx)
		if err != nil {
			return fmt.Errorf("parent image: %w", err)
		}
		w[i].prev = h // what a patch of the parent's segment is made against
		if !changed[i] {
			// The parent's chunks are there: prune keeps every chunk of a
			// listed image (damage is verify's to find, and --full
			// re-reads everything).
			w[i].hash = h
			w[i].kind = kindReused
			w[i].data = zeroChunk[:chunkLen(idx, cs, x.Size)]
		}
	}
	if alloc == nil {
		return nil
	}
	toRead := 0
	for i := range w {
		if w[i].kind == kindRead {
			toRead++
		}
	}
	// Asking where the holes are costs a SEEK_DATA/SEEK_HOLE pair per
	// extent (15 µs each on a 2 GiB image on tmpfs whose scattered 4 KiB
	// writes left ~1 800 extents: 56 ms of a 150 ms incremental). A batch
	// reading only a few changed chunks reads them, holes or not (a hole
	// reads as zeros, which are not stored either).
	if toRead == 0 || toRead*8 < len(w) {
		return nil
	}
	off, end := first*cs, min(last*cs, x.Size)
	data, err := alloc.get(off, end)
	if err != nil {
		return fmt.Errorf("backup %s: allocation map at %d: %w", opts.Volume, off, err)
	}
	// A chunk that no data range touches is a hole.
	touched := make([]bool, len(w))
	for _, d := range data {
		lo := max(d.Off, off)
		hi := min(d.Off+d.Len, end)
		for c := (lo - off) / cs; lo < hi && c < int64(len(w)) && off+c*cs < hi; c++ {
			touched[c] = true
		}
	}
	for i := range w {
		if !touched[i] && w[i].kind == kindRead {
			w[i].kind = kindHole
		}
	}
	return nil
}

// zeroChunk is an array, not a slice made at init: zero memory the
// binary maps, not 4 MiB allocated (0.5 ms) at the start of every
// command.
var zeroChunk [4 << 20]byte

// allocWindow is how much of the volume one Allocated call covers; the
// batches inside a window are answered from it. SEEK_HOLE walks a run
// of data to its end however little of it was asked about, so asking
// batch by batch walks long runs again and again: on a 2 GiB ext4 image
// on tmpfs, 57-94 ms of a backup in 4 MiB steps against 11-15 ms in 64
// MiB ones — most of an incremental's time. A snapshot does not change,
// so an answer stays true while the backup runs.
const allocWindow = 64 << 20

// allocCache keeps the answer of the last Allocated call.
type allocCache struct {
	fn       func(off, n int64) ([]Range, error)
	size     int64
	off, end int64 // the window asked about
	data     []Range
}

// get returns data ranges covering [off, end) (and maybe more).
func (a *allocCache) get(off, end int64) ([]Range, error) {
	if off < a.off || end > a.end {
		wend := min(max(end, off+allocWindow), a.size)
		data, err := a.fn(off, wend-off)
		if err != nil {
			return nil, err
		}
		a.off, a.end, a.data = off, wend, data
	}
	return a.data, nil
}

// readRuns reads the chunks marked kindRead, one read per run of
// adjacent ones. w[j] is chunk at[j], or first+j when at is nil.
func readRuns(src Source, buf []byte, w []chunkWork, at []int64, first, cs, size int64, st *Stats) error {
	chunk := func(j int) int64 {
		if at != nil {
			return at[j]
		}
		return first + int64(j)
	}
	for j := 0; j < len(w); {
		if w[j].kind != kindRead {
			j++
			continue
		}
		k := j + 1
		for k < len(w) && w[k].kind == kindRead && chunk(k) == chunk(k-1)+1 {
			k++
		}
		off := chunk(j) * cs
		span := min((chunk(k-1)+1)*cs, size) - off
		b := buf[int64(j)*cs : int64(j)*cs+span]
		if n, err := src.ReadAt(b, off); err != nil && !(err == io.EOF && int64(n) == span) {
			return fmt.Errorf("read at %d: %w", off, err)
		}
		st.Read += span
		for i := j; i < k; i++ {
			o := int64(i-j) * cs
			w[i].data = b[o:min(o+cs, span)]
		}
		j = k
	}
	return nil
}

// hashBatch hashes the chunks read, in parallel, and notes which the
// repository has; each hashing goroutine holds a cpu token.
func (r *Repo) hashBatch(w []chunkWork, hashers []*manyHasher, cpu chan struct{}) {
	var wg sync.WaitGroup
	per := (len(w) + len(hashers) - 1) / len(hashers)
	for k, m := range hashers {
		lo, hi := k*per, min((k+1)*per, len(w))
		if lo >= hi {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cpu <- struct{}{}
			defer func() { <-cpu }()
			r.hashChunks(w[lo:hi], m)
		}()
	}
	wg.Wait()
}

// hashChunks hashes the chunks of w read with m, and notes which are all
// zeros and which the repository has.
func (r *Repo) hashChunks(w []chunkWork, m *manyHasher) {
	data := make([][]byte, 0, len(w))
	at := make([]int, 0, len(w))
	for i := range w {
		c := &w[i]
		if c.kind != kindRead {
			continue
		}
		if zero.All(c.data) {
			c.zero = true
			continue
		}
		data = append(data, c.data)
		at = append(at, i)
	}
	hs := make([]Hash, len(data))
	m.sum(hs, data)
	for j, i := range at {
		c := &w[i]
		c.hash = hs[j]
		_, _, c.known = r.lookup(c.hash)
	}
}

// compressor compresses and seals groups of fresh chunks on every core
// while the caller goes on hashing the next batch; a packer goroutine
// hands the blobs to the uploader in the order the groups were queued.
type compressor struct {
	r     *Repo
	up    *uploader
	work  chan *group
	order chan *group
	// slots bounds the groups between queue and packing: each holds a
	// blob buffer of a little over groupRaw from its compression until
	// it is packed, and while packing waited on storage the groups
	// compressed meanwhile piled up (up to order's capacity, 256).
	slots chan struct{}
	// bufs holds the blob buffers of groups packed, for the next:
	// there are never more than slots of them.
	bufs   chan *[]byte
	wg     sync.WaitGroup // workers
	packed chan struct{}  // closed when the packer is done
	// check, when set, reopens each blob as sealed and checks every
	// chunk in it against its hash before it is packed (a copy's
	// verification on arrival; a backup hashed the data itself).
	check bool

	mu     sync.Mutex // guards stored, err
	stored int64
	err    error
}

type group struct {
	data [][]byte // the chunks, in batch memory until done
	ents []blobEntry
	blob []byte
	mem  *[]byte // blob's memory, back to bufs once packed
	done chan struct{}
	own  *sync.WaitGroup // the batch's pending groups
	err  error           // the check of the sealed blob failed
}

// compressorSpare is how many groups beyond one a worker may be waiting
// to be packed: one being packed while every worker compresses the
// next. More only held memory: packing a blob is a copy (or a write to
// the page cache), far quicker than compressing it.
const compressorSpare = 1

// slotWait, when set, is called each time a group waits for a slot
// (tests).
var slotWait func()

// blobRoom is the most a blob buffer holds (made as large as its groups
// need, up to this): a group that does not compress,
// zstd's frame and block headers, the seal. A blob is copied into its
// pack (or written to its file), so its buffer serves a later group
// (instead of a new, cleared 4 MiB per group).
var blobRoom = sealPrefix + groupRaw + groupRaw>>7 + 4096

// room returns b emptied, or when it cannot hold need bytes, new memory
// that can: an eighth more than need, but not more than full (the most
// a buffer usually holds) unless need is. Buffers reused this way are
// sized to what their pipeline carries (an incremental's groups of a few
// changed chunks), and grow a few times at most.
func room(b []byte, need, full int) []byte {
	if cap(b) >= need {
		return b[:0]
	}
	return make([]byte, 0, max(need, min(need+need/8, full)))
}

// contiguous returns a group's chunks as one slice when they lie back to
// back in the batch's memory (runs of new chunks read together), so they
// need not be copied before compressing; otherwise nil.
func contiguous(data [][]byte) []byte {
	if len(data) == 0 {
		return nil
	}
	all := data[0]
	for _, d := range data[1:] {
		n := len(all)
		if len(d) == 0 || cap(all) < n+len(d) || &all[:n+1][n] != &d[0] {
			return nil
		}
		all = all[:n+len(d)]
	}
	return all
}

func (r *Repo) newCompressor(up *uploader, workers int, cpu chan struct{}) *compressor {
	c := &compressor{r: r, up: up, work: make(chan *group, 64), order: make(chan *group, 256), packed: make(chan struct{})}
	c.slots = make(chan struct{}, workers+compressorSpare)
	c.bufs = make(chan *[]byte, cap(c.slots))
	for range workers {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			var buf []byte            // for groups whose chunks are not contiguous
			var sum func([]byte) Hash // check's, this worker's own
			var opened []byte         // check's
			for g := range c.work {
				src := contiguous(g.data)
				if src == nil {
					raw := 0
					for _, d := range g.data {
						raw += len(d)
					}
					buf = room(buf, raw, groupRaw)
					for _, d := range g.data {
						buf = append(buf, d...)
					}
					src = buf
				}
				// Room for zstd's frame and block headers when nothing
				// compresses, and the seal's tag.
				select {
				case g.mem = <-c.bufs:
				default:
					g.mem = new([]byte)
				}
				*g.mem = room(*g.mem, sealPrefix+r.enc.bound(len(src))+sealOverhead, blobRoom)
				cpu <- struct{}{}
				g.blob = r.seal.sealPrefixed(r.enc.encode((*g.mem)[:sealPrefix], src))
				if c.check {
					if sum == nil {
						sum = r.hasher()
					}
					g.err = r.checkBlob(g.blob, g.ents, sum, &opened)
				}
				<-cpu
				g.data = nil
				g.own.Done()
				close(g.done)
			}
		}()
	}
	go func() {
		defer close(c.packed)
		for g := range c.order {
			<-g.done
			c.mu.Lock()
			failed := c.err != nil
			c.mu.Unlock()
			if failed {
				c.bufs <- g.mem
				<-c.slots
				continue
			}
			err := g.err
			if err == nil {
				err = up.add(g.blob, g.ents)
			}
			c.bufs <- g.mem
			<-c.slots
			c.mu.Lock()
			c.stored += int64(len(g.blob))
			if err != nil && c.err == nil {
				c.err = err
			}
			c.mu.Unlock()
		}
	}()
	return c
}

// queue groups the fresh chunks of a batch (indexes into w) and queues
// them; own counts the groups until they no longer need w's memory.
func (c *compressor) queue(w []chunkWork, fresh []int, own *sync.WaitGroup) error {
	c.mu.Lock()
	err := c.err
	c.mu.Unlock()
	if err != nil {
		return err
	}
	var g *group
	raw := 0
	flush := func() {
		if g != nil {
			own.Add(1)
			select {
			case c.slots <- struct{}{}:
			default:
				if slotWait != nil {
					slotWait()
				}
				c.slots <- struct{}{}
			}
			c.order <- g
			c.work <- g
			g = nil
		}
	}
	for k, i := range fresh {
		if g == nil || raw+len(w[i].data) > groupRaw {
			flush()
			g, raw = &group{done: make(chan struct{}), own: own}, 0
			n := min(max(1, groupRaw/max(1, len(w[i].data))), len(fresh)-k)
			g.ents, g.data = make([]blobEntry, 0, n), make([][]byte, 0, n)
		}
		g.ents = append(g.ents, blobEntry{Hash: w[i].hash, RawOff: uint32(raw), Raw: uint32(len(w[i].data))})
		g.data = append(g.data, w[i].data)
		raw += len(w[i].data)
	}
	flush()
	return nil
}

// close waits for every queued group to be packed and returns the bytes
// stored.
func (c *compressor) close() (int64, error) {
	close(c.work)
	close(c.order)
	c.wg.Wait()
	<-c.packed
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stored, c.err
}

func changedChunk(bm *provider.Bitmap, i, cs int64) bool {
	lo := i * cs / bm.Granule
	hi := ((i+1)*cs - 1) / bm.Granule
	for b := lo; b <= hi; b++ {
		if bm.Set(b) {
			return true
		}
	}
	return false
}

func imageID(vol string, t time.Time) string {
	v := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' {
			return r
		}
		return '_'
	}, strings.TrimPrefix(vol, "/"))
	if len(v) > 120 {
		v = v[len(v)-120:]
	}
	return fmt.Sprintf("%s-%s", strings.TrimLeft(v, "."), t.Format("20060102T150405.000000000Z"))
}

// uploader cuts blobs into packs and stores them in the background.
type uploader struct {
	r      *Repo
	ctx    context.Context
	cancel context.CancelFunc
	cur    []byte
	ents   []blobEntry       // the pack's, nil until its first blob
	seen   map[Hash]struct{} // chunks this backup stored that no index names yet
	jobs   chan packJob
	free   chan []byte // pack buffers stored, for the next packs
	wg     sync.WaitGroup
	// stream, when the backend writes objects piece by piece: each
	// blob goes straight into its pack's file (w, size bytes so far,
	// their hash in sum), and no pack is ever whole in memory (cur,
	// jobs and free are then unused).
	stream streamingBackend
	w      objectWriter
	sum    *blake3.Hasher
	size   int

	// entsRoom is the most entries a pack's list held: the next
	// list's room.
	entsRoom int

	indexBytes int64 // index objects written, as stored
	// indexed counts the index objects written (flushIndex): chunks
	// looked up before one were stored by this backup and found missing
	// may be findable since (a reader looks chunks up ahead of it).
	indexed atomic.Int64
	every   int // packs waiting for an index object before one is written (indexEvery)
	everyCh int // chunks in packs waiting for one before it is written (indexEveryChunks)
	// fresh: every chunk stored was looked up in the index first and
	// not found (a backup's), so the index need not look them up again
	// when their entries are added.
	fresh bool

	mu         sync.Mutex // guards done, doneChunks, err
	done       []packBlobs
	doneChunks int // chunks in done
	err        error
	ended      bool
}

// indexEvery: a backup writes an index object for the packs it stored
// every this many packs (1 GiB), so that neither their entries nor the
// set of chunks it stored grows with the volume: indexed chunks are in
// the repository's index, found there by the next batches. (A variable:
// tests make it small.)
var indexEvery = 64

// indexEveryChunks: an index object is also written once the packs
// waiting for one hold this many chunks. Chunks that compress well fill
// a pack with up to maxPackEntries of them, so 64 packs could be a
// million chunks: their entries and the set of chunks stored but not
// yet findable (~150 bytes a chunk together) grew with the volume.
var indexEveryChunks = 1 << 17

// incrementalIndexEveryChunks is indexEveryChunks for an incremental:
// what it holds for the chunks it stored but has not indexed yet (the
// set of them, their packs' entries, and while an index object is
// written its encodings, ~400 bytes a chunk with the collector's
// headroom) grew with the change up to indexEveryChunks, so that its
// peak grew with the volume in the scale benchmark (1 % of it changed):
// 40.6 MiB at 1 Mi chunks, 59.1 at 4 Mi, 107.9 at 16 Mi (2026-12-07).
// A full backup's memory is its pipeline's, and it writes fewer, larger
// index objects. (A variable: tests change it.)
var incrementalIndexEveryChunks = 1 << 14

type packJob struct {
	data []byte
	p    packBlobs
}

func (r *Repo) newUploader(ctx context.Context) *uploader {
	ctx, cancel := context.WithCancel(ctx)
	n := 2
	if _, ok := r.be.(*s3Backend); ok {
		n = 4 // latency-bound
	}
	u := &uploader{r: r, ctx: ctx, cancel: cancel, every: indexEvery, everyCh: indexEveryChunks, seen: map[Hash]struct{}{}, jobs: make(chan packJob, 2), free: make(chan []byte, n+3)}
	if sb, ok := r.be.(streamingBackend); ok {
		u.stream, u.sum = sb, blake3.New()
		n = 0 // a pack is written as it fills, by add
	}
	for range n {
		u.wg.Add(1)
		go u.run()
	}
	return u
}

func (u *uploader) run() {
	defer u.wg.Done()
	for j := range u.jobs {
		err := u.r.be.Put(u.ctx, j.p.ID.name(), j.data)
		// The next pack fills this one's memory: a pack is ~20 MiB, and
		// a new one each time left the collector hundreds of MiB to find.
		select {
		case u.free <- j.data[:0]:
		default:
		}
		u.mu.Lock()
		if err != nil && u.err == nil {
			u.err = fmt.Errorf("store pack %s: %w", j.p.ID, err)
			u.cancel()
		}
		u.done = append(u.done, j.p)
		u.doneChunks += len(j.p.Blobs)
		u.mu.Unlock()
	}
}

func (u *uploader) has(h Hash) bool { _, ok := u.seen[h]; return ok }

// mark notes that h is on its way into a pack.
func (u *uploader) mark(h Hash) { u.seen[h] = struct{}{} }

// add appends one blob holding the chunks ents (their RawOff and Raw set).
func (u *uploader) add(blob []byte, ents []blobEntry) error {
	u.mu.Lock()
	err := u.err
	u.mu.Unlock()
	if err != nil {
		return err
	}
	if u.stream != nil {
		return u.write(blob, ents)
	}
	if u.cur == nil {
		select {
		case u.cur = <-u.free:
		default:
			u.cur = make([]byte, 0, packRoom())
		}
	}
	u.addEntries(ents, len(u.cur), len(blob))
	u.cur = append(u.cur, blob...)
	if len(u.cur) >= packTarget || len(u.ents) >= maxPackEntries {
		return u.cut()
	}
	return nil
}

// write appends a blob to the pack being written into its file.
func (u *uploader) write(blob []byte, ents []blobEntry) error {
	if u.w == nil {
		w, err := u.stream.Create(u.ctx, "packs")
		if err != nil {
			return u.fail(fmt.Errorf("store pack: %w", err))
		}
		u.w, u.size = w, 0
		u.sum.Reset()
	}
	u.addEntries(ents, u.size, len(blob))
	if _, err := u.w.Write(blob); err != nil {
		return u.fail(fmt.Errorf("store pack: %w", err))
	}
	u.sum.Write(blob)
	u.size += len(blob)
	if u.size >= packTarget || len(u.ents) >= maxPackEntries {
		return u.cut()
	}
	return nil
}

// fail notes the uploads' first error and returns it.
func (u *uploader) fail(err error) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.err == nil {
		u.err = err
		u.cancel()
	}
	return u.err
}

// maxPackEntries bounds the chunks one pack holds, so its index entries
// (48 bytes a chunk, held in memory while the pack fills) stay under 1
// MiB however well the data compresses: 4 KiB chunks of typical data put
// ~12 000 in a 16 MiB pack, but chunks that compress to a few bytes would
// put millions.
var maxPackEntries = 16384

// packRoom is the capacity that holds a pack with its trailer without
// growing: the target, one more blob (a little over a group when it
// does not compress), and the largest trailer.
func packRoom() int {
	return packTarget + groupRaw + groupRaw>>7 + 4096 + (maxPackEntries+groupRaw/4096)*blobEntLen + 64 + sealOverhead
}

// cut finishes the current pack and queues it.
func (u *uploader) cut() error {
	if len(u.ents) == 0 {
		return nil
	}
	trailer := u.r.seal.seal(nil, encodePackTrailer(u.ents))
	if u.stream != nil {
		return u.cutStream(trailer)
	}
	data := append(u.cur, trailer...)
	data = appendUint32(data, uint32(len(trailer)))
	p := packBlobs{ID: PackID(blake3.Sum256(data)), Blobs: u.ents}
	u.cur = nil // the next add takes a stored pack's buffer: data is the job's now
	u.nextEntries()
	select {
	case u.jobs <- packJob{data: data, p: p}:
		return nil
	case <-u.ctx.Done():
		u.mu.Lock()
		defer u.mu.Unlock()
		if u.err != nil {
			return u.err
		}
		return u.ctx.Err()
	}
}

// cutStream ends the pack being written with its trailer and names it.
func (u *uploader) cutStream(trailer []byte) error {
	tail := appendUint32(trailer, uint32(len(trailer)))
	w := u.w
	u.w = nil
	if _, err := w.Write(tail); err != nil {
		w.Abort()
		return u.fail(fmt.Errorf("store pack: %w", err))
	}
	u.sum.Write(tail)
	var id PackID
	u.sum.Sum(id[:0])
	p := packBlobs{ID: id, Blobs: u.ents}
	u.nextEntries()
	if err := w.Commit(id.name()); err != nil {
		return u.fail(fmt.Errorf("store pack %s: %w", id, err))
	}
	u.mu.Lock()
	u.done = append(u.done, p)
	u.doneChunks += len(p.Blobs)
	u.mu.Unlock()
	return nil
}

// nextEntries hands the entry list to the pack just cut (it is the
// pack's now, in done until indexed) and notes its room for the next:
// grown by appending from nothing, a pack's ~12 000 entries were
// allocated and copied anew at every step, ~4 times their size.
func (u *uploader) nextEntries() {
	u.entsRoom = max(u.entsRoom, cap(u.ents))
	u.ents = nil
}

// addEntries appends a blob's entries, at off in the pack, to the
// pack's.
func (u *uploader) addEntries(ents []blobEntry, off, n int) {
	if u.ents == nil {
		u.ents = make([]blobEntry, 0, max(u.entsRoom, len(ents)))
	}
	for _, e := range ents {
		e.Off, e.Len = uint32(off), uint32(n)
		u.ents = append(u.ents, e)
	}
}

func appendUint32(b []byte, v uint32) []byte {
	return append(b, byte(v), byte(v>>8), byte(v>>16), byte(v>>24))
}

// finishPacks stores the last pack, waits for all and makes them durable.
func (u *uploader) finishPacks() error {
	err := u.cut()
	close(u.jobs)
	u.ended = true
	u.wg.Wait()
	if err == nil {
		err = u.err
	}
	if err == nil && len(u.done) > 0 {
		if err = u.r.be.Sync(u.ctx); err != nil {
			err = fmt.Errorf("make packs durable: %w", err)
		}
	}
	return err
}

// flushIndex writes an index object naming the packs stored so far (all
// of them with force, else once indexEvery are waiting), after making
// them durable, and moves their chunks into the repository's index. It
// runs between batches on the backup's goroutine, the one that reads
// seen.
func (u *uploader) flushIndex(ctx context.Context, force bool) error {
	u.mu.Lock()
	if !force && len(u.done) < u.every && u.doneChunks < u.everyCh || u.err != nil {
		err := u.err
		u.mu.Unlock()
		return err
	}
	done := u.done
	u.done, u.doneChunks = nil, 0
	u.mu.Unlock()
	if len(done) == 0 {
		return nil
	}
	if err := u.r.be.Sync(ctx); err != nil {
		return fmt.Errorf("make packs durable: %w", err)
	}
	// Many packs' entries (up to ~45 MiB) are encoded as two objects on
	// two goroutines: at the end of a backup this is the part nothing
	// else overlaps.
	parts := [][]packBlobs{done}
	if len(done) >= 8 {
		parts = [][]packBlobs{done[:len(done)/2], done[len(done)/2:]}
	}
	objs := make([][]byte, len(parts))
	var wg sync.WaitGroup
	for i, part := range parts {
		wg.Go(func() {
			objs[i] = u.r.packObject(encodeChunkIndex(part, u.r.hashLen()))
		})
	}
	wg.Wait()
	names := make([]string, len(objs))
	for i, b := range objs {
		names[i] = "index/" + randomID()
		if err := u.r.be.Put(ctx, names[i], b); err != nil {
			return fmt.Errorf("write index: %w", err)
		}
		u.indexBytes += int64(len(b))
	}
	// Only now, with an index naming them stored, do the chunks become
	// findable for deduplication.
	u.r.mu.Lock()
	u.r.addPacks(done, u.fresh)
	u.r.indexes = append(u.r.indexes, names...)
	u.r.mu.Unlock()
	u.indexed.Add(1)
	if force { // the backup's last: nothing asks seen again
		u.seen = map[Hash]struct{}{}
		return nil
	}
	for _, p := range done {
		for _, e := range p.Blobs {
			delete(u.seen, e.Hash)
		}
	}
	// A Go map keeps the room of the most entries it held (and, as
	// entries come and go, grows further: 10 MiB at 1 Mi chunks, 18
	// MiB at 4 Mi, measured 2026-12-07): what is left, the chunks still
	// on their way into packs, goes into a new one.
	rest := make(map[Hash]struct{}, len(u.seen))
	for h := range u.seen {
		rest[h] = struct{}{}
	}
	u.seen = rest
	return nil
}

// finish stores the last packs, writes the index that names them, makes
// all durable and the chunks known to the repository. It returns the
// stored size of the index objects this backup wrote.
func (u *uploader) finish() (int64, error) {
	if err := u.finishPacks(); err != nil {
		return 0, err
	}
	if err := u.flushIndex(u.ctx, true); err != nil {
		return 0, err
	}
	if u.indexBytes > 0 {
		if err := u.r.be.Sync(u.ctx); err != nil {
			return 0, fmt.Errorf("write index: %w", err)
		}
	}
	return u.indexBytes, nil
}

// abort stops the uploads of a backup that failed; packs already stored
// are garbage that prune removes.
func (u *uploader) abort() {
	if u.w != nil {
		u.w.Abort()
		u.w = nil
	}
	if !u.ended {
		u.cancel()
		close(u.jobs)
		u.wg.Wait()
	}
	u.cancel()
}

// FileAllocation returns an Allocated function for an open regular file
// (an *os.File), from SEEK_DATA/SEEK_HOLE. It remembers the last data
// range found: on a file without holes one SEEK_DATA and one SEEK_HOLE
// answer every batch (each call walks the file's extents, which on a
// fragmented reflink file costs as much as the reading). The file must
// not change while it is used (a snapshot does not).
func FileAllocation(f interface{ Fd() uintptr }) func(off, n int64) ([]Range, error) {
	var known Range // a data range found before
	return func(off, n int64) ([]Range, error) {
		end := off + n
		if off >= known.Off && end <= known.Off+known.Len {
			return []Range{{off, n}}, nil
		}
		var out []Range
		fd := int(f.Fd())
		for pos := off; pos < end; {
			d, err := unix.Seek(fd, pos, unix.SEEK_DATA)
			if errors.Is(err, unix.ENXIO) {
				break // no data after pos
			}
			if err != nil {
				return []Range{{off, n}}, nil // no SEEK_DATA here: all may be data
			}
			if d >= end {
				break
			}
			h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
			if err != nil {
				return []Range{{off, n}}, nil
			}
			known = Range{d, h - d}
			out = append(out, Range{d, min(h, end) - d})
			pos = h
		}
		return out, nil
	}
}
