package liverestore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"umbra/backup"
	"umbra/cow"
)

// Source is the image a target is restored from: *backup.ImageReader.
type Source interface {
	Size() int64
	ChunkSize() int64
	// Zero reports whether chunk i is all zeros in the image.
	Zero(i int64) (bool, error)
	// Cached reports whether chunk i reads without fetching anything
	// from the repository (a zero chunk, or one of a blob the Source
	// holds opened).
	Cached(i int64) bool
	// ReadAt reads the image, every chunk checked against its hash.
	ReadAt(p []byte, off int64) (int, error)
	// Stream reads the chunks need wants in volume order (see
	// backup.ImageReader.Stream).
	Stream(ctx context.Context, need func(i int64) bool, put func(backup.StreamBatch) error) error
}

// ErrNeedCredentials marks a Source's failure for want of the
// repository's credentials (after a restart, where nothing gives them
// again): the restore waits in StateCredentials until Retry.
var ErrNeedCredentials = errors.New("the repository's credentials are not available")

// ErrUnavailable: a chunk not restored yet could not be read from the
// repository. It wraps syscall.EIO, which front-ends hand to clients.
var ErrUnavailable = fmt.Errorf("image data not restored yet and the repository cannot be read: %w", syscall.EIO)

// Options tune a Target.
type Options struct {
	// Rate bounds the background restore in bytes a second (0: none).
	Rate int64
	// Holes says the target reads zeros everywhere (a regular file
	// created or emptied for this restore): the background restore then
	// leaves the zero chunks as they are instead of punching them, until
	// a write to the target fails (it may have left bytes behind). Only
	// for Create: after a restart the target holds what was written.
	Holes bool
	// Backoff is the first wait after the repository failed (doubling up
	// to 32 times it; 0: one second).
	Backoff time.Duration
	// QuietStart holds the background restore back in its first moments,
	// while the target is attached and mounted (or a machine boots from
	// it): Run reads nothing for QuietStart, and then not until
	// QuietStart has passed without a read or write of the target, for
	// at most quietCap times QuietStart in all. Fetches for reads and
	// writes go on meanwhile. 0: none.
	QuietStart time.Duration
	// OnComplete runs once every chunk is durable in the target, before
	// the map file is removed (the service marks the volume ordinary).
	OnComplete func() error
	// OnState is told when the restore starts waiting for the
	// repository (StateWaiting, with why) or for credentials
	// (StateCredentials) and when it answers again
	// (StateRestoring). It must not block.
	OnState func(state, msg string)
	Logger  *slog.Logger
}

// commitEvery is how many bytes the background restore writes between
// making them durable and recording them in the map: 64 MiB costs a
// target fsync and a map write per 64 MiB, and at most that much is
// fetched again after a crash. A zero chunk, a hole punched, counts for
// 1/zeroWeight of its size.
const (
	commitEvery = 64 << 20
	zeroWeight  = 64
)

// Chunks are locked in stripes of stripeChunks adjacent chunks (256 KiB
// of 4 KiB chunks), numStripes of them, so that a batch of the
// background restore (4 MiB) or a read's window takes a few locks, not
// one a chunk nor all of them.
const (
	numStripes   = 1024
	stripeChunks = 64
)

// readAround is the aligned window a read of an unrestored chunk
// restores along with the chunks it reads (a multiple of every chunk
// size): the window's chunks that come without another fetch from the
// repository (zero, or in a blob already opened — a full image's
// neighbours share blobs of up to 4 MiB). Each costs a hash and a write:
// a wider window makes each read that fetches slower, which random
// reads (and a loaded machine) feel more than the fetches it spares.
const readAround = 256 << 10

