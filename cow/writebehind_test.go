package cow

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"umbra/internal/testutil"
	"umbra/provider"
)

func (f *faultFS) setWriteErr(fn func(string) error) {
	f.mu.Lock()
	f.writeErr = fn
	f.mu.Unlock()
}

// failTimes fails the first n writes to paths containing substr with err.
func failTimes(substr string, n int, err error) func(string) error {
	return func(p string) error {
		if strings.Contains(p, substr) && n > 0 {
			n--
			return err
		}
		return nil
	}
}

// TestWriteBehindFailure: a diff-area write that fails after the origin
// write returned is dealt with as a synchronous one would be — moved to
// a new slot, or the policy applies — and the snapshots that remain read
// the preserved bytes.
func TestWriteBehindFailure(t *testing.T) {
	cases := []struct {
		name   string
		policy Policy
		inject func(string) error
		// what the listing shows afterwards: snapshot IDs and validity
		want string
	}{
		{"one ENOSPC, written again", PolicyDeleteOldest, failTimes("store", 1, syscall.ENOSPC), "s0:true s1:true"},
		{"one EIO, written again", PolicyInvalidate, failTimes("store", 1, syscall.EIO), "s0:true s1:true"},
		{"full filesystem, delete-oldest", PolicyDeleteOldest, failOn("store", syscall.ENOSPC), ""},
		{"full filesystem, invalidate", PolicyInvalidate, failOn("store", syscall.ENOSPC), "s0:true s1:false"},
		{"lasting EIO", PolicyDeleteOldest, failOn("store", syscall.EIO), "s0:true s1:false"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			ffs, v := faultVolume(t, tc.policy)
			orig := fill(t, v, 5)
			if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s0"}); err != nil {
				t.Fatal(err)
			}
			mustWrite(t, v, bytes.Repeat([]byte{7}, 4096), 0) // s0 keeps its own chunk 0
			if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s1"}); err != nil {
				t.Fatal(err)
			}
			v.Snapshots() // settles s0's copy
			ffs.setWriteErr(tc.inject)
			mustWrite(t, v, bytes.Repeat([]byte{9}, 4096), 0) // s1 needs chunk 0 (the 7s)
			list := v.Snapshots()
			ffs.setWriteErr(nil)
			var got []string
			for _, s := range list {
				got = append(got, fmt.Sprintf("%s:%v", s.ID, s.Valid))
				if !s.Valid && !strings.Contains(s.Reason, "/d") {
					t.Errorf("reason %q does not name the diff area", s.Reason)
				}
			}
			if strings.Join(got, " ") != tc.want {
				t.Fatalf("listing %q, want %q (%+v)", strings.Join(got, " "), tc.want, list)
			}
			after := append([]byte(nil), orig...)
			copy(after, bytes.Repeat([]byte{7}, 4096))
			for _, s := range list {
				if !s.Valid {
					continue
				}
				want := after
				if s.ID == "s0" {
					want = orig
				}
				h, _ := v.OpenSnapshot(s.ID)
				if got := readAll(t, h, v.Size()); !bytes.Equal(got, want) {
					t.Fatalf("%s reads wrong bytes after the failure", s.ID)
				}
			}
			// No slot leaks: what the allocator counts is what entries hold.
			v.mu.RLock()
			held := int64(0)
			v.entries.Ascend(func(e entry) bool {
				if e.slot != zeroSlot {
					held++
				}
				return true
			})
			used := v.store.used()
			v.mu.RUnlock()
			if used != held {
				t.Fatalf("diff area: %d slots used, %d held by entries", used, held)
			}
		})
	}
}

