package cow

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"umbra/internal/testutil"
	"umbra/internal/zero"
	"umbra/provider"
)

// newTestVolume makes a sparse origin of size bytes and opens it.
func newTestVolume(t *testing.T, size int64, opts Options) (*Volume, string) {
	t.Helper()
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	if err := os.WriteFile(origin, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(origin, size); err != nil {
		t.Fatal(err)
	}
	if opts.StorageDir == "" {
		opts.StorageDir = filepath.Join(dir, "diff")
	}
	v, err := Open("vol0", origin, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v, origin
}

func mustWrite(t *testing.T, w interface {
	WriteAt([]byte, int64) (int, error)
}, b []byte, off int64) {
	t.Helper()
	if _, err := w.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func readAll(t *testing.T, r interface {
	ReadAt([]byte, int64) (int, error)
}, size int64) []byte {
	t.Helper()
	b := make([]byte, size)
	if _, err := r.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSnapshotChain(t *testing.T) {
	ctx := context.Background()
	const size = 1 << 20
	v, _ := newTestVolume(t, size, Options{ChunkSize: 4096})
	model := make([]byte, size)
	write := func(b byte, off, n int64) {
		p := bytes.Repeat([]byte{b}, int(n))
		mustWrite(t, v, p, off)
		copy(model[off:], p)
	}
	write(1, 0, size)
	var views [][]byte
	var ids []string
	for i := 0; i < 5; i++ {
		s, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, s.ID)
		views = append(views, append([]byte(nil), model...))
		write(byte(10+i), int64(i)*7000+100, 9000)
		write(byte(20+i), 3000, 100)
	}
	check := func() {
		t.Helper()
		for i, id := range ids {
			if id == "" {
				continue
			}
			s, err := v.OpenSnapshot(id)
			if err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, s, size); !bytes.Equal(got, views[i]) {
				t.Fatalf("snapshot %s differs from its commit point", id)
			}
		}
		if got := readAll(t, v, size); !bytes.Equal(got, model) {
			t.Fatal("origin differs from model")
		}
	}
	check()
	if err := v.DeleteSnapshot(ids[2]); err != nil {
		t.Fatal(err)
	}
	ids[2] = ""
	check()
	if err := v.DeleteSnapshot(ids[0]); err != nil {
		t.Fatal(err)
	}
	ids[0] = ""
	check()
	if err := v.Revert(ids[1]); err != nil {
		t.Fatal(err)
	}
	model = append([]byte(nil), views[1]...)
	ids[3], ids[4] = "", ""
	check()
	if _, err := v.OpenSnapshot("nope"); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("open unknown snapshot: %v", err)
	}
}

func TestPersistentReopen(t *testing.T) {
	ctx := context.Background()
	const size = 256 << 10
	dir := t.TempDir()
	origin := filepath.Join(dir, "o.img")
	os.WriteFile(origin, bytes.Repeat([]byte{7}, size), 0o600)
	opts := Options{ChunkSize: 4096, StorageDir: filepath.Join(dir, "diff")}
	v, err := Open("v", origin, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "p1", Persistent: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "n1"}); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, v, bytes.Repeat([]byte{9}, 10000), 5000)
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v, err = Open("v", origin, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if errs := v.RecoveryErrors(); len(errs) > 0 {
		t.Fatal(errs)
	}
	snaps := v.Snapshots()
	if len(snaps) != 1 || snaps[0].ID != "p1" || !snaps[0].Valid {
		t.Fatalf("after reopen: %+v", snaps)
	}
	s, _ := v.OpenSnapshot("p1")
	if got := readAll(t, s, size); !bytes.Equal(got, bytes.Repeat([]byte{7}, size)) {
		t.Fatal("persistent snapshot changed across reopen")
	}
	_, reliable, err := v.Changed("p1", "")
	if err != nil || !reliable {
		t.Fatalf("changed after clean reopen: reliable=%v err=%v", reliable, err)
	}
}

func TestHoldBlocksWritesNotReads(t *testing.T) {
	ctx := context.Background()
	v, _ := newTestVolume(t, 1<<20, Options{})
	mustWrite(t, v, []byte("before"), 0)
	h, err := v.Hold(ctx, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := v.WriteAt([]byte("after!"), 0)
		done <- err
	}()
	// The write is seen waiting at the closed gate, not guessed to be.
	for deadline := time.Now().Add(testutil.HangGuard); v.gate.waiters() != 1; time.Sleep(time.Millisecond) {
		select {
		case err := <-done:
			t.Fatalf("write passed a hold: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			testutil.Hung(t, "the write waits at the hold")
		}
	}
	buf := make([]byte, 6)
	if _, err := v.ReadAt(buf, 0); err != nil || string(buf) != "before" {
		t.Fatalf("read during hold: %q %v", buf, err)
	}
	s, err := h.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "held"})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Release(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	snap, _ := v.OpenSnapshot(s.ID)
	snap.ReadAt(buf, 0)
	if string(buf) != "before" {
		t.Fatalf("snapshot committed in the hold reads %q", buf)
	}
}