// Target is a restore target in use while it is restored. It implements
// cow.File. Memory: two bits per chunk (in memory and durable bitmaps),
// 4 MiB for a 64 GiB image of 4 KiB chunks, plus the Source's.
type Target struct {
	f       cow.File
	src     Source
	fsys    cow.FS
	mapPath string
	image   string
	cs      int64
	size    int64
	n       int64 // chunks
	log     *slog.Logger
	backoff time.Duration
	quiet   time.Duration // Options.QuietStart
	onDone  func() error
	onState func(state, msg string)

	present []atomic.Uint64 // chunks with their final bytes written (durable or not)
	count   atomic.Int64    // bits set in present
	done    atomic.Bool     // every chunk present: I/O passes straight through
	stripes [numStripes]sync.Mutex

	pendMu  sync.Mutex       // guards pending
	pending map[int64]uint64 // bits of present not yet in the map, by word

	commitMu     sync.Mutex // one commit at a time; guards the fields below
	m            *mapFile   // nil once closed or removed
	removed      bool       // complete: the map is gone
	durable      []uint64   // the bits recorded in the map
	durableCount int64
	sinceCommit  atomic.Int64 // weighted bytes the background restore wrote since the last commit began

	canPunch atomic.Bool // the target punches holes (a regular file)
	// holes: every chunk not the target's own reads zeros in the file
	// (Options.Holes, until a write fails).
	holes atomic.Bool
	// bgCommitErr is the last commit of the background restore's
	// committer when it failed (nil once one succeeds).
	bgCommitErr atomic.Pointer[error]
	// demanding counts the reads and writes fetching unrestored chunks:
	// while there are any, the background restore waits (demandIdle is
	// signalled when the count drops to 0), so that they do not queue
	// behind it for the stripes, the repository or the CPU.
	demanding atomic.Int64
	// quietUntil (Unix nanoseconds) is when the quiet start ends unless
	// a read or write comes first (each moves it to QuietStart after
	// it); quietEnd is when it ends at the latest (set by Run), and
	// quietOver says it has ended.
	quietUntil atomic.Int64
	quietEnd   atomic.Int64
	quietOver  atomic.Bool
	demandIdle chan struct{}
	demand     atomic.Int64
	filled     atomic.Int64
	rate       atomic.Int64
	rateWake   chan struct{} // SetRate wakes a waiting restore
	retryWake  chan struct{} // Retry wakes a restore waiting after a failure

	stMu     sync.Mutex // guards the fields below
	state    string
	lastErr  string
	failedAt time.Time // when the repository last failed
	rateFrom time.Time // when the rate was set (the budget counts from it)
	rateBase int64     // filled at rateFrom
	speed    float64   // background bytes a second, smoothed
	speedAt  time.Time
	speedN   int64
}

// States of a live restore (Progress.State).
const (
	StateRestoring   = "restoring"
	StateWaiting     = "waiting for the repository"
	StateCredentials = "waiting for credentials"
	StatePaused      = "paused"
	StateDone        = "done"
)

// Create starts a live restore of src (image imageID) into f, recording
// its progress in a new map file at mapPath. f must already hold
// src.Size() bytes; a regular file must be sparse or zeroed where the
// image is zero, or read as anything (the map says nothing is restored).
func Create(fsys cow.FS, f cow.File, mapPath string, src Source, imageID string, opts Options) (*Target, error) {
	if err := checkSize(f, src); err != nil {
		return nil, err
	}
	h := mapHeader{chunk: src.ChunkSize(), size: src.Size(), image: imageID}
	m, err := createMap(fsys, mapPath, h)
	if err != nil {
		return nil, err
	}
	t := newTarget(fsys, f, m, mapPath, src, make([]uint64, h.words()), opts)
	t.holes.Store(opts.Holes)
	return t, nil
}

// Open resumes the live restore recorded in the map file at mapPath.
func Open(fsys cow.FS, f cow.File, mapPath string, src Source, imageID string, opts Options) (*Target, error) {
	if err := checkSize(f, src); err != nil {
		return nil, err
	}
	m, words, err := openMap(fsys, mapPath)
	if err != nil {
		return nil, err
	}
	if m.h.image != imageID || m.h.size != src.Size() || m.h.chunk != src.ChunkSize() {
		m.f.Close()
		return nil, fmt.Errorf("live restore map %s is of image %s (%d bytes, chunks of %d), not of %s (%d bytes, chunks of %d)",
			mapPath, m.h.image, m.h.size, m.h.chunk, imageID, src.Size(), src.ChunkSize())
	}
	return newTarget(fsys, f, m, mapPath, src, words, opts), nil
}

