package cow

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"umbra/provider"
)

// shmIsTmpfs reports whether /dev/shm is a tmpfs.
func shmIsTmpfs() bool {
	var st unix.Statfs_t
	return unix.Statfs("/dev/shm", &st) == nil && st.Type == unix.TMPFS_MAGIC
}

// memDir returns a temporary directory on tmpfs (/dev/shm: files in
// memory, where the diff area is mapped), or skips the test.
func memDir(t *testing.T) string {
	t.Helper()
	if !shmIsTmpfs() {
		t.Skip("no tmpfs at /dev/shm")
	}
	d, err := os.MkdirTemp("/dev/shm", "umbra-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// memDirOrTemp returns a temporary directory on tmpfs when there is one
// (the diff area is then mapped), else on the default temporary one.
func memDirOrTemp(t *testing.T) string {
	t.Helper()
	if shmIsTmpfs() {
		return memDir(t)
	}
	return t.TempDir()
}

// TestStoreMapRandom runs random unaligned writes, snapshot creates and
// deletes on a volume in real files (so slot reads go through the
// diff-area mapping, trimmed every few reads) and checks every read of a
// live snapshot against an in-memory copy taken at its commit, with the
// origin read across gaps of preserved chunks never, by default, and
// always.
func TestStoreMapRandom(t *testing.T) {
	oldTrim, oldGap, oldBudget := trimEvery, originGap, mapBudget
	defer func() { trimEvery, originGap, mapBudget = oldTrim, oldGap, oldBudget }()
	trimEvery, mapBudget = 20<<10, 0
	for _, gap := range []int64{0, oldGap, 1 << 30} {
		t.Run(fmt.Sprintf("gap=%d", gap), func(t *testing.T) {
			originGap = gap
			const chunk = 4096
			size := int64(chunk*40 - 1000) // a short last chunk
			v, _ := newTestVolume(t, size, Options{ChunkSize: chunk, StorageDir: memDir(t)})
			r := rand.New(rand.NewPCG(uint64(gap), 7))
			origin := make([]byte, size)
			type live struct {
				id   string
				data []byte
			}
			var snaps []live
			for step := 0; step < 600; step++ {
				switch op := r.IntN(10); {
				case op < 5:
					off := r.Int64N(size)
					n := 1 + r.Int64N(min(3*chunk, size-off))
					p := make([]byte, n)
					for i := range p {
						p[i] = byte(r.Uint32())
					}
					mustWrite(t, v, p, off)
					copy(origin[off:], p)
				case op < 7 && len(snaps) < 8:
					s, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{})
					if err != nil {
						t.Fatal(err)
					}
					snaps = append(snaps, live{s.ID, bytes.Clone(origin)})
				case op < 8 && len(snaps) > 0:
					i := r.IntN(len(snaps))
					if err := v.DeleteSnapshot(snaps[i].id); err != nil {
						t.Fatal(err)
					}
					snaps = append(snaps[:i], snaps[i+1:]...)
				case len(snaps) > 0:
					if r.IntN(4) == 0 {
						v.store.wb.drain() // the copies on file, not in the batch
					}
					l := snaps[r.IntN(len(snaps))]
					s, err := v.OpenSnapshot(l.id)
					if err != nil {
						t.Fatal(err)
					}
					off := r.Int64N(size)
					n := 1 + r.Int64N(size-off)
					got := make([]byte, n)
					if _, err := s.ReadAt(got, off); err != nil {
						t.Fatalf("step %d: read snapshot %s [%d,+%d): %v", step, l.id, off, n, err)
					}
					if !bytes.Equal(got, l.data[off:off+n]) {
						t.Fatalf("step %d: snapshot %s [%d,+%d) differs from what it held at commit", step, l.id, off, n)
					}
				}
			}
			if v.store == nil || v.store.m.copied.Load() == 0 {
				t.Fatal("no slot was read through the diff-area mapping")
			}
		})
	}
}

// TestStoreMapOnDisk: a diff area on a disk is read with pread only.
func TestStoreMapOnDisk(t *testing.T) {
	var st unix.Statfs_t
	dir := t.TempDir()
	if unix.Statfs(dir, &st) == nil && (st.Type == unix.TMPFS_MAGIC || st.Type == unix.RAMFS_MAGIC) {
		t.Skip("the temporary directory is in memory")
	}
	v, _ := newTestVolume(t, 8*4096, Options{ChunkSize: 4096, StorageDir: dir})
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if v.store.m.b != nil {
		t.Fatal("a diff area on a disk was mapped")
	}
}

// TestStoreMapFault: a diff-area file cut short behind the engine's back
// makes a read through the mapping fault; the read must fall back to
// pread (which reads zeros past the end, as before the mapping) instead
// of killing the process.
func TestStoreMapFault(t *testing.T) {
	const chunk = 4096
	v, _ := newTestVolume(t, 16*chunk, Options{ChunkSize: chunk, StorageDir: memDir(t)})
	old := bytes.Repeat([]byte{7}, 8*chunk)
	mustWrite(t, v, old, 0)
	info, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := v.OpenSnapshot(info.ID)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, v, bytes.Repeat([]byte{9}, 8*chunk), 0)
	v.store.wb.drain()
	// Chunk by chunk, so the reads are small enough for the mapping.
	for c := int64(0); c < 8; c++ {
		got := make([]byte, chunk)
		if _, err := s.ReadAt(got, c*chunk); err != nil || !bytes.Equal(got, old[:chunk]) {
			t.Fatalf("chunk %d before truncation: err %v, equal %v", c, err, bytes.Equal(got, old[:chunk]))
		}
	}
	if v.store.m.copied.Load() == 0 {
		t.Fatal("the reads did not use the mapping")
	}
	if err := os.Truncate(v.storePath(), 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, chunk)
	if _, err := s.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, chunk)) {
		t.Fatal("a slot past the end of the diff area did not read as zeros")
	}
	if v.store.m.faults.Load() == 0 {
		t.Fatal("the stale size did not make the mapped copy fault: the test did not test the fallback")
	}
}

