package liverestore

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"umbra/backup"
)

// newTestTarget is a target in a memFS restoring a fresh image of size
// bytes (testImage's mix of zero, repeated and random chunks).
func newTestTarget(t *testing.T, size int, src func(*backup.ImageReader) Source) (*Target, memImage) {
	t.Helper()
	img, ir, id := testImage(t, rand.New(rand.NewPCG(21, 22)), size)
	fsys := &memFS{files: map[string]*crashFile{}}
	tf, _ := fsys.OpenFile("/t", os.O_RDWR|os.O_CREATE, 0)
	tf.Truncate(int64(size))
	var s Source = ir
	if src != nil {
		s = src(ir)
	}
	tg, err := Create(fsys, tf, "/t.map", s, id, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tg.Close() })
	return tg, img
}

// TestLockStripes: a batch of the background restore (4 MiB of 4 KiB
// chunks) or a read's window locks the stripes of its own chunks, not
// every stripe: a read elsewhere does not wait for it.
func TestLockStripes(t *testing.T) {
	tg, _ := newTestTarget(t, 1<<20, nil)
	unlock := tg.lock(0, 1024)
	defer unlock()
	far := int64(1024 * 8) // a chunk in a stripe of its own
	s := far / stripeChunks % numStripes
	if !tg.stripes[s].TryLock() {
		t.Fatalf("locking chunks 0-1023 took the stripe of chunk %d", far)
	}
	tg.stripes[s].Unlock()
	if tg.stripes[0].TryLock() {
		t.Fatal("locking chunks 0-1023 left chunk 0's stripe free")
	}
}

// gatedSource holds reads (the fetches of reads and writes) until
// release is closed, and says on entered that one is held.
type gatedSource struct {
	*backup.ImageReader
	entered chan struct{}
	release chan struct{}
}

func (s *gatedSource) ReadAt(p []byte, off int64) (int, error) {
	select {
	case s.entered <- struct{}{}:
	default:
	}
	<-s.release
	return s.ImageReader.ReadAt(p, off)
}

// TestBackgroundYields: while a read fetches unrestored data, the
// background restore writes nothing: it waits for the read (here, with
// a context that has ended, it gives up instead of writing).
func TestBackgroundYields(t *testing.T) {
	const size = 8 << 20
	var gs *gatedSource
	tg, img := newTestTarget(t, size, func(ir *backup.ImageReader) Source {
		gs = &gatedSource{ImageReader: ir, entered: make(chan struct{}, 1), release: make(chan struct{})}
		return gs
	})
	// A non-zero chunk to read, far from the batch below.
	c := int64(size/4096 - 1)
	for bytes.Equal(img[c*4096:(c+1)*4096], make([]byte, 4096)) {
		c--
	}
	read := make(chan error, 1)
	go func() {
		_, err := tg.ReadAt(make([]byte, 4096), c*4096)
		read <- err
	}()
	<-gs.entered
	// A batch for chunks 0-15, as the background restore hands it over.
	b := backup.StreamBatch{First: 0, Data: bytes.Clone(img[:16*4096]), Zero: make([]bool, 16), Skip: make([]bool, 16)}
	for j := range b.Zero {
		b.Zero[j] = bytes.Equal(img[j*4096:(j+1)*4096], make([]byte, 4096))
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := tg.put(ctx, b)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("background batch during a fetching read: %v, want it to wait (context canceled)", err)
	}
	if tg.has(0) {
		t.Error("the background restore wrote while a read was fetching")
	}
	close(gs.release)
	if err := <-read; err != nil {
		t.Fatal(err)
	}
	if err := tg.put(context.Background(), b); err != nil || !tg.has(0) {
		t.Fatalf("background batch once the read is done: %v (chunk 0 restored: %v)", err, tg.has(0))
	}
}