func checkSize(f cow.File, src Source) error {
	size, err := f.Size()
	if err != nil {
		return fmt.Errorf("live restore target: size: %w", err)
	}
	if size < src.Size() {
		return fmt.Errorf("live restore target holds %d bytes and the image %d: give a target at least as large", size, src.Size())
	}
	return nil
}

func newTarget(fsys cow.FS, f cow.File, m *mapFile, mapPath string, src Source, words []uint64, opts Options) *Target {
	t := &Target{f: f, src: src, fsys: fsys, mapPath: mapPath, image: m.h.image, cs: m.h.chunk, size: m.h.size, n: m.h.nchunks(),
		log: opts.Logger, backoff: opts.Backoff, onDone: opts.OnComplete, onState: opts.OnState, m: m, durable: words,
		present: make([]atomic.Uint64, len(words)), pending: map[int64]uint64{}, rateWake: make(chan struct{}, 1), retryWake: make(chan struct{}, 1), demandIdle: make(chan struct{}, 1),
		state: StateRestoring}
	if t.log == nil {
		t.log = slog.Default()
	}
	if t.backoff <= 0 {
		t.backoff = time.Second
	}
	t.quiet = opts.QuietStart
	if t.quiet <= 0 {
		t.quietOver.Store(true)
	}
	var c int64
	for i, w := range words {
		t.present[i].Store(w)
		c += int64(bits.OnesCount64(w))
	}
	t.count.Store(c)
	t.durableCount = c
	t.canPunch.Store(true)
	t.rate.Store(opts.Rate)
	t.rateFrom = time.Now()
	if c == t.n {
		t.done.Store(true)
	}
	return t
}

// has reports whether chunk c is the target's own.
func (t *Target) has(c int64) bool { return t.present[c/64].Load()&(1<<(c%64)) != 0 }

// mark records chunks [c0, c1) as the target's own, their data written;
// the caller holds their stripes. It sets the bits a word at a time: a
// run of zero chunks the background restore passes over is millions of
// them in a large, mostly empty image.
func (t *Target) mark(c0, c1 int64) {
	var added int64
	t.pendMu.Lock()
	for c := c0; c < c1; {
		w := c / 64
		e := min(c1, (w+1)*64)
		m := ^uint64(0) >> (64 - (e - c)) << (c % 64)
		if old := t.present[w].Or(m); old&m != m {
			t.pending[w] |= m &^ old
			added += int64(bits.OnesCount64(m &^ old))
		}
		c = e
	}
	t.pendMu.Unlock()
	if t.count.Add(added) == t.n {
		t.done.Store(true)
	}
}

func (t *Target) allPresent(c0, c1 int64) bool {
	for c := c0; c < c1; c++ {
		if !t.has(c) {
			return false
		}
	}
	return true
}

// chunks returns the chunks [c0, c1) that [off, off+n) touches.
func (t *Target) chunks(off, n int64) (int64, int64) {
	c0 := off / t.cs
	c1 := min((off+n+t.cs-1)/t.cs, t.n)
	return c0, max(c1, c0)
}

// lock takes the stripes of chunks [c0, c1) in ascending order.
func (t *Target) lock(c0, c1 int64) func() {
	var idx []int
	g0, g1 := c0/stripeChunks, (max(c1, c0+1)-1)/stripeChunks+1
	if g1-g0 >= numStripes {
		idx = make([]int, numStripes)
		for i := range idx {
			idx[i] = i
		}
	} else {
		for g := g0; g < g1; g++ {
			idx = append(idx, int(g%numStripes))
		}
		slices.Sort(idx)
		idx = slices.Compact(idx)
	}
	for _, i := range idx {
		t.stripes[i].Lock()
	}
	return func() {
		for _, i := range idx {
			t.stripes[i].Unlock()
		}
	}
}

// quietCap bounds the quiet start: the background restore starts at
// most quietCap times Options.QuietStart after Run, however many reads
// come.
const quietCap = 4

