package liverestore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"umbra/backup"
	"umbra/cow"
)

// crashFile is an in-memory file that loses writes not yet synced when
// the machine "loses power" (crash): each unsynced sector write survives
// or not at random, in order, as a disk's write cache may keep any of
// them.
type crashFile struct {
	mu      sync.Mutex // guards the fields below
	durable []byte
	cur     []byte
	pending []pendingWrite
	closed  bool
}

type pendingWrite struct {
	off  int64
	data []byte
}

const sector = 512

func (f *crashFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off >= int64(len(f.cur)) {
		return 0, io.EOF
	}
	n := copy(p, f.cur[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *crashFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return 0, os.ErrClosed
	}
	if end := off + int64(len(p)); end > int64(len(f.cur)) {
		f.cur = append(f.cur, make([]byte, end-int64(len(f.cur)))...)
	}
	copy(f.cur[off:], p)
	// Record sector by sector: each may survive a crash on its own.
	for o := off; o < off+int64(len(p)); {
		e := min((o/sector+1)*sector, off+int64(len(p)))
		f.pending = append(f.pending, pendingWrite{o, bytes.Clone(p[o-off : e-off])})
		o = e
	}
	return len(p), nil
}

func (f *crashFile) Punch(off, n int64) error {
	_, err := f.WriteAt(make([]byte, n), off)
	return err
}

func (f *crashFile) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.durable = bytes.Clone(f.cur)
	f.pending = nil
	return nil
}

func (f *crashFile) Truncate(size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if size <= int64(len(f.cur)) {
		f.cur = f.cur[:size]
	} else {
		f.cur = append(f.cur, make([]byte, size-int64(len(f.cur)))...)
	}
	f.pending = append(f.pending, pendingWrite{off: -1 - size}) // a size change
	return nil
}

func (f *crashFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

func (f *crashFile) Size() (int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return int64(len(f.cur)), nil
}

// crash keeps a random subset of the unsynced writes, in order.
func (f *crashFile) crash(r *rand.Rand) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.durable
	for _, w := range f.pending {
		if r.IntN(2) == 0 {
			continue
		}
		if w.off < 0 {
			size := -1 - w.off
			if size <= int64(len(d)) {
				d = d[:size]
			} else {
				d = append(d, make([]byte, size-int64(len(d)))...)
			}
			continue
		}
		if end := w.off + int64(len(w.data)); end > int64(len(d)) {
			d = append(d, make([]byte, end-int64(len(d)))...)
		}
		copy(d[w.off:], w.data)
	}
	f.durable, f.cur, f.pending, f.closed = d, bytes.Clone(d), nil, false
}

// memFS holds crashFiles by name (creates and removes are durable at
// once: the map file is made durable with its directory anyway).
type memFS struct {
	mu    sync.Mutex // guards files
	files map[string]*crashFile
}

func (m *memFS) OpenFile(name string, flag int, perm os.FileMode) (cow.File, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	f, ok := m.files[name]
	switch {
	case ok && flag&os.O_EXCL != 0:
		return nil, fs.ErrExist
	case !ok && flag&os.O_CREATE == 0:
		return nil, fs.ErrNotExist
	case !ok:
		f = &crashFile{}
		m.files[name] = f
	}
	f.mu.Lock()
	f.closed = false
	f.mu.Unlock()
	return f, nil
}

func (m *memFS) Remove(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.files[name]; !ok {
		return fs.ErrNotExist
	}
	delete(m.files, name)
	return nil
}

func (m *memFS) Rename(o, n string) error              { return errors.New("not used") }
func (m *memFS) MkdirAll(string, os.FileMode) error    { return nil }
func (m *memFS) SyncDir(string) error                  { return nil }
func (m *memFS) Stat(name string) (os.FileInfo, error) { return nil, errors.New("not used") }

func (m *memFS) crash(r *rand.Rand) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, f := range m.files {
		f.crash(r)
	}
}

// faultSource is a real image whose repository can be made to fail: a
// stand-in for a repository that is unreachable (the S3 and local
// outages themselves are tested end to end).
type faultSource struct {
	*backup.ImageReader
	fail   atomic.Bool
	failed chan struct{} // gets a value when a Stream fails (buffered 1)
}