// TestWriteBehindConcurrent: writers, snapshot creation and deletion, and
// snapshot readers at once. Each snapshot must read, every time, what the
// volume held when it was committed (captured inside a hold), while its
// copies go through the write-behind and slots are freed and reused.
func TestWriteBehindConcurrent(t *testing.T) {
	oldBatch := wbBatchBytes
	wbBatchBytes = 8 << 10 // many batches, many frees racing flushes
	defer func() { wbBatchBytes = oldBatch }()
	dir := t.TempDir()
	origin := filepath.Join(dir, "o")
	const size = 1 << 20
	if err := os.WriteFile(origin, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	v, err := Open("v", origin, Options{StorageDir: filepath.Join(dir, "d")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	ctx := context.Background()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer func() { close(stop); wg.Wait() }() // before Close
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			p := make([]byte, 16<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				n := 1 + r.IntN(len(p))
				for i := range p[:n] {
					p[i] = byte(r.Uint32())
				}
				if _, err := v.WriteAt(p[:n], r.Int64N(size-int64(n))); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	type shot struct {
		id   string
		want []byte
	}
	var live []shot
	r := rand.New(rand.NewPCG(9, 9))
	for i := range 60 {
		h, err := v.Hold(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, size)
		if _, err := v.ReadAt(want, 0); err != nil {
			t.Fatal(err)
		}
		s, err := h.CreateSnapshot(ctx, provider.SnapshotOptions{ID: fmt.Sprint("s", i)})
		h.Release()
		if err != nil {
			t.Fatal(err)
		}
		live = append(live, shot{s.ID, want})
		for _, sh := range live {
			sn, err := v.OpenSnapshot(sh.id)
			if err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, sn, size); !bytes.Equal(got, sh.want) {
				t.Fatalf("snapshot %s (%d of %d live) reads bytes it did not hold at commit, first at %d", sh.id, len(live), i+1, firstDiff(got, sh.want))
			}
		}
		if len(live) > 4 {
			k := r.IntN(len(live))
			if err := v.DeleteSnapshot(live[k].id); err != nil {
				t.Fatal(err)
			}
			live = append(live[:k], live[k+1:]...)
		}
	}
}

// TestTryWriteAt: it writes (preserving what snapshots need) unless the
// write would wait for a hold or for a chunk another writer or reader
// holds; then it writes nothing.
func TestTryWriteAt(t *testing.T) {
	ctx := context.Background()
	_, v := faultVolume(t, "")
	orig := fill(t, v, 3)
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0xee}, 4096)
	if n, ok, err := v.TryWriteAt(p, 4096); !ok || err != nil || n != 4096 {
		t.Fatalf("uncontended: n %d ok %v err %v", n, ok, err)
	}
	h, _ := v.OpenSnapshot("s")
	if got := readAll(t, h, v.Size()); !bytes.Equal(got, orig) {
		t.Fatal("the snapshot lost the original of a TryWriteAt")
	}
	v.stripes[2%numStripes].RLock() // a snapshot reader on chunk 2
	if _, ok, _ := v.TryWriteAt(p, 2*4096); ok {
		t.Fatal("wrote through a reader's stripe lock")
	}
	if _, ok, _ := v.TryWriteAt(p, 3*4096); !ok {
		t.Fatal("refused a chunk nobody holds")
	}
	v.stripes[2%numStripes].RUnlock()
	hold, err := v.Hold(ctx, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := v.TryWriteAt(p, 5*4096); ok {
		t.Fatal("wrote during a hold")
	}
	hold.Release()
	got := make([]byte, 4096)
	v.ReadAt(got, 5*4096)
	if !bytes.Equal(got, orig[5*4096:6*4096]) {
		t.Fatal("a refused TryWriteAt changed the volume")
	}
	if _, ok, err := v.TryWriteAt(p, v.Size()); !ok || err == nil {
		t.Fatalf("out of range: ok %v err %v, want a range error", ok, err)
	}
}

// TestTryWriteAtPersistent: a first write under a persistent snapshot
// costs fsyncs before it may go on, so TryWriteAt (and TryWriteFrom)
// refuse it and write nothing; the server then hands it to a goroutine,
// where concurrent first writes share their fsyncs. A rewrite, and a
// first write under a non-persistent snapshot, are still taken.
func TestTryWriteAtPersistent(t *testing.T) {
	ctx := context.Background()
	_, v := faultVolume(t, "")
	orig := fill(t, v, 3)
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s", Persistent: true}); err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0xee}, 4096)
	if _, ok, err := v.TryWriteAt(p, 4096); ok || err != nil {
		t.Fatalf("first write under a persistent snapshot: ok %v err %v, want refused", ok, err)
	}
	if ok, err := v.TryWriteFrom(4096, 4096, func(*os.File, int64) error {
		t.Error("TryWriteFrom filled a first write under a persistent snapshot")
		return nil
	}); ok || err != nil {
		t.Fatalf("TryWriteFrom, first write under a persistent snapshot: ok %v err %v, want refused", ok, err)
	}
	got := make([]byte, 4096)
	v.ReadAt(got, 4096)
	if !bytes.Equal(got, orig[4096:2*4096]) {
		t.Fatal("a refused TryWriteAt changed the volume")
	}
	// Refused writes left nothing held: WriteAt takes the same chunk.
	if _, err := v.WriteAt(p, 4096); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := v.TryWriteAt(p, 4096); !ok || err != nil {
		t.Fatalf("rewrite under a persistent snapshot: ok %v err %v, want taken", ok, err)
	}
	h, _ := v.OpenSnapshot("s")
	if got := readAll(t, h, v.Size()); !bytes.Equal(got, orig) {
		t.Fatal("the snapshot lost an original")
	}
	h.Close()
	if err := v.DeleteSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "n"}); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := v.TryWriteAt(p, 2*4096); !ok || err != nil {
		t.Fatalf("first write under a non-persistent snapshot: ok %v err %v, want taken", ok, err)
	}
}

