package cow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"umbra/provider"
)

// memDir returns a temporary directory on tmpfs (/dev/shm), where the
// diff area is mapped, or skips the test.
func memDir(t *testing.T) string {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		t.Skip("no tmpfs at /dev/shm: the diff area is mapped only in memory")
	}
	d, err := os.MkdirTemp("/dev/shm", "umbra-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// TestStoreMapRandom runs random unaligned writes, snapshot creates and
// deletes on a volume in real files (so slot reads go through the
// diff-area mapping, trimmed every few reads) and checks every read of a
// live snapshot against an in-memory copy taken at its commit, with the
// origin read across gaps of preserved chunks never, by default, and
// always.
func TestStoreMapRandom(t *testing.T) {
	oldTrim, oldGap := trimEvery, originGap
	defer func() { trimEvery, originGap = oldTrim, oldGap }()
	trimEvery = 20 << 10
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

// TestConcurrentSnapshotReads reads live snapshots from two goroutines
// while two writers keep overwriting the volume and snapshots come and go
// (the last one's delete empties and truncates the diff area), on tmpfs
// where it can be so that slots are read through the mapping (trimmed
// often): a read returns exactly what the first full read of that
// snapshot returned, or, once the snapshot is deleted, an error that says
// so — never other bytes. (It found a delete dropping copies still in the
// write-behind before the readers that had found them were done: they
// then read the file, which never got them.)
func TestConcurrentSnapshotReads(t *testing.T) {
	oldTrim := trimEvery
	defer func() { trimEvery = oldTrim }()
	trimEvery = 64 << 10
	const chunk, nchunks = 4096, 256
	dir := t.TempDir()
	var st unix.Statfs_t
	if unix.Statfs("/dev/shm", &st) == nil && st.Type == unix.TMPFS_MAGIC {
		dir = memDir(t)
	}
	v, _ := newTestVolume(t, chunk*nchunks, Options{ChunkSize: chunk, StorageDir: dir})
	block := func(b []byte, blk, seq int) {
		for i := range b {
			b[i] = byte(blk*31 + seq*7 + i)
		}
	}
	p := make([]byte, chunk)
	for blk := range nchunks {
		block(p, blk, 0)
		mustWrite(t, v, p, int64(blk)*chunk)
	}
	type live struct {
		id   string
		s    *Snapshot
		data []byte
	}
	var (
		mu    sync.Mutex
		snaps []live
		stop  = make(chan struct{})
		errs  = make(chan error, 4)
		wg    sync.WaitGroup
	)
	worker := func(f func(r *rand.Rand) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(len(errs)), rand.Uint64()))
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := f(r); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for range 2 { // writers
		seq := 0
		worker(func(r *rand.Rand) error {
			seq++
			p := make([]byte, 3*chunk)
			blk, n := r.IntN(nchunks-2), 1+r.IntN(3)
			for i := range n {
				block(p[i*chunk:(i+1)*chunk], blk+i, seq)
			}
			_, err := v.WriteAt(p[:n*chunk], int64(blk)*chunk)
			return err
		})
	}
	for range 2 { // readers
		worker(func(r *rand.Rand) error {
			mu.Lock()
			if len(snaps) == 0 {
				mu.Unlock()
				return nil
			}
			l := snaps[r.IntN(len(snaps))]
			mu.Unlock()
			off := r.Int64N(nchunks) * chunk
			n := min(1+r.Int64N(16*chunk), chunk*nchunks-off)
			got := make([]byte, n)
			if _, err := l.s.ReadAt(got, off); err != nil {
				if errors.Is(err, provider.ErrNotFound) {
					return nil // deleted meanwhile
				}
				return err
			}
			if !bytes.Equal(got, l.data[off:off+n]) {
				return fmt.Errorf("snapshot %s [%d,+%d) read other bytes than at commit", l.id, off, n)
			}
			return nil
		})
	}
	r := rand.New(rand.NewPCG(5, 6))
	for round := 0; round < 150; round++ {
		info, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s, err := v.OpenSnapshot(info.ID)
		if err != nil {
			t.Fatal(err)
		}
		data := make([]byte, chunk*nchunks)
		if _, err := s.ReadAt(data, 0); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		snaps = append(snaps, live{info.ID, s, data})
		mu.Unlock()
		time.Sleep(time.Millisecond)
		for {
			mu.Lock()
			if len(snaps) == 0 || len(snaps) < 3 && r.IntN(2) == 0 {
				mu.Unlock()
				break
			}
			i := r.IntN(len(snaps))
			id := snaps[i].id
			snaps = append(snaps[:i], snaps[i+1:]...)
			mu.Unlock()
			if err := v.DeleteSnapshot(id); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	if v.store.m.b != nil && v.store.m.copied.Load() == 0 {
		t.Fatal("no slot was read through the diff-area mapping")
	}
}