// touch notes a read or write of the target: during the quiet start,
// the background restore holds back until QuietStart after it.
func (t *Target) touch() {
	if t.quietOver.Load() {
		return
	}
	until := time.Now().Add(t.quiet).UnixNano()
	for {
		old := t.quietUntil.Load()
		if old >= until || t.quietUntil.CompareAndSwap(old, until) {
			return
		}
	}
}

// quietWait is how long the background restore still holds back at now:
// until the quiet start's until, and at most its end.
func quietWait(now, until, end time.Time) time.Duration {
	if end.Before(until) {
		until = end
	}
	return until.Sub(now)
}

// holdQuiet waits while the quiet start lasts (Options.QuietStart).
func (t *Target) holdQuiet(ctx context.Context) error {
	for !t.quietOver.Load() {
		now := time.Now()
		end := time.Unix(0, t.quietEnd.Load())
		d := quietWait(now, time.Unix(0, t.quietUntil.Load()), end)
		if d <= 0 {
			if !now.Before(end) {
				t.quietOver.Store(true)
			}
			return nil
		}
		timer := time.NewTimer(d)
		select {
		case <-ctx.Done():
			timer.Stop()
			return ctx.Err()
		case <-timer.C:
		}
	}
	return nil
}

// ReadAt reads the target's logical content: unrestored chunks are
// fetched first.
func (t *Target) ReadAt(p []byte, off int64) (int, error) {
	if !t.done.Load() {
		t.touch()
		c0, c1 := t.chunks(off, int64(len(p)))
		if !t.allPresent(c0, c1) {
			if err := t.fetchAround(c0, c1); err != nil {
				return 0, err
			}
		}
	}
	return t.f.ReadAt(p, off)
}

// fetchAround restores the unrestored chunks of [c0, c1) for a read,
// and with them the chunks of the aligned window around them that come
// without another fetch: a fetch opens a whole blob (up to 4 MiB of
// chunks, most of them the volume's neighbours in a full image), so they
// cost a hash and a write, and the reads that follow nearby (a
// filesystem's) find them restored.
func (t *Target) fetchAround(c0, c1 int64) error {
	w := max(readAround/t.cs, 1)
	w0, w1 := c0/w*w, min((c1+w-1)/w*w, t.n)
	done := t.demandStart()
	defer done()
	unlock := t.lock(w0, w1)
	defer unlock()
	if err := t.fetchMissing(c0, c1, func(int64) bool { return true }); err != nil {
		return err
	}
	// The read has its chunks: what the window adds is a bonus, and
	// its failure the background restore's to retry.
	t.fetchMissing(w0, w1, t.src.Cached)
	return nil
}

// demandStart counts a fetch for a read or write until the function it
// returns is called: the background restore waits meanwhile.
func (t *Target) demandStart() func() {
	t.demanding.Add(1)
	return func() {
		if t.demanding.Add(-1) == 0 {
			select {
			case t.demandIdle <- struct{}{}:
			default:
			}
		}
	}
}