// gatedFile is a File whose writes wait until the test opens its gate,
// counting the writes that have started.
type gatedFile struct {
	File
	started chan struct{}
	open    chan struct{}
}

func (f *gatedFile) WriteAt(p []byte, off int64) (int, error) {
	f.started <- struct{}{}
	<-f.open
	return f.File.WriteAt(p, off)
}

// TestWriteBehindQueue: while the diff area stalls on one batch, wbQueue
// filled batches wait behind it and puts do not block; their slots read
// from memory, a cancelled one is never written, and once the stall ends
// everything else lands in order.
func TestWriteBehindQueue(t *testing.T) {
	of := tempStore(t)
	f := &gatedFile{File: of, started: make(chan struct{}, 100), open: make(chan struct{})}
	const chunk = 4096
	w := newWriteBehind(f, chunk)
	defer w.stop()
	release := sync.OnceFunc(func() { close(f.open) })
	defer release() // before stop, which waits for the write in flight
	perBatch := int64(wbBatchBytes) / chunk
	chunkOf := func(slot int64) []byte { return bytes.Repeat([]byte{byte(slot%250 + 1)}, chunk) }
	// The first batch goes to the file and stalls there; wbQueue more
	// fill up behind it without any put waiting.
	n := (1 + int64(wbQueue)) * perBatch
	done := make(chan struct{})
	go func() {
		for slot := range n {
			w.put(slot, uint64(slot), chunkOf(slot))
		}
		close(done)
	}()
	<-f.started
	testutil.Receive(t, done, fmt.Sprintf("puts with %d batches queued behind a stalled write (do they block?)", wbQueue))
	// One more batch's worth must wait: the queue is full.
	blocked := make(chan struct{})
	go func() {
		for slot := n; slot < n+perBatch+1; slot++ {
			w.put(slot, uint64(slot), chunkOf(slot))
		}
		close(blocked)
	}()
	// The put is seen waiting for room, not guessed to be.
	for deadline := time.Now().Add(testutil.HangGuard); w.roomWaiters() != 1; time.Sleep(time.Millisecond) {
		select {
		case <-blocked:
			t.Fatal("puts went on with the queue full")
		default:
		}
		if time.Now().After(deadline) {
			testutil.Hung(t, "a put waits for room in a full queue")
		}
	}
	last := n - 1 // in the last queued batch
	got := make([]byte, chunk)
	if !w.read(last, got, 0) || !bytes.Equal(got, chunkOf(last)) {
		t.Fatal("a slot in a queued batch does not read from memory")
	}
	w.cancel([]int64{last})
	if w.read(last, got, 0) {
		t.Fatal("a cancelled slot still reads as pending")
	}
	release() // the stall ends
	<-blocked
	w.drain()
	b := make([]byte, chunk)
	for slot := range n + perBatch + 1 {
		of.ReadAt(b, slot*chunk)
		want := chunkOf(slot)
		if slot == last {
			want = make([]byte, chunk)
		}
		if !bytes.Equal(b, want) {
			t.Fatalf("slot %d holds the wrong bytes after the queue drained", slot)
		}
	}
}