var errOutage = errors.New("repository unreachable (test outage)")

func (s *faultSource) Zero(i int64) (bool, error) {
	if s.fail.Load() {
		return false, errOutage
	}
	return s.ImageReader.Zero(i)
}

func (s *faultSource) Cached(i int64) bool {
	return !s.fail.Load() && s.ImageReader.Cached(i)
}

func (s *faultSource) ReadAt(p []byte, off int64) (int, error) {
	if s.fail.Load() {
		return 0, errOutage
	}
	return s.ImageReader.ReadAt(p, off)
}

func (s *faultSource) Stream(ctx context.Context, need func(int64) bool, put func(backup.StreamBatch) error) error {
	if s.fail.Load() {
		select {
		case s.failed <- struct{}{}:
		default:
		}
		return errOutage
	}
	return s.ImageReader.Stream(ctx, need, func(b backup.StreamBatch) error {
		if s.fail.Load() {
			return errOutage
		}
		return put(b)
	})
}

type memImage []byte

func (m memImage) ReadAt(p []byte, off int64) (int, error) { return copy(p, m[off:]), nil }
func (m memImage) Size() int64                             { return int64(len(m)) }

// testImage backs up size bytes with zero, random and repeated chunks
// into a new local repository and opens the image.
func testImage(t *testing.T, r *rand.Rand, size int) (memImage, *backup.ImageReader, string) {
	t.Helper()
	img := make(memImage, size)
	for off := 0; off < size; off += 4096 {
		end := min(off+4096, size)
		switch r.IntN(4) {
		case 0: // zero
		case 1:
			copy(img[off:end], bytes.Repeat([]byte{byte(r.IntN(3) + 1)}, end-off)) // deduplicated
		default:
			for i := off; i < end; i++ {
				img[i] = byte(r.Uint32())
			}
		}
	}
	ir, id := backUp(t, img)
	return img, ir, id
}

// backUp backs img up into a new repository (closed when the test ends)
// and opens the image.
func backUp(t *testing.T, img memImage) (*backup.ImageReader, string) {
	t.Helper()
	repo, err := backup.Init(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(repo.Close)
	x, _, err := repo.Backup(context.Background(), img, backup.Options{Volume: "v"})
	if err != nil {
		t.Fatal(err)
	}
	ir, err := repo.OpenImage(context.Background(), x.ID)
	if err != nil {
		t.Fatal(err)
	}
	return ir, x.ID
}

// model is what the target must read: per sector, the IDs of the
// writes it may hold (0: the image; negative: zeros from a punch): one
// once known, several after a crash until a read tells which survived;
// and for a crash, what it held at the last sync and the writes since.
type model struct {
	img    memImage
	cand   [][]int64
	stable [][]int64
	since  [][]int64
}

func (m *model) content(id int64, s int) []byte {
	lo, hi := s*sector, min((s+1)*sector, len(m.img))
	switch {
	case id == 0:
		return m.img[lo:hi]
	case id < 0:
		return make([]byte, hi-lo)
	}
	b := make([]byte, hi-lo)
	for i := 0; i+16 <= len(b); i += 16 {
		binary.LittleEndian.PutUint64(b[i:], uint64(id))
		binary.LittleEndian.PutUint64(b[i+8:], uint64(s))
	}
	return b
}

// check compares got, read at off, with the model, and narrows each
// sector's candidates to those that match; it says what does not.
func (m *model) check(got []byte, off int64) error {
	n := int64(len(got))
	for s := off / sector; s*sector < off+n; s++ {
		lo := max(off, s*sector)
		hi := min(off+n, (s+1)*sector, int64(len(m.img)))
		var keep []int64
		for _, id := range m.cand[s] {
			c := m.content(id, int(s))
			if bytes.Equal(got[lo-off:hi-off], c[lo-s*sector:hi-s*sector]) {
				keep = append(keep, id)
			}
		}
		if len(keep) == 0 {
			return fmt.Errorf("sector %d (bytes %d-%d) holds none of the writes it may hold %v (0: the image)", s, lo, hi, m.cand[s])
		}
		m.cand[s] = keep
	}
	return nil
}

func (m *model) write(id int64, off, n int64) {
	for s := off / sector; s*sector < off+n; s++ {
		m.cand[s] = []int64{id}
		m.since[s] = append(m.since[s], id)
	}
}

func (m *model) sync() {
	for s := range m.cand {
		m.stable[s] = slices.Clone(m.cand[s])
		m.since[s] = nil
	}
}

func (m *model) crash() {
	for s := range m.cand {
		m.cand[s] = append(slices.Clone(m.stable[s]), m.since[s]...)
		m.stable[s] = slices.Clone(m.cand[s])
		m.since[s] = nil
	}
}

// pattern is write id's data for [off, off+n) (sector-aligned).
func pattern(m *model, id, off, n int64) []byte {
	buf := make([]byte, 0, n)
	for s := off / sector; s*sector < off+n; s++ {
		buf = append(buf, m.content(id, int(s))...)
	}
	return buf[:n]
}

// TestModel drives a Target with random reads, writes, punches, syncs,
// background batches, repository outages and crashes (unsynced data of
// the target and the map dropped at random, then reopened), and checks
// every read against the model: the image plus the writes made, where a
// crash may undo only writes not synced since.
func TestModel(t *testing.T) {
	seeds := []uint64{1, 2, 3, 4, 5, 6}
	if s := os.Getenv("LIVERESTORE_SEED"); s != "" {
		var v uint64
		fmt.Sscan(s, &v)
		seeds = []uint64{v}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runModel(t, seed) })
	}
}