// yield waits until no read or write is fetching.
func (t *Target) yield(ctx context.Context) error {
	for t.demanding.Load() > 0 {
		select {
		case <-t.demandIdle:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// fetchMissing restores the chunks of [c0, c1) that are not the
// target's own and that want says to (runs of adjacent chunks in one
// read); the caller holds their stripes.
func (t *Target) fetchMissing(c0, c1 int64, want func(c int64) bool) error {
	const maxRun = 1 << 20
	var buf []byte
	fetched := false
	for c := c0; c < c1; {
		if t.has(c) || !want(c) {
			c++
			continue
		}
		zero, err := t.src.Zero(c)
		if err != nil {
			return t.unavailable(c, err)
		}
		e := c + 1
		for e < c1 && !t.has(e) && want(e) && (e-c)*t.cs < maxRun {
			z, err := t.src.Zero(e)
			if err != nil {
				return t.unavailable(e, err)
			}
			if z != zero {
				break
			}
			e++
		}
		off, end := c*t.cs, min(e*t.cs, t.size)
		if zero {
			if err := t.zero(off, end-off); err != nil {
				return fmt.Errorf("live restore: write target at %d: %w", off, err)
			}
		} else {
			if int64(cap(buf)) < end-off {
				buf = make([]byte, end-off)
			}
			b := buf[:end-off]
			if _, err := t.src.ReadAt(b, off); err != nil {
				return t.unavailable(c, err)
			}
			if _, err := t.f.WriteAt(b, off); err != nil {
				t.holes.Store(false)
				return fmt.Errorf("live restore: write target at %d: %w", off, err)
			}
		}
		t.mark(c, e)
		t.demand.Add(e - c)
		c = e
		fetched = true
	}
	if fetched {
		t.setErr(nil) // the repository answers
	}
	return nil
}

func (t *Target) unavailable(c int64, err error) error {
	t.setErr(err)
	return fmt.Errorf("read image %s at %d: %v: %w", t.image, c*t.cs, err, ErrUnavailable)
}

// zero makes [off, off+n) of the target read as zeros: a hole where the
// target punches, else written zeros.
func (t *Target) zero(off, n int64) error {
	if t.canPunch.Load() {
		if err := t.f.Punch(off, n); err == nil {
			return nil
		}
		t.canPunch.Store(false)
	}
	z := make([]byte, min(n, 1<<20))
	for done := int64(0); done < n; {
		k := min(n-done, int64(len(z)))
		if _, err := t.f.WriteAt(z[:k], off+done); err != nil {
			return err
		}
		done += k
	}
	return nil
}

// WriteAt writes p: an unrestored chunk it covers only in part is filled
// from the image first, and every chunk it touches becomes the target's
// own.
func (t *Target) WriteAt(p []byte, off int64) (int, error) {
	if t.done.Load() {
		return t.f.WriteAt(p, off)
	}
	t.touch()
	c0, c1 := t.chunks(off, int64(len(p)))
	if t.allPresent(c0, c1) {
		return t.f.WriteAt(p, off)
	}
	defer t.demandStart()()
	unlock := t.lock(c0, c1)
	defer unlock()
	if err := t.fillEdges(off, int64(len(p)), c0, c1); err != nil {
		return 0, err
	}
	n, err := t.f.WriteAt(p, off)
	if err != nil {
		t.holes.Store(false)
		return n, err
	}
	t.mark(c0, c1)
	return n, nil
}

// fillEdges fetches the unrestored chunks at the ends of [off, off+n)
// that the range covers only in part; the caller holds the stripes.
func (t *Target) fillEdges(off, n, c0, c1 int64) error {
	partial := func(c int64) bool {
		lo, hi := c*t.cs, min((c+1)*t.cs, t.size)
		return off > lo || off+n < hi
	}
	return t.fetchMissing(c0, c1, partial)
}

// Punch deallocates [off, off+length) (a trim, or zeroes written
// through the volume): the chunks it touches become the target's own.
func (t *Target) Punch(off, length int64) error {
	if t.done.Load() {
		return t.f.Punch(off, length)
	}
	t.touch()
	c0, c1 := t.chunks(off, length)
	defer t.demandStart()()
	unlock := t.lock(c0, c1)
	defer unlock()
	if err := t.fillEdges(off, length, c0, c1); err != nil {
		return err
	}
	if err := t.f.Punch(off, length); err != nil {
		return err
	}
	t.mark(c0, c1)
	return nil
}

// Sync makes everything written durable and records the chunks restored
// or written so far in the map.
func (t *Target) Sync() error { return t.commit() }

// commit makes the target durable, then records in the map the chunks
// whose data that covered.
func (t *Target) commit() error {
	t.commitMu.Lock()
	defer t.commitMu.Unlock()
	t.pendMu.Lock()
	pend := t.pending
	t.pending = map[int64]uint64{}
	t.pendMu.Unlock()
	t.sinceCommit.Store(0)
	restore := func() {
		t.pendMu.Lock()
		for w, b := range pend {
			t.pending[w] |= b
		}
		t.pendMu.Unlock()
	}
	if err := t.f.Sync(); err != nil {
		restore()
		return err
	}
	if len(pend) == 0 || t.m == nil {
		return nil
	}
	ws := make([]int64, 0, len(pend))
	for w, b := range pend {
		if t.durable[w]&b != b {
			t.durableCount += int64(bits.OnesCount64(b &^ t.durable[w]))
			t.durable[w] |= b
		}
		ws = append(ws, w)
	}
	slices.Sort(ws)
	for i := 0; i < len(ws); {
		j := i + 1
		for j < len(ws) && ws[j] == ws[j-1]+1 {
			j++
		}
		if err := t.m.writeWords(t.durable, ws[i], ws[j-1]+1); err != nil {
			restore()
			return fmt.Errorf("live restore map %s: %w", t.mapPath, err)
		}
		i = j
	}
	if err := t.m.f.Sync(); err != nil {
		restore()
		return fmt.Errorf("live restore map %s: %w", t.mapPath, err)
	}
	return nil
}

// Run restores every chunk not yet the target's own, in volume order,
// until all are (then it makes them durable, calls OnComplete, removes
// the map and returns nil) or ctx ends. A repository that fails is
// retried with backoff.
//
// Its commits (target fsync, map write) run beside it, on a goroutine
// of their own, so that writing goes on while the target is flushed.
func (t *Target) Run(ctx context.Context) error {
	due := make(chan struct{}, 1)
	cctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t.committer(cctx, due)
	}()
	defer wg.Wait()
	defer stop()
	if !t.quietOver.Load() {
		t.quietEnd.Store(time.Now().Add(quietCap * t.quiet).UnixNano())
		t.touch()
		if err := t.holdQuiet(ctx); err != nil {
			return err
		}
	}
	wait := t.backoff
	for !t.done.Load() {
		err := t.src.Stream(ctx, func(i int64) bool { return !t.has(i) }, func(b backup.StreamBatch) error { return t.putBatch(ctx, b, due) })
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err == nil && !t.done.Load() {
			err = errors.New("the image's chunk list ended before every chunk was restored")
		}
		if err == nil {
			break
		}
		t.setErr(err)
		t.log.Warn("live restore: the repository failed; retrying", "image", t.image, "target", t.mapPath, "in", wait, "err", err)
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return ctx.Err()
		case <-t.retryWake:
			timer.Stop()
			wait = t.backoff
			continue
		case <-timer.C:
		}
		wait = min(wait*2, 32*t.backoff)
	}
	return t.complete()
}

// committer commits whenever due says the background restore has
// written commitEvery since the last commit, until ctx ends.
func (t *Target) committer(ctx context.Context, due <-chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-due:
		}
		if err := t.commit(); err != nil {
			t.bgCommitErr.Store(&err)
		} else {
			t.bgCommitErr.Store(nil)
		}
	}
}