// A long run of originals of an origin in memory is copied from the
// origin's mapping; snapshots read exactly what it held, and a copy that
// faults (the origin cut short behind the engine's back) falls back to
// pread without failing the write.
func TestOriginalsFromMapping(t *testing.T) {
	const chunk, size = 4096, 8 << 20
	d := memDir(t)
	origin := d + "/origin"
	r := rand.New(rand.NewPCG(11, 12))
	want := make([]byte, size)
	for i := range want {
		want[i] = byte(r.Uint32())
	}
	if err := os.WriteFile(origin, want, 0o600); err != nil {
		t.Fatal(err)
	}
	v, err := Open("mapped", origin, Options{ChunkSize: chunk, StorageDir: d + "/diff"})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	s, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sn, err := v.OpenSnapshot(s.ID)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4; i++ {
		off := r.Int64N(size-(1<<20)) &^ 511
		mustWrite(t, v, bytes.Repeat([]byte{byte(i + 1)}, 1<<20), off)
	}
	if v.mapLent.Load() == 0 {
		t.Fatal("no original was copied from the origin's mapping: the test did not test it")
	}
	if got := readAll(t, sn, size); !bytes.Equal(got, want) {
		t.Fatal("snapshot differs from the origin at its commit")
	}
	// Cut the origin's second half away, then write there: the mapped copy
	// of the originals faults and the write still goes through.
	if err := os.Truncate(origin, size/2); err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0xee}, 1<<20)
	mustWrite(t, v, p, size-(1<<20))
	got := make([]byte, len(p))
	if _, err := v.ReadAt(got, size-(1<<20)); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("origin after the write past the cut: err %v, equal %v", err, bytes.Equal(got, p))
	}
}