func TestHoldExpires(t *testing.T) {
	ctx := context.Background()
	v, _ := newTestVolume(t, 1<<20, Options{})
	// A hold whose flush outlasts its limit is refused (ErrHoldTimeout):
	// on a loaded machine a short limit can be spent before the hold
	// stands, so the limit doubles until one does.
	var h *Hold
	for limit := 50 * time.Millisecond; h == nil; limit *= 2 {
		var err error
		h, err = v.Hold(ctx, limit)
		if err != nil && (!errors.Is(err, provider.ErrHoldTimeout) || limit > time.Minute) {
			t.Fatal(err)
		}
	}
	// Writes resume by themselves once the limit passes.
	if _, err := v.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := h.CreateSnapshot(ctx, provider.SnapshotOptions{}); !errors.Is(err, provider.ErrHoldTimeout) {
		t.Fatalf("commit after expiry: %v, want ErrHoldTimeout", err)
	}
	if err := h.Release(); !errors.Is(err, provider.ErrHoldTimeout) {
		t.Fatalf("release after expiry: %v, want ErrHoldTimeout", err)
	}
	if n := len(v.Snapshots()); n != 0 {
		t.Fatalf("%d snapshots after an expired hold", n)
	}
}

// TestHoldWindowEndsAtRelease: a hold's window is from when writes began
// to wait until they resumed, for one hold and for a set (HoldWindow) —
// not until whoever released it next looks at the clock.
func TestHoldWindowEndsAtRelease(t *testing.T) {
	ctx := context.Background()
	a, _ := newTestVolume(t, 1<<20, Options{})
	b, _ := newTestVolume(t, 1<<20, Options{})
	// The test reads the clock on both sides of each call: a window must
	// lie within what it saw, whatever the scheduler did in between.
	t0 := time.Now()
	ha, err := a.Hold(ctx, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	if _, end := ha.Window(); !end.IsZero() {
		t.Fatalf("a standing hold has an end: %v", end)
	}
	hb, err := b.Hold(ctx, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond) // only so the windows differ
	ra0 := time.Now()
	if err := ha.Release(); err != nil {
		t.Fatal(err)
	}
	ra1 := time.Now()
	time.Sleep(20 * time.Millisecond)
	rb0 := time.Now()
	if err := hb.Release(); err != nil {
		t.Fatal(err)
	}
	rb1 := time.Now()
	// Look later than any window could end: a window that ran until
	// it was looked at would be longer than every bound below.
	for time.Since(rb1) <= rb1.Sub(t0) {
		time.Sleep(time.Millisecond)
	}
	if e := ha.Elapsed(); e < ra0.Sub(t1) || e > ra1.Sub(t0) {
		t.Fatalf("first hold: %v, want between %v and %v (from its Hold call to its Release)", e, ra0.Sub(t1), ra1.Sub(t0))
	}
	if w := HoldWindow([]*Hold{ha, hb}); w < rb0.Sub(t1) || w > rb1.Sub(t0) {
		t.Fatalf("set window %v: want from the first hold to the last release (between %v and %v), not until it was looked at", w, rb0.Sub(t1), rb1.Sub(t0))
	}
}

func TestProviderTxn(t *testing.T) {
	ctx := context.Background()
	v, _ := newTestVolume(t, 1<<20, Options{})
	p := NewProvider()
	if err := p.Add(v); err != nil {
		t.Fatal(err)
	}
	if err := p.Supports(ctx, "missing"); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("supports(missing): %v", err)
	}
	txn, err := p.Prepare(ctx, v.Name(), provider.SnapshotOptions{ID: "t1", Persistent: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := txn.PreCommit(ctx, time.Second); err != nil {
		t.Fatal(err)
	}
	s, err := txn.Commit(ctx)
	if err != nil || s.ID != "t1" || !s.Persistent {
		t.Fatalf("commit: %+v %v", s, err)
	}
	if err := txn.PostCommit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := txn.Abort(ctx); err != nil { // abort after commit deletes it
		t.Fatal(err)
	}
	if list, _ := p.List(ctx, v.Name()); len(list) != 0 {
		t.Fatalf("after abort: %+v", list)
	}
	if _, err := p.Prepare(ctx, v.Name(), provider.SnapshotOptions{ID: "bad id"}); !errors.Is(err, ErrBadID) {
		t.Fatalf("bad id: %v", err)
	}
}

func TestNoStorageRefused(t *testing.T) {
	dir := t.TempDir()
	origin := filepath.Join(dir, "o")
	os.WriteFile(origin, make([]byte, 8192), 0o600)
	v, err := Open("v", origin, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{}); !errors.Is(err, provider.ErrNoStorage) {
		t.Fatalf("snapshot without storage: %v", err)
	}
}

func TestBadOptions(t *testing.T) {
	dir := t.TempDir()
	origin := filepath.Join(dir, "o")
	os.WriteFile(origin, make([]byte, 8192), 0o600)
	for _, o := range []Options{{ChunkSize: 3000}, {ChunkSize: 2 << 20}, {Policy: "drop-all"}, {MaxStorage: -1}} {
		if v, err := Open("v", origin, o); err == nil {
			v.Close()
			t.Errorf("Open accepted %+v", o)
		}
	}
	if _, err := Open("bad/name", origin, Options{}); !errors.Is(err, ErrBadID) {
		t.Errorf("bad name: %v", err)
	}
	if _, err := Open("v", filepath.Join(dir, "missing"), Options{}); err == nil {
		t.Error("missing origin opened")
	}
}

// TestBlockDeviceOrigin: the origin can be a block device (a loop device
// here); its size comes from the device.
func TestBlockDeviceOrigin(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("needs losetup")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "dev.img")
	os.WriteFile(img, bytes.Repeat([]byte{4}, 4<<20), 0o600)
	dev := testutil.Losetup(t, img, false, false)
	v, err := Open("blk", dev, Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if v.Size() != 4<<20 {
		t.Fatalf("block device size %d, want %d", v.Size(), 4<<20)
	}
	// The volume holds the device exclusively: a second volume on it and
	// mkfs (an exclusive opener, as mount is) are refused.
	if _, err := Open("again", dev, Options{StorageDir: filepath.Join(dir, "diff2")}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("a second volume on the device: %v", err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", dev).CombinedOutput(); err == nil {
		t.Fatalf("mkfs.ext4 wrote a device a volume holds: %s", out)
	}
	// /dev is devtmpfs, which statfs calls tmpfs: the device's reads must
	// still not be taken for reads from memory.
	if v.origin.(osFile).nowait.Load() == nowaitMemory {
		t.Fatal("a block device origin is taken for a file in memory")
	}
	s, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{Persistent: true})
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, v, bytes.Repeat([]byte{9}, 8192), 4096)
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	h, _ := v.OpenSnapshot(s.ID)
	if got := readAll(t, h, v.Size()); !bytes.Equal(got, bytes.Repeat([]byte{4}, 4<<20)) {
		t.Fatal("snapshot of a block device reads wrong bytes")
	}
}

// TestMountedDeviceRefused: a block device with a mounted filesystem is
// not opened as a volume (the filesystem's writes would bypass the
// engine), and the error says why.
func TestMountedDeviceRefused(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.ext4", "mount")
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	testutil.SparseFile(t, img, 8<<20)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", img)
	dev := testutil.Losetup(t, img, false, false)
	testutil.Mount(t, dev, dir)
	if _, err := Open("fs", dev, Options{StorageDir: filepath.Join(dir, "diff")}); err == nil || !strings.Contains(err.Error(), "unmount it first") {
		t.Fatalf("open a mounted device as a volume: %v", err)
	}
}

// TestSnapshotAllocation: ranges a snapshot reports as holes or zeros read
// as zeros, and its data is reported as data.
func TestSnapshotAllocation(t *testing.T) {
	ctx := context.Background()
	v, _ := newTestVolume(t, 64<<10, Options{})
	mustWrite(t, v, bytes.Repeat([]byte{1}, 4096), 2*4096)
	mustWrite(t, v, bytes.Repeat([]byte{3}, 4096), 9*4096)
	s, _ := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
	mustWrite(t, v, bytes.Repeat([]byte{2}, 4096), 5*4096) // a hole, preserved as zero
	mustWrite(t, v, bytes.Repeat([]byte{4}, 4096), 2*4096) // data, preserved
	h, _ := v.OpenSnapshot(s.ID)
	ext, err := h.Allocation(0, v.Size())
	if err != nil {
		t.Fatal(err)
	}
	content := readAll(t, h, v.Size())
	pos := int64(0)
	for _, e := range ext {
		if e.Off != pos {
			t.Fatalf("extents not contiguous at %d: %+v", pos, ext)
		}
		if (e.Hole || e.Zero) && !zero.All(content[e.Off:e.Off+e.Len]) {
			t.Fatalf("extent %+v is reported zero but holds data", e)
		}
		pos += e.Len
	}
	if pos != v.Size() {
		t.Fatalf("extents cover %d of %d bytes", pos, v.Size())
	}
	for _, c := range []int64{2, 9} {
		for _, e := range ext {
			if e.Off <= c*4096 && c*4096 < e.Off+e.Len && (e.Hole || e.Zero) {
				t.Fatalf("chunk %d holds data but is reported as %+v", c, e)
			}
		}
	}
}

// TestRevertInUse: Revert refuses with ErrInUse, naming the users, while a
// front-end client has the origin open, and changes nothing; ForceRevert
// reverts anyway; once every user is done (each done func counting once)
// Revert works again.
func TestRevertInUse(t *testing.T) {
	v, _ := newTestVolume(t, 1<<20, Options{})
	mustWrite(t, v, bytes.Repeat([]byte{1}, 4096), 0)
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s1"}); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, v, bytes.Repeat([]byte{2}, 4096), 0)
	nbd1, nbd2, fuse := v.Use("NBD connection"), v.Use("NBD connection"), v.Use("open FUSE file")
	err := v.Revert("s1")
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "1 open FUSE file(s), 2 NBD connection(s)") {
		t.Fatalf("revert in use: %v", err)
	}
	if b := readAll(t, v, 4096); b[0] != 2 {
		t.Fatal("a refused revert changed the origin")
	}
	nbd1()
	nbd1() // a second call counts for nothing
	fuse()
	if got := v.Users(); len(got) != 1 || got[0] != "1 NBD connection(s)" {
		t.Fatalf("users after two of three are done: %v", got)
	}
	if err := v.ForceRevert("s1"); err != nil {
		t.Fatalf("forced revert: %v", err)
	}
	if b := readAll(t, v, 4096); b[0] != 1 {
		t.Fatal("the forced revert did not roll the origin back")
	}
	mustWrite(t, v, bytes.Repeat([]byte{3}, 4096), 0)
	nbd2()
	if err := v.Revert("s1"); err != nil {
		t.Fatalf("revert once free: %v", err)
	}
	if b := readAll(t, v, 4096); b[0] != 1 {
		t.Fatal("the revert did not roll the origin back")
	}
}

