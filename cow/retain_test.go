package cow

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"umbra/internal/testutil"
	"umbra/provider"
)

// dataRanges lists the allocated extents of the diff-area file, in slots
// of chunk bytes, with SEEK_DATA/SEEK_HOLE; it skips the test where the
// filesystem cannot tell.
func dataRanges(t *testing.T, v *Volume, chunk int64) [][2]int64 {
	t.Helper()
	v.mu.RLock()
	st := v.store
	v.mu.RUnlock()
	st.wb.drain()
	of, ok := st.f.(osFile)
	if !ok {
		t.Fatal("diff area is not an OS file")
	}
	fd := int(of.Fd())
	var out [][2]int64
	for off := int64(0); ; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			return out
		}
		if err != nil {
			t.Skipf("SEEK_DATA on the diff area: %v", err)
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			t.Skipf("SEEK_HOLE on the diff area: %v", err)
		}
		out = append(out, [2]int64{d / chunk, h / chunk})
		off = h
	}
}

func storeSize(t *testing.T, v *Volume) int64 {
	t.Helper()
	v.mu.RLock()
	defer v.mu.RUnlock()
	n, err := v.store.f.Size()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func setRetain(t *testing.T, bytes int64, idle time.Duration) {
	oldB, oldI := retainBytes, idleRelease
	retainBytes, idleRelease = bytes, idle
	t.Cleanup(func() { retainBytes, idleRelease = oldB, oldI })
}

// While the file is within the retained size, freed slots keep their
// space and are handed out again; shrinking the association below the
// file gives free space back; and a file that grew past the retained
// size punches what is freed.
func TestDiffAreaRetention(t *testing.T) {
	const chunk = 4096
	ctx := context.Background()
	// Two snapshots, s1 owning slots 0-7, s2 slots 8-9; deleting s1
	// frees 0-7 (s2 reads those chunks from the origin).
	setup := func(t *testing.T) (v *Volume, s1, s2 string, fill func(b byte, c0, n int64)) {
		v, _ = newTestVolume(t, 1<<20, Options{ChunkSize: chunk})
		fill = func(b byte, c0, n int64) {
			mustWrite(t, v, bytes.Repeat([]byte{b}, int(n*chunk)), c0*chunk)
		}
		fill(1, 0, 16)
		a, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		fill(2, 0, 8)
		b, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		fill(3, 8, 2)
		if got := dataRanges(t, v, chunk); len(got) != 1 || got[0] != [2]int64{0, 10} {
			t.Fatalf("allocated slots before delete: %v, want [[0 10]]", got)
		}
		if err := v.DeleteSnapshot(a.ID); err != nil {
			t.Fatal(err)
		}
		return v, a.ID, b.ID, fill
	}
	t.Run("within", func(t *testing.T) {
		setRetain(t, 16*chunk, time.Hour)
		v, _, s2, fill := setup(t)
		if got := dataRanges(t, v, chunk); len(got) != 1 || got[0] != [2]int64{0, 10} {
			t.Fatalf("allocated slots after freeing 0-7 with 16 retained: %v, want [[0 10]]", got)
		}
		if used := v.Storage().Used; used != 2*chunk {
			t.Fatalf("used %d, want %d", used, 2*chunk)
		}
		if a := storeAllocated(v); a < 10*chunk {
			t.Fatalf("storage reports %d bytes of the diff area allocated, want the %d the file keeps", a, 10*chunk)
		}
		// Reuse: the next copies take free slots, no new space.
		s3, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		fill(4, 10, 2)
		if used := v.Storage().Used; used != 4*chunk {
			t.Fatalf("used %d after two more copies, want %d", used, 4*chunk)
		}
		if got := dataRanges(t, v, chunk); len(got) != 1 || got[0] != [2]int64{0, 10} {
			t.Fatalf("allocated slots after reuse: %v, want [[0 10]]", got)
		}
		for _, c := range []struct {
			id   string
			c    int64
			want byte
		}{{s2, 8, 1}, {s2, 10, 1}, {s3.ID, 8, 3}, {s3.ID, 10, 1}, {s3.ID, 0, 2}} {
			sn, err := v.OpenSnapshot(c.id)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, chunk)
			if _, err := sn.ReadAt(got, c.c*chunk); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, bytes.Repeat([]byte{c.want}, chunk)) {
				t.Fatalf("snapshot %s chunk %d reads %d, want %d", c.id, c.c, got[0], c.want)
			}
		}
		// Shrinking to 2 slots, below the 4 used: delete-oldest drops s2,
		// and the file holds no more than what is in use.
		if err := v.SetMaxStorage(2 * chunk); err != nil {
			t.Fatal(err)
		}
		n := int64(0)
		for _, r := range dataRanges(t, v, chunk) {
			for sl := r[0]; sl < r[1]; sl++ {
				n++
				if !slotInUse(v, sl) {
					t.Fatalf("free slot %d keeps its space past the shrunk max (allocated %v)", sl, dataRanges(t, v, chunk))
				}
			}
		}
		if n > 2 {
			t.Fatalf("%d slots allocated after shrinking to 2", n)
		}
		if a := storeAllocated(v); a >= 10*chunk {
			t.Fatalf("storage reports %d bytes allocated after shrinking to %d", a, 2*chunk)
		}
		if err := v.SetMaxStorage(0); err != nil {
			t.Fatal(err)
		}
		for _, s := range v.Snapshots() {
			if err := v.DeleteSnapshot(s.ID); err != nil {
				t.Fatal(err)
			}
		}
		if n := storeSize(t, v); n > 16*chunk {
			t.Fatalf("diff area is %d bytes with no snapshot, want at most the %d retained", n, 16*chunk)
		}
	})
	t.Run("past", func(t *testing.T) {
		setRetain(t, 4*chunk, time.Hour)
		v, _, _, _ := setup(t)
		if got := dataRanges(t, v, chunk); len(got) != 1 || got[0] != [2]int64{8, 10} {
			t.Fatalf("allocated slots after freeing 0-7 of a 10-slot file with 4 retained: %v, want [[8 10]]", got)
		}
	})
}

