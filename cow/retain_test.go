package cow

import (
	"bytes"
	"context"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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

// Freed slots below the retained size keep their space and are handed
// out again; those above it are punched out; shrinking the association
// gives back what no longer fits; and once no snapshot lives the file
// keeps its retained space only for idleRelease.
func TestDiffAreaRetention(t *testing.T) {
	const chunk = 4096
	setRetain(t, 4*chunk, time.Hour)
	ctx := context.Background()
	v, _ := newTestVolume(t, 1<<20, Options{ChunkSize: chunk})
	fill := func(b byte, c0, n int64) {
		mustWrite(t, v, bytes.Repeat([]byte{b}, int(n*chunk)), c0*chunk)
	}
	fill(1, 0, 16)
	s1, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fill(2, 0, 8) // slots 0-7, s1's
	s2, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fill(3, 8, 2) // slots 8-9, s2's
	if got := dataRanges(t, v, chunk); len(got) != 1 || got[0] != [2]int64{0, 10} {
		t.Fatalf("allocated slots before delete: %v, want [[0 10]]", got)
	}
	// s2 reads chunks 0-7 from the origin: deleting s1 frees slots 0-7.
	if err := v.DeleteSnapshot(s1.ID); err != nil {
		t.Fatal(err)
	}
	if got := dataRanges(t, v, chunk); len(got) != 2 || got[0] != [2]int64{0, 4} || got[1] != [2]int64{8, 10} {
		t.Fatalf("allocated slots after freeing 0-7 with 4 retained: %v, want [[0 4] [8 10]]", got)
	}
	if used := v.Storage().Used; used != 2*chunk {
		t.Fatalf("used %d, want %d", used, 2*chunk)
	}
	// Reuse: the next copies take free slots, and s2 still reads its own.
	s3, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fill(4, 10, 2)
	if used := v.Storage().Used; used != 4*chunk {
		t.Fatalf("used %d after two more copies, want %d", used, 4*chunk)
	}
	for _, c := range []struct {
		id   string
		c    int64
		want byte
	}{{s2.ID, 8, 1}, {s2.ID, 10, 1}, {s3.ID, 8, 3}, {s3.ID, 10, 1}, {s3.ID, 0, 2}} {
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
	// Shrinking the association to 2 slots is below the 4 used:
	// delete-oldest drops s2, and no free slot keeps space past the max.
	if err := v.SetMaxStorage(2 * chunk); err != nil {
		t.Fatal(err)
	}
	for _, r := range dataRanges(t, v, chunk) {
		for sl := r[0]; sl < r[1]; sl++ {
			if sl >= 2 && !slotInUse(v, sl) {
				t.Fatalf("free slot %d keeps its space past the shrunk max (allocated %v)", sl, dataRanges(t, v, chunk))
			}
		}
	}
	if err := v.SetMaxStorage(0); err != nil {
		t.Fatal(err)
	}
	for _, s := range v.Snapshots() {
		if err := v.DeleteSnapshot(s.ID); err != nil {
			t.Fatal(err)
		}
	}
	if n := storeSize(t, v); n > 4*chunk {
		t.Fatalf("diff area is %d bytes with no snapshot, want at most the %d retained", n, 4*chunk)
	}
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
	round(3) // reuses slots 0-31
	deadline := time.Now().Add(10 * time.Second)
	for storeSize(t, v) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("diff area still %d bytes 10 s after the last snapshot went (idleRelease %v)", storeSize(t, v), idleRelease)
		}
		time.Sleep(10 * time.Millisecond)
	}
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