// TestChunkLocks: a run of chunks takes the stripes it maps to, wrapping
// past the last stripe, and no other; a try that meets a held stripe
// takes none; unlocking frees every one.
func TestChunkLocks(t *testing.T) {
	v := &Volume{}
	heldExactly := func(want map[int]bool) {
		t.Helper()
		for i := range numStripes {
			free := v.stripes[i].TryLock()
			if free {
				v.stripes[i].Unlock()
			}
			if free == want[i] {
				t.Fatalf("stripe %d held %v, want %v", i, !free, want[i])
			}
		}
	}
	l := v.stripes.lock(numStripes-2, numStripes+1, false) // stripes 1022, 1023, 0, 1
	heldExactly(map[int]bool{numStripes - 2: true, numStripes - 1: true, 0: true, 1: true})
	if _, ok := v.stripes.tryLock(5*numStripes-3, 5*numStripes+4); ok { // 1021..1023, 0..4: meets 1022
		t.Fatal("stripes.tryLock took stripes another holder has")
	}
	heldExactly(map[int]bool{numStripes - 2: true, numStripes - 1: true, 0: true, 1: true})
	l.unlock()
	heldExactly(nil)
	all := v.stripes.lock(7, 7+3*numStripes, true) // more chunks than stripes: all, shared
	if v.stripes[3].TryLock() || !v.stripes[3].TryRLock() {
		t.Fatal("a shared lock of every stripe is not shared")
	}
	v.stripes[3].RUnlock()
	all.unlock()
	heldExactly(nil)
	if l, ok := v.stripes.tryLock(2, 2); !ok || !l.held() {
		t.Fatal("stripes.tryLock failed on free stripes")
	} else {
		l.unlock()
	}
	heldExactly(nil)
}