// TestWriteBehindSpace: a batch with room handed out (a writer reading
// an original straight into it) is not written until the room is given
// back, whatever asks for a flush meanwhile: a chunk added to the room
// after the flush would never reach the file, and the recycled buffer
// would be reused under the writer.
func TestWriteBehindSpace(t *testing.T) {
	f := tempStore(t)
	const chunk = 4096
	w := newWriteBehind(f, chunk)
	defer w.stop()
	chunkOf := func(slot int64) []byte { return bytes.Repeat([]byte{byte(slot + 1)}, chunk) }
	w.put(0, 0, chunkOf(0)) // the batch has an item: a flush would write it
	sp := w.reserve(2 * chunk)
	flushed := make(chan struct{})
	go func() { w.flushSoon(); w.drain(); close(flushed) }()
	// drain does not wait for room out: its holder may wait for a lock
	// the drainer holds (the volume empties its store under its lock).
	testutil.Receive(t, flushed, "drain with room out in the batch (does it wait for the room?)")
	w.flusherLooked(t) // and did not take the batch
	copy(sp.buf, chunkOf(1))
	copy(sp.buf[chunk:], chunkOf(2))
	w.add(sp, 0, chunk, 1, 1)
	got := make([]byte, chunk)
	if !w.read(1, got, 0) || !bytes.Equal(got, chunkOf(1)) {
		t.Fatal("a chunk added to room in a batch does not read from memory")
	}
	w.release(sp) // slot 2's room stays unused
	w.drain()
	if n := w.items.Load(); n != 0 {
		t.Fatalf("%d items still pending after drain", n)
	}
	for slot := range int64(3) {
		clear(got)
		f.ReadAt(got, slot*chunk) // past the end for slot 2: zeros
		want := chunkOf(slot)
		if slot == 2 {
			want = make([]byte, chunk) // room given back unused is not written
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("slot %d holds the wrong bytes after the batch was written", slot)
		}
	}

	// The same when other writers fill the batch and queue it meanwhile.
	sp = w.reserve(chunk)
	perBatch := int64(wbBatchBytes) / chunk
	for slot := int64(4); slot < 4+perBatch; slot++ {
		w.put(slot, uint64(slot), chunkOf(slot))
	}
	w.flusherLooked(t) // and did not write the queued batch
	copy(sp.buf, chunkOf(3))
	w.add(sp, 0, chunk, 3, 3)
	w.release(sp)
	w.drain()
	for slot := int64(3); slot < 4+perBatch; slot++ {
		clear(got)
		f.ReadAt(got, slot*chunk)
		if !bytes.Equal(got, chunkOf(slot)) {
			t.Fatalf("slot %d holds the wrong bytes after its queued batch was written", slot)
		}
	}
}

// hookFS runs before(name) ahead of every write, outside the fault
// file system's lock, so the hook may call into the volume; a non-nil
// error fails the write instead.
type hookFS struct {
	FS
	before func(name string) error
}

type hookFile struct {
	File
	name string
	fs   *hookFS
}

func (h *hookFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	f, err := h.FS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &hookFile{File: f, name: name, fs: h}, nil
}

func (f *hookFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.fs.before(f.name); err != nil {
		return 0, &os.PathError{Op: "write", Path: f.name, Err: err}
	}
	return f.File.WriteAt(p, off)
}

// TestResettleRacesDelete: a failed write-behind copy is being written
// to a new slot when its snapshot is deleted (freeing the old slot), and
// that write fails too. The copy must be given up without touching the
// old slot again: it had freed that slot a second time, and the
// allocator then handed one slot to two chunks (a snapshot read another
// chunk's bytes; found by TestConcurrentSnapshotReads, store-eio).
func TestResettleRacesDelete(t *testing.T) {
	ffs := newFaultFS()
	ffs.Put("/o", make([]byte, 16*4096))
	var v *Volume
	var writes atomic.Int32
	hfs := &hookFS{FS: ffs, before: func(name string) error {
		if !strings.Contains(name, "store") {
			return nil
		}
		switch writes.Add(1) {
		case 1: // the write-behind's batch
			return syscall.EIO
		case 2: // the copy moving to a new slot, v.mu not held
			if err := v.DeleteSnapshot("s0"); err != nil {
				t.Error(err)
			}
			return syscall.EIO
		}
		return nil
	}}
	v, err := Open("v", "/o", Options{StorageDir: "/d", FS: hfs, Policy: PolicyInvalidate})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	fill(t, v, 5)
	ctx := context.Background()
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s0"}); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, v, bytes.Repeat([]byte{7}, 4096), 0) // preserved through the write-behind
	if list := v.Snapshots(); len(list) != 0 {        // settles: both writes fail
		t.Fatalf("snapshots %+v, want none (s0 was deleted)", list)
	}
	if n := writes.Load(); n < 2 {
		t.Fatalf("%d diff-area writes, want the batch and the move", n)
	}
	v.mu.RLock()
	used, free := v.store.used(), slices.Clone(v.store.free)
	v.mu.RUnlock()
	if used != 0 {
		t.Fatalf("diff area: %d slots used with no snapshot (free list %v)", used, free)
	}
	// Two chunks preserved now get two slots and read back their own.
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s1"}); err != nil {
		t.Fatal(err)
	}
	h, err := v.OpenSnapshot("s1")
	if err != nil {
		t.Fatal(err)
	}
	before := readAll(t, h, v.Size())
	mustWrite(t, v, bytes.Repeat([]byte{8}, 2*4096), 4096)
	v.Snapshots()
	if got := readAll(t, h, v.Size()); !bytes.Equal(got, before) {
		t.Fatal("s1 reads other bytes than at commit")
	}
}

