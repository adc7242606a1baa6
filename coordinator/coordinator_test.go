package coordinator

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"umbra/cow"
	"umbra/internal/testutil"
	"umbra/provider"
	"umbra/writer"
)

func cowVolumes(t *testing.T, names ...string) (*cow.Provider, *provider.Registry) {
	t.Helper()
	dir := t.TempDir()
	p := cow.NewProvider()
	for _, n := range names {
		origin := filepath.Join(dir, n+".img")
		os.WriteFile(origin, nil, 0o600)
		os.Truncate(origin, 4<<20)
		v, err := cow.Open(n, origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { v.Close() })
		p.Add(v)
	}
	reg := &provider.Registry{}
	reg.Register(p)
	return p, reg
}

// cowVolume opens a COW volume name over a sparse origin of size bytes
// in dir (its diff area in dir/diff), closed when t ends, and a
// provider that serves it.
func cowVolume(t *testing.T, dir, name string, size int64) (*cow.Volume, *cow.Provider) {
	t.Helper()
	origin := filepath.Join(dir, name+".img")
	testutil.SparseFile(t, origin, size)
	v, err := cow.Open(name, origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	p := cow.NewProvider()
	p.Add(v)
	return v, p
}

// recWriter records its phases and can fail or hang in one.
type recWriter struct {
	writer.Base
	name   string
	failIn string
	hangIn string
	mu     sync.Mutex
	phases []string
}

func (w *recWriter) Name() string             { return w.name }
func (w *recWriter) Level() writer.Level      { return writer.LevelApplication }
func (w *recWriter) Involved(writer.Set) bool { return true }
func (w *recWriter) note(ctx context.Context, p string) error {
	w.mu.Lock()
	w.phases = append(w.phases, p)
	w.mu.Unlock()
	if p == w.hangIn {
		<-ctx.Done()
		return ctx.Err()
	}
	if p == w.failIn {
		return fmt.Errorf("%s failed on purpose", p)
	}
	return nil
}
func (w *recWriter) Freeze(ctx context.Context, s writer.Set) error { return w.note(ctx, "freeze") }
func (w *recWriter) Thaw(ctx context.Context, s writer.Set) error   { return w.note(ctx, "thaw") }
func (w *recWriter) Abort(ctx context.Context, s writer.Set) error  { return w.note(ctx, "abort") }
func (w *recWriter) seen(p string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, x := range w.phases {
		if x == p {
			return true
		}
	}
	return false
}

func TestSetCommitsAndThaws(t *testing.T) {
	p, reg := cowVolumes(t, "a", "b")
	ws := writer.NewRegistry()
	w := &recWriter{name: "app"}
	ws.Add(w)
	c := New(reg, ws, nil, nil)
	set, err := c.CreateSet(context.Background(), Request{Volumes: []string{"a", "b"}, Writers: true, ForBackup: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(set.Snapshots) != 2 || !w.seen("freeze") || !w.seen("thaw") {
		t.Fatalf("set %+v, writer phases %v", set, w.phases)
	}
	if err := set.BackupComplete(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b"} {
		v, _ := p.Volume(name)
		if n := len(v.Snapshots()); n != 0 {
			t.Fatalf("auto-release left %d snapshots on %s", n, name)
		}
	}
	if st := ws.States(); st[0].State != "stable" {
		t.Fatalf("writer state after completion: %+v", st[0])
	}
}

// failingProvider fails commit for its one volume.
type failingProvider struct{}

type failingTxn struct{}

func (failingProvider) Name() string                        { return "failing" }
func (failingProvider) Capabilities() provider.Capabilities { return provider.Capabilities{} }
func (failingProvider) Supports(ctx context.Context, vol string) error {
	if vol == "bad" {
		return nil
	}
	return provider.ErrNotFound
}
func (failingProvider) Prepare(context.Context, string, provider.SnapshotOptions) (provider.Txn, error) {
	return failingTxn{}, nil
}
func (failingProvider) Delete(context.Context, string, string) error { return nil }
func (failingProvider) List(context.Context, string) ([]provider.Snapshot, error) {
	return nil, nil
}
func (failingProvider) Open(context.Context, string, string) (provider.Image, error) {
	return nil, provider.ErrNotSupported
}
func (failingProvider) Revert(context.Context, string, string) error { return provider.ErrNotSupported }
func (failingTxn) PreCommit(context.Context, time.Duration) error    { return nil }
func (failingTxn) Commit(context.Context) (provider.Snapshot, error) {
	return provider.Snapshot{}, errors.New("commit failed on purpose")
}
func (failingTxn) PostCommit(context.Context) error { return nil }
func (failingTxn) Abort(context.Context) error      { return nil }

func TestProviderFailureAborts(t *testing.T) {
	p, reg := cowVolumes(t, "a")
	reg.Register(failingProvider{})
	ws := writer.NewRegistry()
	w := &recWriter{name: "app"}
	ws.Add(w)
	c := New(reg, ws, nil, nil)
	_, err := c.CreateSet(context.Background(), Request{Volumes: []string{"a", "bad"}, Writers: true, HoldTimeout: 10 * time.Minute})
	if !errors.Is(err, ErrAborted) {
		t.Fatalf("set with a failing commit: %v", err)
	}
	v, _ := p.Volume("a")
	if n := len(v.Snapshots()); n != 0 {
		t.Fatalf("abort left %d snapshots on a", n)
	}
	if !w.seen("thaw") || !w.seen("abort") {
		t.Fatalf("writer not thawed and aborted: %v", w.phases)
	}
	// Nothing is held: a write goes through (one still held would wait
	// for the hold's ten-minute limit, and the test would time out).
	if _, err := v.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
}

func TestFreezeTimeoutAborts(t *testing.T) {
	_, reg := cowVolumes(t, "a")
	ws := writer.NewRegistry()
	slow := &recWriter{name: "slow", hangIn: "freeze"}
	ok := &recWriter{name: "ok"}
	ws.Add(slow)
	ws.Add(ok)
	c := New(reg, ws, nil, nil)
	// The hung writer never returns by itself: the set returns at all
	// only because the freeze timeout ends it.
	_, err := c.CreateSet(context.Background(), Request{Volumes: []string{"a"}, Writers: true, FreezeTimeout: 200 * time.Millisecond})
	if !errors.Is(err, ErrFreezeTimeout) {
		t.Fatalf("hung writer: %v, want ErrFreezeTimeout", err)
	}
	if !ok.seen("thaw") {
		t.Fatal("the writer that froze was not thawed")
	}
	for _, s := range ws.States() {
		if s.Name == "slow" && (s.State != "failed" || s.LastPhase != "freeze") {
			t.Fatalf("hung writer's state: %+v", s)
		}
	}
}

// TestSetAtomicity: one goroutine writes sequence numbers round-robin to
// three volumes, each write issued only after the previous one was
// acknowledged. Every snapshot set must hold exactly a prefix of the
// sequence: a write acknowledged on one volume after the hold cannot be
// present while an earlier one on another volume is missing.
func TestSetAtomicity(t *testing.T) {
	p, reg := cowVolumes(t, "v0", "v1", "v2")
	c := New(reg, writer.NewRegistry(), nil, nil)
	var vols [3]*cow.Volume
	for i := range vols {
		vols[i], _ = p.Volume(fmt.Sprintf("v%d", i))
	}
	stop := make(chan struct{})
	var acked atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 8)
		for n := int64(1); ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			binary.LittleEndian.PutUint64(buf, uint64(n))
			if _, err := vols[n%3].WriteAt(buf, (n/3)*8%(4<<20)); err != nil {
				t.Error(err)
				return
			}
			acked.Store(n)
			if n >= 3*(4<<20)/8-3 {
				return
			}
		}
	}()
	for k := 0; k < 10; k++ {
		// Writes go on between sets: each set cuts the sequence elsewhere.
		last := acked.Load()
		testutil.WaitFor(t, "the writer acknowledges another write", func() bool { return acked.Load() > last || doneNow(done) })
		set, err := c.CreateSet(context.Background(), Request{Volumes: []string{"v0", "v1", "v2"}})
		if err != nil {
			t.Fatal(err)
		}
		var present []int64
		maxSeen := int64(0)
		for i, sn := range set.Snapshots {
			img, err := p.Open(context.Background(), fmt.Sprintf("v%d", i), sn.ID)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4<<20)
			img.ReadAt(buf, 0)
			img.Close()
			for off := 0; off < len(buf); off += 8 {
				if n := int64(binary.LittleEndian.Uint64(buf[off:])); n != 0 {
					present = append(present, n)
					maxSeen = max(maxSeen, n)
				}
			}
		}
		if int64(len(present)) != maxSeen {
			t.Fatalf("set %d holds %d writes but the newest is #%d: not one instant", k, len(present), maxSeen)
		}
		set.BackupComplete(context.Background(), true)
		for i, sn := range set.Snapshots {
			p.Delete(context.Background(), fmt.Sprintf("v%d", i), sn.ID)
		}
	}
	close(stop)
	<-done
	if acked.Load() < 10 {
		t.Fatal("the writer made no progress")
	}
}