// TestDeleteSnapshotInUse: deleting a snapshot refuses, naming its users,
// while front-end clients have it open (a reader keeps reading it);
// ForceDeleteSnapshot deletes it anyway and says whom it cut off; a
// revert that would delete a later snapshot in use refuses too; once the
// users are gone a plain delete works. Users of a deleted snapshot do not
// count against a new one with the same id.
func TestDeleteSnapshotInUse(t *testing.T) {
	v, _ := newTestVolume(t, 1<<20, Options{})
	ctx := context.Background()
	mustWrite(t, v, bytes.Repeat([]byte{1}, 4096), 0)
	for _, id := range []string{"s1", "s2"} {
		if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	s2, err := v.OpenSnapshot("s2")
	if err != nil {
		t.Fatal(err)
	}
	loop, nbd := s2.Use("open FUSE file"), s2.Use("NBD connection")
	err = v.DeleteSnapshot("s2")
	if !errors.Is(err, ErrSnapshotInUse) || !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "1 NBD connection(s), 1 open FUSE file(s)") || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("delete in use: %v", err)
	}
	if got := v.SnapshotUsers("s2"); len(got) != 2 {
		t.Fatalf("snapshot users: %v", got)
	}
	if len(v.SnapshotUsers("s1")) != 0 || len(v.Users()) != 0 {
		t.Fatal("users of one snapshot counted for another or for the volume")
	}
	b := make([]byte, 4096)
	if _, err := s2.ReadAt(b, 0); err != nil || b[0] != 1 {
		t.Fatalf("a refused delete cut the reader off: %v", err)
	}
	if err := v.Revert("s1"); !errors.Is(err, ErrSnapshotInUse) || !strings.Contains(err.Error(), "@s2 (1 NBD connection(s), 1 open FUSE file(s))") {
		t.Fatalf("revert deleting a snapshot in use: %v", err)
	}
	if len(v.Snapshots()) != 2 {
		t.Fatal("a refused revert deleted a snapshot")
	}
	loop()
	cut, err := v.ForceDeleteSnapshot("s2")
	if err != nil || strings.Join(cut, ",") != "1 NBD connection(s)" {
		t.Fatalf("forced delete: cut %v, %v", cut, err)
	}
	if _, err := s2.ReadAt(b, 0); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("read of a deleted snapshot: %v", err)
	}
	// The same id again: the old snapshot's user is not its user.
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s2"}); err != nil {
		t.Fatal(err)
	}
	if err := v.DeleteSnapshot("s2"); err != nil {
		t.Fatalf("delete of a new snapshot under an old one's id: %v", err)
	}
	nbd()
	s1, _ := v.OpenSnapshot("s1")
	done := s1.Use("NBD connection")
	done()
	done() // a second call counts for nothing
	if err := v.DeleteSnapshot("s1"); err != nil {
		t.Fatalf("delete once free: %v", err)
	}
}