// TestReadAround: a read of one unrestored chunk restores the chunks of
// its window that read without a fetch (zero, or in the blob it opened),
// and only those.
func TestReadAround(t *testing.T) {
	const size = 4 << 20
	img, ir, id := testImage(t, rand.New(rand.NewPCG(23, 24)), size)
	fsys := &memFS{files: map[string]*crashFile{}}
	tf, _ := fsys.OpenFile("/t", os.O_RDWR|os.O_CREATE, 0)
	tf.Truncate(size)
	tg, err := Create(fsys, tf, "/t.map", ir, id, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	c := int64(1<<20/4096 + 5)
	zero := make([]byte, 4096)
	for bytes.Equal(img[c*4096:(c+1)*4096], zero) {
		c++
	}
	got := make([]byte, 4096)
	if _, err := tg.ReadAt(got, c*4096); err != nil || !bytes.Equal(got, img[c*4096:(c+1)*4096]) {
		t.Fatalf("read chunk %d: %v", c, err)
	}
	w := int64(readAround / 4096)
	for i := c / w * w; i < (c/w+1)*w; i++ {
		if tg.has(i) != ir.Cached(i) {
			t.Errorf("chunk %d of the window: restored %v, reads without a fetch %v", i, tg.has(i), ir.Cached(i))
		}
	}
	if _, err := tf.ReadAt(got, c*4096); err != nil || !bytes.Equal(got, img[c*4096:(c+1)*4096]) {
		t.Fatalf("the target file's chunk %d: %v", c, err)
	}
}

// punchCounter counts the holes punched in a file.
type punchCounter struct {
	*crashFile
	punches atomic.Int64
}

func (p *punchCounter) Punch(off, n int64) error {
	p.punches.Add(1)
	return p.crashFile.Punch(off, n)
}

// TestHolesTarget: the background restore into a target that reads
// zeros everywhere (Options.Holes) leaves the image's zero chunks as
// they are, and the target ends as the image; without Holes it punches
// them.
func TestHolesTarget(t *testing.T) {
	img, ir, id := testImage(t, rand.New(rand.NewPCG(25, 26)), 2<<20)
	for _, holes := range []bool{true, false} {
		fsys := &memFS{files: map[string]*crashFile{}}
		cf, _ := fsys.OpenFile("/t", os.O_RDWR|os.O_CREATE, 0)
		cf.Truncate(int64(len(img)))
		pc := &punchCounter{crashFile: cf.(*crashFile)}
		tg, err := Create(fsys, pc, "/t.map", ir, id, Options{Holes: holes})
		if err != nil {
			t.Fatal(err)
		}
		if err := tg.Run(context.Background()); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(img))
		if _, err := cf.ReadAt(got, 0); err != nil || !bytes.Equal(got, img) {
			t.Fatalf("holes %v: the target is not the image (%v)", holes, err)
		}
		if n := pc.punches.Load(); holes && n != 0 || !holes && n == 0 {
			t.Errorf("holes %v: %d holes punched", holes, n)
		}
		tg.Close()
	}
}

// TestWaitingOutlastsReadAhead: a batch the background restore read
// before the repository failed, handed over after a read found the
// repository gone, does not end the waiting for it (volume list would
// show the restore running through an outage); a batch read after the
// failure does.
func TestWaitingOutlastsReadAhead(t *testing.T) {
	var fs *faultSource
	tg, img := newTestTarget(t, 1<<20, func(ir *backup.ImageReader) Source {
		fs = &faultSource{ImageReader: ir, failed: make(chan struct{}, 1)}
		return fs
	})
	cs := tg.cs
	batch := func(first int64, started time.Time) backup.StreamBatch {
		return backup.StreamBatch{First: first, Data: slices.Clone(img[first*cs : (first+1)*cs]), Zero: []bool{false}, Skip: []bool{false}, Started: started}
	}
	readAhead := time.Now()
	fs.fail.Store(true)
	if _, err := tg.ReadAt(make([]byte, 4096), 8*cs); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("read with the repository gone: %v, want ErrUnavailable", err)
	}
	if st := tg.Progress().State; st != StateWaiting {
		t.Fatalf("state after a failed read: %q, want %q", st, StateWaiting)
	}
	if err := tg.putBatch(context.Background(), batch(0, readAhead), nil); err != nil {
		t.Fatal(err)
	}
	if st := tg.Progress().State; st != StateWaiting {
		t.Fatalf("state after a batch read before the failure: %q, want %q", st, StateWaiting)
	}
	fs.fail.Store(false)
	if err := tg.putBatch(context.Background(), batch(1, time.Now()), nil); err != nil {
		t.Fatal(err)
	}
	if st := tg.Progress().State; st == StateWaiting {
		t.Fatalf("state after a batch read once the repository answers: %q", st)
	}
}

