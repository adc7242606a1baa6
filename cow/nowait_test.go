package cow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"umbra/internal/testutil"
	"umbra/provider"
)

// TestTryReadAt: a volume reads without waiting (TryReadAt) and offers
// for sendfile (CachedFile) and as a mapping (MappedRange) what is in the
// page cache, refuses what would come from the disk, and on tmpfs takes
// everything, since nothing there waits for a disk.
func TestTryReadAt(t *testing.T) {
	const size = 1 << 20
	data := bytes.Repeat([]byte("umbra-nowait-"), size/13+1)[:size]
	// evict, when not nil, runs before each of the two probes (while the
	// disk is stalled: the readahead a refused probe starts cannot bring
	// the pages back before the other probe looks).
	var evict func()
	// probeMapped: check MappedRange too. Not where pages are evicted
	// later: a page once mapped is sometimes still held on another CPU's
	// LRU batch when FADV_DONTNEED runs, and stays cached (TestMappedRange
	// covers a file on disk).
	probeMapped := false
	check := func(t *testing.T, v *Volume, off, n int64, wantOK bool) {
		t.Helper()
		p := make([]byte, n)
		if evict != nil {
			evict()
		}
		f, ok := v.CachedFile(off, n)
		if ok != wantOK {
			t.Fatalf("CachedFile [%d,+%d): ok %v, want %v", off, n, ok, wantOK)
		}
		if ok {
			if _, err := f.ReadAt(p, off); err != nil || !bytes.Equal(p, data[off:off+n]) {
				t.Fatalf("CachedFile [%d,+%d): the file does not hold the volume's bytes there (%v)", off, n, err)
			}
		}
		if probeMapped {
			m, release, ok := v.MappedRange(off, n)
			if ok != wantOK {
				t.Fatalf("MappedRange [%d,+%d): ok %v, want %v", off, n, ok, wantOK)
			}
			if ok {
				if !bytes.Equal(m, data[off:off+n]) {
					t.Fatalf("MappedRange [%d,+%d): the mapping does not hold the volume's bytes there", off, n)
				}
				release()
			}
		}
		clear(p)
		if evict != nil {
			evict()
		}
		got, ok, err := v.TryReadAt(p, off)
		if ok && (err != nil || got != int(n) || !bytes.Equal(p, data[off:off+n])) {
			t.Fatalf("TryReadAt [%d,+%d): %d bytes, %v, or wrong bytes", off, n, got, err)
		}
		if ok != wantOK {
			t.Fatalf("TryReadAt [%d,+%d): ok %v, want %v (err %v)", off, n, ok, wantOK, err)
		}
	}

	t.Run("disk", func(t *testing.T) {
		// The origin is on a disk whose reads the test stalls: an
		// evicted page then cannot come back while a probe looks.
		disk := newStallDisk(t)
		origin := filepath.Join(disk.dir, "origin.img")
		if err := os.WriteFile(origin, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(origin, size); err != nil {
			t.Fatal(err)
		}
		v, err := Open("vol0", origin, Options{StorageDir: filepath.Join(t.TempDir(), "diff")})
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		mustWrite(t, v, data, 0)
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
		check(t, v, 8192, 4096, true) // just written: cached
		if v.origin.(osFile).nowait.Load() == nowaitUnsupported {
			t.Skipf("%s: the filesystem refuses RWF_NOWAIT; reads there always go to a goroutine", origin)
		}
		f, err := os.Open(origin)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		defer func() { evict = nil }() // it closes over this subtest's t and f
		evict = func() {
			if err := unix.Fadvise(int(f.Fd()), 0, size, unix.FADV_DONTNEED); err != nil {
				t.Fatal(err)
			}
		}
		disk.stall()
		check(t, v, 8192, 4096, false) // evicted: it would wait
		disk.resume()
		evict = nil
		if _, err := v.ReadAt(make([]byte, 4096), 8192); err != nil {
			t.Fatal(err)
		}
		check(t, v, 8192, 4096, true) // the ordinary read brought it back
		check(t, v, size-4096, 8192, false)
		check(t, v, -1, 4096, false)
	})

	t.Run("tmpfs", func(t *testing.T) {
		dir := memDir(t)
		origin := filepath.Join(dir, "origin.img")
		if err := os.WriteFile(origin, data, 0o600); err != nil {
			t.Fatal(err)
		}
		v, err := Open("vol0", origin, Options{StorageDir: filepath.Join(dir, "diff")})
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		probeMapped = true
		check(t, v, 0, 65536, true)
		check(t, v, size-4096, 4096, true)
		check(t, v, size-4096, 8192, false)
	})
}

// TestTryWriteFrom: bytes a fill function puts into the origin file are
// the volume's new bytes, while a live snapshot keeps the old ones (the
// volume preserves before calling fill, even when fill fails); during a
// hold nothing happens and fill is not called.
func TestTryWriteFrom(t *testing.T) {
	const size = 1 << 20
	v, _ := newTestVolume(t, size, Options{})
	old := bytes.Repeat([]byte{1}, size)
	mustWrite(t, v, old, 0)
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	s, err := v.OpenSnapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	want := slices.Clone(old)
	put := func(off int64, p []byte) func(*os.File, int64) error {
		return func(f *os.File, at int64) error {
			if at != off {
				t.Fatalf("fill at %d, want %d", at, off)
			}
			_, err := f.WriteAt(p, at)
			return err
		}
	}
	p := bytes.Repeat([]byte{2}, 300<<10)
	if ok, err := v.TryWriteFrom(12345, int64(len(p)), put(12345, p)); !ok || err != nil {
		t.Fatalf("TryWriteFrom: ok %v, %v", ok, err)
	}
	copy(want[12345:], p)
	if !bytes.Equal(readAll(t, v, size), want) || !bytes.Equal(readAll(t, s, size), old) {
		t.Fatal("after TryWriteFrom: volume or snapshot holds the wrong bytes")
	}

	// fill fails after writing part: the snapshot still has the old bytes.
	boom := errors.New("boom")
	_, err = v.TryWriteFrom(700<<10, 200<<10, func(f *os.File, at int64) error {
		f.WriteAt(bytes.Repeat([]byte{3}, 4096), at)
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("a failing fill: %v, want it returned", err)
	}
	if !bytes.Equal(readAll(t, s, size), old) {
		t.Fatal("a failing fill changed the snapshot")
	}

	h, err := v.Hold(context.Background(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ok, err := v.TryWriteFrom(0, 4096, func(*os.File, int64) error {
		t.Fatal("fill called during a hold")
		return nil
	})
	h.Release()
	if ok || err != nil {
		t.Fatalf("TryWriteFrom during a hold: ok %v, %v; want false, nil", ok, err)
	}
	if ok, err := v.TryWriteFrom(size-4096, 8192, put(0, nil)); !ok || !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("TryWriteFrom beyond the end: ok %v, %v", ok, err)
	}
}

// TestMappedRange: the mapping MappedRange lends shows writes made
// through the volume after it was made; what it touched stays in the
// process's RSS while that is within mapBudget and stops counting once
// trimEvery bytes were lent past it; Close waits for the loans out to
// come back and unmaps, and later calls lend nothing.
func TestMappedRange(t *testing.T) {
	const size = 1 << 20
	defer func(n, b int64) { trimEvery, mapBudget = n, b }(trimEvery, mapBudget)
	trimEvery, mapBudget = size, math.MaxInt64 // every whole loan looks; none is over
	if r := residentFilePages(); r <= 0 || r == math.MaxInt64 {
		t.Fatalf("resident file pages read as %d", r)
	}
	v, _ := newTestVolume(t, size, Options{})
	mustWrite(t, v, bytes.Repeat([]byte{1}, size), 0)
	m, release, ok := v.MappedRange(0, size)
	if !ok {
		t.Fatal("no mapping of a regular-file origin in the page cache")
	}
	mustWrite(t, v, bytes.Repeat([]byte{2}, 4096), 8192)
	if m[8192] != 2 || m[8191] != 1 {
		t.Fatal("the mapping does not show a write made after it")
	}
	if rss := mappingRSS(t, m); rss == 0 {
		t.Fatal("smaps shows nothing of a mapping just read")
	}
	base := m
	release()
	if rss := mappingRSS(t, base); rss == 0 {
		t.Fatal("the mapping was trimmed with the process within its budget")
	}
	mapBudget = 0
	if m, release, ok = v.MappedRange(0, size); !ok {
		t.Fatal("no loan after the first")
	}
	_ = m[0]
	release()
	if rss := mappingRSS(t, base); rss != 0 {
		t.Fatalf("%d KiB of the mapping still counted in RSS after a loan over budget came back", rss)
	}
	m, release, ok = v.MappedRange(0, size)
	if !ok {
		t.Fatal("no second loan")
	}
	closed := make(chan error, 1)
	go func() { closed <- v.Close() }()
	// Close is seen waiting for the mapping (a writer waits on mapMu:
	// no reader gets in), not guessed to be.
	closing := func() bool {
		if v.mapMu.TryRLock() {
			v.mapMu.RUnlock()
			return false
		}
		return true
	}
	for deadline := time.Now().Add(testutil.HangGuard); !closing(); time.Sleep(time.Millisecond) {
		select {
		case err := <-closed:
			t.Fatalf("Close returned (%v) with a loan of the mapping out", err)
		default:
		}
		if time.Now().After(deadline) {
			testutil.Hung(t, "Close waits for the mapping")
		}
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) with a loan of the mapping out", err)
	default:
	}
	release()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if _, _, ok := v.MappedRange(0, 4096); ok {
		t.Fatal("a closed volume lent its mapping")
	}
}

// mappingRSS is the Rss smaps reports, in KiB, for the mapping that
// starts at m.
func mappingRSS(t *testing.T, m []byte) int {
	t.Helper()
	smaps, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Skipf("no smaps: %v", err)
	}
	start := fmt.Sprintf("%x-", uintptr(unsafe.Pointer(&m[0])))
	in := false
	for _, line := range strings.Split(string(smaps), "\n") {
		if strings.HasPrefix(line, start) {
			in = true
		}
		if in && strings.HasPrefix(line, "Rss:") {
			var kb int
			fmt.Sscanf(strings.TrimPrefix(line, "Rss:"), "%d", &kb)
			return kb
		}
	}
	t.Fatalf("no mapping at %s in smaps", start)
	return 0
}

// TestMappedRangeHoles: a fault on a hole of a shared tmpfs mapping
// allocates the page, so lending a mapping over a sparse range (an NBD
// read of a volume never written) would fill memory with zeros.
// MappedRange lends data only: after the kernel copies every loan, the
// origin holds no more blocks than before — for a file sparse at open,
// and for one dense at open with a range trimmed since.
func TestMappedRangeHoles(t *testing.T) {
	const size = 8 << 20
	d := memDir(t)
	scratch, err := os.Create(filepath.Join(d, "scratch"))
	if err != nil {
		t.Fatal(err)
	}
	defer scratch.Close()
	blocks := func(path string) int64 {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Sys().(*syscall.Stat_t).Blocks
	}
	// lend asks for [off, off+n) and, when lent, has the kernel copy it
	// (a write to a file, as a socket write would).
	lend := func(v *Volume, off, n int64) bool {
		m, release, ok := v.MappedRange(off, n)
		if !ok {
			return false
		}
		defer release()
		if _, err := unix.Pwrite(int(scratch.Fd()), m, 0); err != nil {
			t.Fatalf("copying the loan [%d,+%d): %v", off, n, err)
		}
		return true
	}
	open := func(name string, fill bool) (*Volume, string) {
		origin := filepath.Join(d, name)
		f, err := os.Create(origin)
		if err != nil {
			t.Fatal(err)
		}
		if fill {
			_, err = f.Write(bytes.Repeat([]byte{7}, size))
		} else {
			err = f.Truncate(size)
		}
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		v, err := Open(name, origin, Options{StorageDir: filepath.Join(d, name+".diff")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { v.Close() })
		return v, origin
	}

	v, origin := open("sparse", false)
	mustWrite(t, v, bytes.Repeat([]byte{1}, 1<<20), 1<<20)
	before := blocks(origin)
	if !lend(v, 1<<20, 1<<20) {
		t.Fatal("no loan of a written range of a sparse file in memory")
	}
	lend(v, 0, 4<<20)
	lend(v, 3<<20, 4096)
	if after := blocks(origin); after != before {
		t.Fatalf("lending over holes allocated %d KiB of the origin", (after-before)/2)
	}

	v, origin = open("dense", true)
	if !lend(v, 0, size) {
		t.Fatal("no loan of a dense file in memory")
	}
	if err := v.Trim(2<<20, 2<<20); err != nil {
		t.Fatal(err)
	}
	before = blocks(origin)
	if before*512 != size-(2<<20) {
		t.Fatalf("origin holds %d bytes after the trim, want %d: was it punched?", before*512, size-(2<<20))
	}
	lend(v, 2<<20, 1<<20)
	lend(v, 1<<20, 4<<20)
	if after := blocks(origin); after != before {
		t.Fatalf("lending over a trimmed range allocated %d KiB of the origin", (after-before)/2)
	}
	// Filled in again, the range is lent.
	mustWrite(t, v, bytes.Repeat([]byte{2}, 2<<20), 2<<20)
	if !lend(v, 1<<20, 4<<20) {
		t.Fatal("no loan of a range written again after a trim")
	}
}

// TestTryWriteAtNearStripes: a write preserving a chunk holds that
// chunk's stripe lock, and a first write to another chunk whose stripe
// is free proceeds beside it — among them the chunks 1024, 2048 and 3072
// chunks away, which shared its stripe when there were 1024 (two NBD
// connections' random 4 KiB first writes then met on a stripe a few
// times in 8192, and the later one waited out the other's preservation).
func TestTryWriteAtNearStripes(t *testing.T) {
	dir := t.TempDir()
	origin := filepath.Join(dir, "o")
	const chunks = 4 * 1024
	if err := os.WriteFile(origin, bytes.Repeat([]byte{7}, chunks*4096), 0o644); err != nil {
		t.Fatal(err)
	}
	v, err := Open("v", origin, Options{StorageDir: filepath.Join(dir, "d")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{9}, 4096)
	held := v.stripes.lock(0, 0, false) // a writer preserving chunk 0
	if _, ok, _ := v.TryWriteAt(p, 0); ok {
		t.Fatal("wrote chunk 0 while another writer preserves it")
	}
	for _, c := range []int64{1, 1024, 2048, 3072} {
		if n, ok, err := v.TryWriteAt(p, c*4096); !ok || err != nil || n != len(p) {
			t.Fatalf("first write to chunk %d while chunk 0 is preserved: ok %v, n %d, err %v; want it to proceed", c, ok, n, err)
		}
	}
	held.unlock()
	s, err := v.OpenSnapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got := make([]byte, 4096)
	for _, c := range []int64{1, 1024, 2048, 3072} {
		if _, err := s.ReadAt(got, c*4096); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{7}, 4096)) {
			t.Fatalf("snapshot chunk %d: not the original (%v)", c, err)
		}
	}
}