func runModel(t *testing.T, seed uint64) {
	t.Logf("seed %d (LIVERESTORE_SEED=%d reruns it)", seed, seed)
	r := rand.New(rand.NewPCG(seed, 77))
	size := 512*4096 + 1536 // a short last chunk
	img, ir, id := testImage(t, r, size)
	src := &faultSource{ImageReader: ir, failed: make(chan struct{}, 1)}
	fsys := &memFS{files: map[string]*crashFile{}}
	const tpath, mpath = "/target", "/state/target.map"
	tf, _ := fsys.OpenFile(tpath, os.O_RDWR|os.O_CREATE, 0)
	tf.Truncate(int64(size))
	tf.Sync()
	tg, err := Create(fsys, tf, mpath, src, id, Options{Backoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	nsec := (size + sector - 1) / sector
	m := &model{img: img, cand: make([][]int64, nsec), stable: make([][]int64, nsec), since: make([][]int64, nsec)}
	for s := range m.cand {
		m.cand[s], m.stable[s] = []int64{0}, []int64{0}
	}
	ctx := context.Background()
	var nextID int64
	randRange := func(align int64) (int64, int64) {
		off := r.Int64N(int64(size)) / align * align
		n := min(1+r.Int64N(3*4096), int64(size)-off)
		if align > 1 {
			n = max(n/align*align, min(align, int64(size)-off))
		}
		return off, n
	}
	checkRead := func(op int, off, n int64) {
		got := make([]byte, n)
		_, err := tg.ReadAt(got, off)
		if err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("op %d: read %d+%d: %v", op, off, n, err)
		}
		if err := m.check(got, off); err != nil {
			t.Fatalf("op %d: read %d+%d: %v", op, off, n, err)
		}
	}
	for op := 0; op < 400; op++ {
		switch k := r.IntN(20); {
		case k < 6:
			off, n := randRange(1)
			checkRead(op, off, n)
		case k < 10: // write
			off, n := randRange(sector)
			nextID++
			if _, err := tg.WriteAt(pattern(m, nextID, off, n), off); err != nil {
				t.Fatalf("op %d: write %d+%d: %v", op, off, n, err)
			}
			m.write(nextID, off, n)
		case k < 11: // punch
			off, n := randRange(sector)
			nextID++
			if err := tg.Punch(off, n); err != nil {
				t.Fatalf("op %d: punch %d+%d: %v", op, off, n, err)
			}
			m.write(-nextID, off, n)
		case k < 13:
			if err := tg.Sync(); err != nil {
				t.Fatalf("op %d: sync: %v", op, err)
			}
			m.sync()
		case k < 15: // some background batches
			left := 1 + r.IntN(3)
			errStop := errors.New("stop")
			err := src.Stream(ctx, func(i int64) bool { return !tg.has(i) }, func(b backup.StreamBatch) error {
				if left == 0 {
					return errStop
				}
				left--
				// A batch here spans the whole small image: hand over a
				// window of it, as if the restore were that far.
				k := len(b.Zero)
				lo := r.IntN(k)
				hi := lo + 1 + r.IntN(min(k-lo, 8))
				b.Skip = slices.Clone(b.Skip)
				for j := range b.Skip {
					b.Skip[j] = b.Skip[j] || j < lo || j >= hi
				}
				if r.IntN(2) == 0 {
					// A write lands after the batch was read and before
					// it is written: the batch must not undo it.
					off := (b.First+int64(lo))*4096 + r.Int64N(int64(hi-lo)*8)*sector
					n := min(sector*(1+r.Int64N(8)), int64(size)-off)
					nextID++
					if _, err := tg.WriteAt(pattern(m, nextID, off, n), off); err != nil {
						return err
					}
					m.write(nextID, off, n)
				}
				return tg.put(ctx, b)
			})
			if err != nil && !errors.Is(err, errStop) {
				t.Fatalf("op %d: background restore: %v", op, err)
			}
		case k < 16: // an outage: unrestored data fails with EIO, the rest reads
			src.fail.Store(true)
			for range 4 {
				off, n := randRange(1)
				c0, c1 := tg.chunks(off, n)
				got := make([]byte, n)
				_, err := tg.ReadAt(got, off)
				switch {
				case tg.allPresent(c0, c1) && err != nil:
					t.Fatalf("op %d: read of restored data %d+%d in an outage: %v", op, off, n, err)
				case err != nil && !errors.Is(err, syscall.EIO):
					t.Fatalf("op %d: read in an outage: %v, want EIO", op, err)
				case err == nil:
					if err := m.check(got, off); err != nil {
						t.Fatalf("op %d: read %d+%d in an outage: %v", op, off, n, err)
					}
				}
			}
			src.fail.Store(false)
		default: // power loss
			if r.IntN(2) == 0 {
				tg.commit() // sometimes in the middle of a commit's effects
			}
			fsys.crash(r)
			tf, _ = fsys.OpenFile(tpath, os.O_RDWR, 0)
			if tg, err = Open(fsys, tf, mpath, src, id, Options{Backoff: time.Millisecond}); err != nil {
				t.Fatalf("op %d: reopen after a crash: %v", op, err)
			}
			m.crash()
		}
	}
	// The background restore meets an outage, waits, and ends once the
	// repository answers again.
	src.fail.Store(true)
	done := make(chan error, 1)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { done <- tg.Run(runCtx) }()
	if !tg.done.Load() {
		<-src.failed
		if p := tg.Progress(); p.State != StateWaiting || p.Error == "" {
			t.Fatalf("progress in an outage: %+v", p)
		}
	}
	src.fail.Store(false)
	if err := <-done; err != nil {
		t.Fatalf("background restore: %v", err)
	}
	if p := tg.Progress(); p.State != StateDone || p.Restored != int64(size) {
		t.Fatalf("progress at the end: %+v", p)
	}
	if _, ok := fsys.files[mpath]; ok {
		t.Fatal("the map file is left after the restore completed")
	}
	// The file itself, durable, is the image plus the writes.
	checkRead(-1, 0, int64(size))
	fsys.crash(r)
	raw := fsys.files[tpath].cur
	for s := range nsec {
		if got, want := raw[s*sector:min((s+1)*sector, size)], m.content(m.cand[s][0], s); !bytes.Equal(got, want) {
			t.Fatalf("sector %d of the target file after the restore: not the image plus the writes (candidates %v)", s, m.cand[s])
		}
	}
}

// FuzzMapHeader: the map header decoder refuses what it does not read
// and reads back what it wrote.
func FuzzMapHeader(f *testing.F) {
	f.Add(encodeMapHeader(mapHeader{chunk: 4096, size: 1 << 30, image: "v-20261207T000000Z"}))
	f.Add(make([]byte, mapHeaderSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeMapHeader(b)
		if err != nil {
			return
		}
		if again, err := decodeMapHeader(encodeMapHeader(h)); err != nil || again != h {
			t.Fatalf("header %+v does not read back: %+v %v", h, again, err)
		}
	})
}