// TestZeroRunBatch: a batch of zero chunks without data (how the
// background restore gets a run of them) makes its chunks the target's
// own and zeros in the file (punched where the target does not read
// zeros already), and a live restore of an image that is mostly zeros
// ends as the image, over a target that held other bytes.
func TestZeroRunBatch(t *testing.T) {
	const size = 12 << 20
	img := make(memImage, size)
	r := rand.New(rand.NewPCG(27, 28))
	for _, part := range [][2]int{{0, 1 << 20}, {10 << 20, 10<<20 + 4096*5}, {11 << 20, size}} {
		for i := part[0]; i < part[1]; i++ {
			img[i] = byte(r.Uint32())
		}
	}
	ir, id := backUp(t, img)
	stale := bytes.Repeat([]byte{0xff}, size)
	newTarget := func(holes bool) (*Target, *crashFile) {
		fsys := &memFS{files: map[string]*crashFile{}}
		tf, _ := fsys.OpenFile("/t", os.O_RDWR|os.O_CREATE, 0)
		if !holes {
			tf.WriteAt(stale, 0)
		}
		tf.Truncate(size)
		tg, err := Create(fsys, tf, "/t.map", ir, id, Options{Holes: holes})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tg.Close() })
		return tg, tf.(*crashFile)
	}

	// Chunks 3-700 (across bitmap words), as one batch without data.
	for _, holes := range []bool{false, true} {
		tg, tf := newTarget(holes)
		b := backup.StreamBatch{First: 3, Zero: make([]bool, 697), Skip: make([]bool, 697)}
		for j := range b.Zero {
			b.Zero[j] = true
		}
		if err := tg.put(context.Background(), b); err != nil {
			t.Fatal(err)
		}
		for c := int64(0); c < 720; c++ {
			if tg.has(c) != (c >= 3 && c < 700) {
				t.Fatalf("holes %v: chunk %d restored %v", holes, c, tg.has(c))
			}
		}
		if p := tg.Progress(); p.Restored != 697*4096 {
			t.Fatalf("holes %v: %d bytes restored, want %d", holes, p.Restored, 697*4096)
		}
		got := make([]byte, 697*4096)
		if _, err := tf.ReadAt(got, 3*4096); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
			t.Fatalf("holes %v: the batch's chunks do not read zeros in the file (%v)", holes, err)
		}
		if _, err := tf.ReadAt(got[:4096], 2*4096); err != nil || !holes && !bytes.Equal(got[:4096], stale[:4096]) {
			t.Fatalf("holes %v: chunk 2, not in the batch, was written (%v)", holes, err)
		}
	}

	tg, tf := newTarget(false)
	if err := tg.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := tf.ReadAt(got, 0); err != nil || !bytes.Equal(got, img) {
		t.Fatalf("the target is not the image (%v)", err)
	}
}

// streamCounter counts the background restore's Streams.
type streamCounter struct {
	*backup.ImageReader
	streams atomic.Int64
}

func (s *streamCounter) Stream(ctx context.Context, need func(int64) bool, put func(backup.StreamBatch) error) error {
	s.streams.Add(1)
	return s.ImageReader.Stream(ctx, need, put)
}

// TestQuietStart: in its quiet start the background restore reads
// nothing from the repository, while a read of unrestored data is
// served (fetched on demand); it ends with its context. Without a
// quiet start, Run streams at once.
func TestQuietStart(t *testing.T) {
	const size = 4 << 20
	img, ir, id := testImage(t, rand.New(rand.NewPCG(29, 30)), size)
	for _, quiet := range []time.Duration{time.Hour, 0} {
		fsys := &memFS{files: map[string]*crashFile{}}
		tf, _ := fsys.OpenFile("/t", os.O_RDWR|os.O_CREATE, 0)
		tf.Truncate(size)
		src := &streamCounter{ImageReader: ir}
		tg, err := Create(fsys, tf, "/t.map", src, id, Options{QuietStart: quiet})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		ran := make(chan error, 1)
		go func() { ran <- tg.Run(ctx) }()
		got := make([]byte, 4096)
		c := int64(size/4096 - 1)
		if _, err := tg.ReadAt(got, c*4096); err != nil || !bytes.Equal(got, img[c*4096:]) {
			t.Fatalf("quiet start %v: read of chunk %d: %v", quiet, c, err)
		}
		if quiet == 0 {
			<-ran // done: nothing to hold it
		} else {
			cancel()
			if err := <-ran; !errors.Is(err, context.Canceled) {
				t.Fatalf("Run in its quiet start, context canceled: %v", err)
			}
		}
		cancel()
		if n := src.streams.Load(); quiet > 0 && n != 0 || quiet == 0 && n == 0 {
			t.Errorf("quiet start %v: the background restore streamed %d times", quiet, n)
		}
		tg.Close()
	}
}

// TestQuietWait: the quiet start lasts until QuietStart after the last
// read or write, and never past its end; touch only moves it later.
func TestQuietWait(t *testing.T) {
	now := time.Unix(1000, 0)
	if d := quietWait(now, now.Add(time.Second), now.Add(2*time.Second)); d != time.Second {
		t.Errorf("until before the end: wait %v, want 1s", d)
	}
	if d := quietWait(now, now.Add(3*time.Second), now.Add(2*time.Second)); d != 2*time.Second {
		t.Errorf("until after the end: wait %v, want 2s (the end)", d)
	}
	if d := quietWait(now, now.Add(-time.Second), now.Add(2*time.Second)); d > 0 {
		t.Errorf("until passed: wait %v, want none", d)
	}
	tg, _ := newTestTarget(t, 1<<20, nil)
	tg.quiet = time.Hour
	tg.quietOver.Store(false)
	later := time.Now().Add(2 * time.Hour).UnixNano()
	tg.quietUntil.Store(later)
	tg.touch()
	if tg.quietUntil.Load() != later {
		t.Error("a read moved the quiet start's end earlier")
	}
	tg.quietUntil.Store(0)
	tg.touch()
	if tg.quietUntil.Load() <= time.Now().UnixNano() {
		t.Error("a read did not move the quiet start's end later")
	}
}