// complete makes every chunk durable in the map, then removes it.
func (t *Target) complete() error {
	if err := t.commit(); err != nil {
		return fmt.Errorf("live restore of %s: %w", t.image, err)
	}
	t.commitMu.Lock()
	defer t.commitMu.Unlock()
	if t.m == nil {
		return nil
	}
	if t.durableCount != t.n {
		return fmt.Errorf("live restore of %s: %d of %d chunks recorded at the end", t.image, t.durableCount, t.n)
	}
	if t.onDone != nil {
		if err := t.onDone(); err != nil {
			return fmt.Errorf("live restore of %s: %w", t.image, err)
		}
	}
	t.m.f.Close()
	t.m, t.removed = nil, true
	if err := t.fsys.Remove(t.mapPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("live restore of %s complete; remove its map %s: %w", t.image, t.mapPath, err)
	}
	t.fsys.SyncDir(dirOf(t.mapPath))
	t.stMu.Lock()
	t.state, t.lastErr = StateDone, ""
	t.stMu.Unlock()
	t.log.Info("live restore complete", "image", t.image, "map", t.mapPath)
	return nil
}

// put writes a batch the background restore read (putBatch), and
// commits itself when one is due.
func (t *Target) put(ctx context.Context, b backup.StreamBatch) error { return t.putBatch(ctx, b, nil) }