// doneNow says whether ch is closed.
func doneNow(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// sleepWriter spends a fixed time in freeze, as an application flushing.
type sleepWriter struct {
	recWriter
	d time.Duration
}

func (w *sleepWriter) Freeze(ctx context.Context, s writer.Set) error {
	time.Sleep(w.d)
	return nil
}

// BenchmarkSetWindows: sets of 4 volumes with 3 writers while a writer
// goroutine writes to every volume; reports p50/p99 of the hold window
// and of freeze-to-thaw (minus the writers' own 1 ms freeze work).
func BenchmarkSetWindows(b *testing.B) {
	// On tmpfs: this measures the sequence, not the disk's fsync.
	dir, err := os.MkdirTemp("/dev/shm", "umbra-bench-")
	if err != nil {
		dir = b.TempDir()
	}
	defer os.RemoveAll(dir)
	p := cow.NewProvider()
	var vols []*cow.Volume
	for i := 0; i < 4; i++ {
		origin := filepath.Join(dir, fmt.Sprintf("v%d.img", i))
		os.WriteFile(origin, nil, 0o600)
		os.Truncate(origin, 64<<20)
		v, err := cow.Open(fmt.Sprintf("v%d", i), origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
		if err != nil {
			b.Fatal(err)
		}
		defer v.Close()
		p.Add(v)
		vols = append(vols, v)
	}
	reg := &provider.Registry{}
	reg.Register(p)
	ws := writer.NewRegistry()
	for i := 0; i < 3; i++ {
		ws.Add(&sleepWriter{recWriter: recWriter{name: fmt.Sprintf("w%d", i)}, d: time.Millisecond})
	}
	c := New(reg, ws, nil, nil)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for n := 0; ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			vols[n%4].WriteAt(buf, int64(n%16384)*4096)
		}
	}()
	var hold, ftt []time.Duration
	for i := 0; i < b.N; i++ {
		for j := 0; j < 100; j++ {
			set, err := c.CreateSet(context.Background(), Request{Volumes: []string{"v0", "v1", "v2", "v3"}, Writers: true, ForBackup: true})
			if err != nil {
				b.Fatal(err)
			}
			hold = append(hold, set.Timings.Hold)
			ftt = append(ftt, set.Timings.FreezeToThaw-time.Millisecond)
			set.BackupComplete(context.Background(), true)
		}
	}
	close(stop)
	<-done
	pct := func(d []time.Duration, q int) float64 {
		s := append([]time.Duration(nil), d...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return float64(s[len(s)*q/100].Microseconds())
	}
	b.ReportMetric(pct(hold, 50), "hold-p50-µs")
	b.ReportMetric(pct(hold, 99), "hold-p99-µs")
	b.ReportMetric(pct(ftt, 50), "freeze-thaw-p50-µs")
	b.ReportMetric(pct(ftt, 99), "freeze-thaw-p99-µs")
}

// TestRequesterGoneAborts: a requester that goes away (its context ends)
// in the middle of freeze aborts the set; the writer is thawed.
func TestRequesterGoneAborts(t *testing.T) {
	p, reg := cowVolumes(t, "a")
	ws := writer.NewRegistry()
	slow := &recWriter{name: "slow", hangIn: "freeze"}
	ws.Add(slow)
	c := New(reg, ws, nil, nil)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err := c.CreateSet(ctx, Request{Volumes: []string{"a"}, Writers: true})
	if !errors.Is(err, ErrAborted) || !errors.Is(err, context.Canceled) {
		t.Fatalf("requester gone: %v", err)
	}
	if !slow.seen("thaw") || !slow.seen("abort") {
		t.Fatalf("writer phases %v", slow.phases)
	}
	v, _ := p.Volume("a")
	if len(v.Snapshots()) != 0 {
		t.Fatal("snapshots left")
	}
}

// flushFirstProvider's transactions flush for 80 ms in PreCommit before
// they hold writes, as the COW engine's does (much faster), and take
// 80 ms to return from PostCommit after they let writes go, as a
// coordinator preempted after a release would.
type flushFirstProvider struct {
	failingProvider
	txn *flushFirstTxn // the last one prepared
}

type flushFirstTxn struct {
	failingTxn
	held, until time.Time
}

func (p *flushFirstProvider) Prepare(context.Context, string, provider.SnapshotOptions) (provider.Txn, error) {
	p.txn = &flushFirstTxn{}
	return p.txn, nil
}
func (t *flushFirstTxn) PreCommit(context.Context, time.Duration) error {
	time.Sleep(80 * time.Millisecond)
	t.held = time.Now()
	return nil
}
func (t *flushFirstTxn) HeldSince() time.Time { return t.held }
func (t *flushFirstTxn) HeldUntil() time.Time { return t.until }
func (t *flushFirstTxn) PostCommit(context.Context) error {
	t.until = time.Now()
	time.Sleep(80 * time.Millisecond)
	return nil
}
func (t *flushFirstTxn) Commit(context.Context) (provider.Snapshot, error) {
	return provider.Snapshot{Volume: "bad", ID: "s"}, nil
}

// TestHoldWindowExcludesFlush: a set's hold window is the time writes
// were held — from the moment the first member blocked them until the
// last let them go — not the flush a provider runs while writes still
// flow, nor the time after the release (provider.HoldTimer).
func TestHoldWindowExcludesFlush(t *testing.T) {
	_, reg := cowVolumes(t, "a")
	p := &flushFirstProvider{}
	reg.Register(p)
	c := New(reg, writer.NewRegistry(), nil, nil)
	set, err := c.CreateSet(context.Background(), Request{Volumes: []string{"bad"}})
	if err != nil {
		t.Fatal(err)
	}
	if h, want := set.Timings.Hold, p.txn.until.Sub(p.txn.held); h != want {
		t.Fatalf("hold window %v: want the held time only (%v), not the 80 ms flush before it or the 80 ms after the release", h, want)
	}
}