// With no snapshot left, the retained space goes back after idleRelease;
// a snapshot taken before then reuses it.
func TestDiffAreaIdleRelease(t *testing.T) {
	const chunk = 4096
	setRetain(t, 64*chunk, 50*time.Millisecond)
	ctx := context.Background()
	v, _ := newTestVolume(t, 1<<20, Options{ChunkSize: chunk})
	mustWrite(t, v, bytes.Repeat([]byte{1}, 32*chunk), 0)
	round := func(b byte) {
		s, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		mustWrite(t, v, bytes.Repeat([]byte{b}, 32*chunk), 0)
		if got := dataRanges(t, v, chunk); len(got) != 1 || got[0] != [2]int64{0, 32} {
			t.Fatalf("allocated slots: %v, want [[0 32]]", got)
		}
		if err := v.DeleteSnapshot(s.ID); err != nil {
			t.Fatal(err)
		}
	}
	round(2)
	if n := storeSize(t, v); n != 32*chunk {
		t.Fatalf("diff area is %d bytes right after the last snapshot went, want the %d it held", n, 32*chunk)
	}
	if n := wbSpares(v); n == 0 {
		t.Fatal("the write-behind kept no spare buffer while the diff area keeps its space")
	}
	round(3) // reuses slots 0-31
	testutil.WaitFor(t, fmt.Sprintf("the diff area's space and spare buffers go once idle (idleRelease %v)", idleRelease), func() bool {
		return storeSize(t, v) == 0 && storeAllocated(v) == 0 && wbSpares(v) == 0
	})
}

// wbSpares is how many buffers of written batches the write-behind keeps.
func wbSpares(v *Volume) int {
	v.mu.RLock()
	st := v.store
	v.mu.RUnlock()
	if st == nil {
		return 0
	}
	st.wb.mu.Lock()
	defer st.wb.mu.Unlock()
	return len(st.wb.spares)
}

// storeAllocated is the diff-area store's part of what Storage reports
// allocated (without the metadata log), once the write-behind is written.
func storeAllocated(v *Volume) int64 {
	v.mu.RLock()
	st := v.store
	v.mu.RUnlock()
	if st != nil {
		st.wb.drain()
	}
	return v.Storage().Allocated - v.allocated(v.metaPath())
}

// slotInUse reports whether an entry holds slot.
func slotInUse(v *Volume, slot int64) bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	found := false
	v.entries.Ascend(func(e entry) bool {
		found = e.slot == slot
		return !found
	})
	return found
}