// putBatch writes a batch the background restore read: every chunk that
// is not the target's own yet (zero chunks as holes; a batch of zero
// chunks only comes without Data), after the reads and writes fetching
// unrestored chunks. A commit that is due is handed
// to due (the committer), or made here when due is nil; a failure of
// the committer's last commit stops the restore.
func (t *Target) putBatch(ctx context.Context, b backup.StreamBatch, due chan<- struct{}) error {
	t.setErrSince(nil, b.Started) // the repository answers: not waiting for it, whatever the rate
	if err := t.waitRate(ctx, int64(len(b.Data))); err != nil {
		return err
	}
	if err := t.holdQuiet(ctx); err != nil {
		return err
	}
	if err := t.yield(ctx); err != nil {
		return err
	}
	if errp := t.bgCommitErr.Load(); errp != nil {
		return *errp
	}
	c0, c1 := b.First, b.First+int64(len(b.Zero))
	unlock := t.lock(c0, c1)
	var written, weighted int64
	err := func() error {
		for j := int64(0); j < c1-c0; {
			c := c0 + j
			if b.Skip[j] || t.has(c) {
				j++
				continue
			}
			zero := b.Zero[j]
			k := j + 1
			for k < c1-c0 && !b.Skip[k] && !t.has(c0+k) && b.Zero[k] == zero {
				k++
			}
			off := c * t.cs
			lo, hi := j*t.cs, j*t.cs+min((k-j)*t.cs, t.size-off)
			switch {
			case zero && t.holes.Load():
				// Zeros already: nothing to write.
			case zero:
				if err := t.zero(off, hi-lo); err != nil {
					return fmt.Errorf("live restore: write target at %d: %w", off, err)
				}
				weighted += (hi - lo) / zeroWeight
			default:
				if _, err := t.f.WriteAt(b.Data[lo:hi], off); err != nil {
					t.holes.Store(false)
					return fmt.Errorf("live restore: write target at %d: %w", off, err)
				}
				weighted += hi - lo
			}
			t.mark(c, c0+k)
			written += hi - lo
			j = k
		}
		return nil
	}()
	unlock()
	t.filled.Add(written)
	t.noteSpeed(written)
	if err != nil {
		return err
	}
	if t.sinceCommit.Add(weighted) < commitEvery {
		return nil
	}
	if due == nil {
		return t.commit()
	}
	select {
	case due <- struct{}{}:
	default: // one is due already
	}
	return nil
}

// Retry makes a restore waiting after a failure of its Source try again
// now (new credentials were given).
func (t *Target) Retry() {
	select {
	case t.retryWake <- struct{}{}:
	default:
	}
}

// SetRate changes the background restore's bound (bytes a second, 0:
// none), from now on.
func (t *Target) SetRate(r int64) {
	t.stMu.Lock()
	t.rate.Store(r)
	t.rateFrom, t.rateBase = time.Now(), t.filled.Load()
	t.stMu.Unlock()
	select {
	case t.rateWake <- struct{}{}:
	default:
	}
}

// waitRate waits until n more bytes fit the rate.
func (t *Target) waitRate(ctx context.Context, n int64) error {
	for {
		r := t.rate.Load()
		if r <= 0 {
			return nil
		}
		t.stMu.Lock()
		from, base := t.rateFrom, t.rateBase
		t.stMu.Unlock()
		due := from.Add(time.Duration(float64(t.filled.Load()-base+n) / float64(r) * float64(time.Second)))
		d := time.Until(due)
		if d <= 0 {
			return nil
		}
		t.setState(StatePaused)
		timer := time.NewTimer(d)
		select {
		case <-ctx.Done():
			timer.Stop()
			return ctx.Err()
		case <-t.rateWake:
			timer.Stop()
		case <-timer.C:
		}
		t.setState(StateRestoring)
	}
}

// setState moves between restoring and paused; waiting for the
// repository or for credentials ends only when it answers (setErr), and
// done stays.
func (t *Target) setState(s string) {
	t.stMu.Lock()
	if t.state != StateDone && !waiting(t.state) {
		t.state = s
	}
	t.stMu.Unlock()
}