// TestDrainWakesOnReserve: drain sleeps while a batch is writable; a
// writer taking room in that batch makes it unwritable, and drain must
// notice at once. Had it slept on, the flusher (busy elsewhere at the
// time, here in its failure callback) would find the batch held and
// sleep too, and the writer, waiting for the lock drain's caller holds
// (the volume empties its store under Volume.mu), never hand the room
// back: a deadlock found by TestConcurrentSnapshotReads.
func TestDrainWakesOnReserve(t *testing.T) {
	of := tempStore(t)
	// No flush timer: its wakeup would hide a missing one.
	oldDelay := wbDelay
	defer func() { wbDelay = oldDelay }()
	wbDelay = time.Hour
	const chunk = 4096
	failing := true
	f := &hookFile{File: of, name: "store", fs: &hookFS{before: func(string) error {
		if failing {
			failing = false
			return syscall.EIO
		}
		return nil
	}}}
	w := newWriteBehind(f, chunk)
	defer w.stop()
	inFail, unblock := make(chan struct{}), make(chan struct{})
	w.onFail = func() { inFail <- struct{}{}; <-unblock }
	release := sync.OnceFunc(func() { close(unblock) })
	defer release()
	data := bytes.Repeat([]byte{1}, chunk)
	w.put(0, 0, data)
	w.flushSoon()
	<-inFail // the flusher is in its callback, not waiting
	w.put(1, 1, data)
	drained := make(chan struct{})
	go func() { w.drain(); close(drained) }()
	for { // until drain sleeps on slot 1's batch
		w.mu.Lock()
		n := w.draining
		w.mu.Unlock()
		if n == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	sp := w.reserve(chunk)
	drainedTimer := time.NewTimer(testutil.HangGuard)
	defer drainedTimer.Stop()
	select {
	case <-drained:
	case <-drainedTimer.C:
		w.release(sp)
		release()
		<-drained
		testutil.Hung(t, "drain returns after a writer took room in the batch it waited for")
	}
	w.release(sp)
	release()
	w.drain()
	got := make([]byte, chunk)
	if _, err := of.ReadAt(got, chunk); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("slot 1 not written after the drain (%v)", err)
	}
}

// tempStore opens a new diff-area file in a temporary directory, closed
// when the test ends.
func tempStore(t *testing.T) File {
	t.Helper()
	f, err := OSFS{}.OpenFile(filepath.Join(t.TempDir(), "store"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// roomWaiters (for tests) is how many reserve calls wait for room.
func (w *writeBehind) roomWaiters() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.roomWait
}

// flusherLooked (for tests) wakes the flusher and waits until it has
// looked at the batches as they are now and found nothing to take:
// whatever it would wrongly take, it has had its chance.
func (w *writeBehind) flusherLooked(t *testing.T) {
	t.Helper()
	w.mu.Lock()
	n := w.idleRuns
	w.cond.Broadcast()
	w.mu.Unlock()
	testutil.WaitFor(t, "the flusher looks at the batches again", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.idleRuns > n
	})
}

// put (for tests) queues chunk c's preserved bytes for slot. It waits only while
// the filling batch is full and wbQueue filled ones wait for the flusher.
func (w *writeBehind) put(slot int64, c uint64, data []byte) {
	sp := w.reserve(int64(len(data)))
	copy(sp.buf, data)
	w.add(sp, 0, len(data), slot, c)
	w.release(sp)
}