// A delete that follows the command letting a client go waits for the
// client to leave: WaitSnapshotUnused returns once the last user of the
// snapshot is gone, and names the users left when its context ends first.
func TestWaitSnapshotUnused(t *testing.T) {
	v, _ := newTestVolume(t, 1<<20, Options{})
	ctx := context.Background()
	for _, id := range []string{"s1", "s2"} {
		if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	s2, err := v.OpenSnapshot("s2")
	if err != nil {
		t.Fatal(err)
	}
	loop, nbd := s2.Use("open FUSE file"), s2.Use("NBD connection")
	other := func() func() { s1, _ := v.OpenSnapshot("s1"); return s1.Use("NBD connection") }()
	defer other()
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if got := v.WaitSnapshotUnused(cctx, "s2"); len(got) != 2 {
		t.Fatalf("wait with an ended context: users %v, want both", got)
	}
	done := make(chan []string)
	go func() { done <- v.WaitSnapshotUnused(ctx, "s2") }()
	// Let the users go only once the waiter waits, so that a wait that
	// looked once and returned would be caught.
	for {
		v.usersMu.Lock()
		waiting := v.usersLeft != nil
		v.usersMu.Unlock()
		if waiting {
			break
		}
		runtime.Gosched()
	}
	loop()
	select {
	case got := <-done:
		t.Fatalf("wait returned with the NBD connection still open: %v", got)
	default:
	}
	nbd()
	if got := <-done; len(got) != 0 {
		t.Fatalf("wait returned users %v after they left", got)
	}
	if err := v.DeleteSnapshot("s2"); err != nil {
		t.Fatalf("delete after the users left: %v", err)
	}
	if got := v.WaitSnapshotUnused(ctx, "nosuch"); got != nil {
		t.Fatalf("wait on a missing snapshot: %v", got)
	}
}