func waiting(state string) bool { return state == StateWaiting || state == StateCredentials }

// setErr records the repository's failure (nil: it answers again).
func (t *Target) setErr(err error) { t.setErrSince(err, time.Time{}) }

// setErrSince is setErr for an answer that began at since (zero: now):
// an answer begun before the last failure — a batch the background
// restore read ahead of it — does not end the waiting for the
// repository.
func (t *Target) setErrSince(err error, since time.Time) {
	t.stMu.Lock()
	if t.state == StateDone || err == nil && !since.IsZero() && since.Before(t.failedAt) {
		t.stMu.Unlock()
		return
	}
	was := t.state
	if err != nil {
		t.failedAt = time.Now()
	}
	switch {
	case err == nil:
		if waiting(t.state) {
			t.state = StateRestoring
		}
		t.lastErr = ""
	case errors.Is(err, ErrNeedCredentials):
		t.state, t.lastErr = StateCredentials, err.Error()
	default:
		t.state, t.lastErr = StateWaiting, err.Error()
	}
	now, msg := t.state, t.lastErr
	t.stMu.Unlock()
	if t.onState != nil && now != was && (waiting(was) || waiting(now)) {
		t.onState(now, msg)
	}
}

func (t *Target) noteSpeed(n int64) {
	t.stMu.Lock()
	defer t.stMu.Unlock()
	now := time.Now()
	if t.speedAt.IsZero() {
		t.speedAt = now
		return
	}
	t.speedN += n
	if d := now.Sub(t.speedAt); d >= time.Second {
		cur := float64(t.speedN) / d.Seconds()
		if t.speed == 0 {
			t.speed = cur
		} else {
			t.speed = 0.7*t.speed + 0.3*cur
		}
		t.speedAt, t.speedN = now, 0
	}
}

// Progress is a live restore's state.
type Progress struct {
	Image    string        `json:"image"`
	State    string        `json:"state"`
	Error    string        `json:"error,omitempty"` // the repository's last failure while waiting
	Size     int64         `json:"size"`
	Restored int64         `json:"restored"` // bytes that are the target's own (restored or written)
	Demand   int64         `json:"demand_chunks"`
	Speed    float64       `json:"speed"` // background bytes a second, recent
	ETA      time.Duration `json:"eta"`   // 0 when unknown or done
	Rate     int64         `json:"rate"`  // the background bound, 0: none
}

// Progress reports how far the restore is.
func (t *Target) Progress() Progress {
	restored := min(t.count.Load()*t.cs, t.size)
	t.stMu.Lock()
	p := Progress{Image: t.image, State: t.state, Error: t.lastErr, Size: t.size, Restored: restored,
		Demand: t.demand.Load(), Speed: t.speed, Rate: t.rate.Load()}
	t.stMu.Unlock()
	if t.done.Load() && p.State != StateDone {
		p.State = StateRestoring // every chunk is there; making it durable
	}
	if p.Speed > 0 && p.State != StateDone {
		p.ETA = time.Duration(float64(p.Size-p.Restored) / p.Speed * float64(time.Second))
	}
	return p
}

// Complete reports whether the restore has ended and its map is gone.
func (t *Target) Complete() bool {
	t.commitMu.Lock()
	defer t.commitMu.Unlock()
	return t.removed
}

// Truncate is refused: a volume's size does not change under it.
func (t *Target) Truncate(int64) error {
	return errors.New("live restore target: truncate refused")
}

// Size is the target's size.
func (t *Target) Size() (int64, error) { return t.f.Size() }

// Close records what is durable and closes the target and the map; the
// caller stops Run first.
func (t *Target) Close() error {
	err := t.commit()
	t.commitMu.Lock()
	if t.m != nil {
		if cerr := t.m.f.Close(); err == nil {
			err = cerr
		}
		t.m = nil
	}
	t.commitMu.Unlock()
	if cerr := t.f.Close(); err == nil {
		err = cerr
	}
	return err
}

var _ cow.File = (*Target)(nil)
