package cow

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"umbra/provider"
)

// TestConcurrentSnapshotReads reads live snapshots from two goroutines
// while two writers keep overwriting the volume and snapshots come and go
// (the last one's delete empties and truncates the diff area), on tmpfs
// where it can be so that slots are read through the mapping (trimmed
// often): a read returns exactly what the first full read of that
// snapshot returned, or an error that says why it cannot (deleted, by
// the test or by the storage policy; invalidated by the policy) — never
// other bytes. Variants: persistent snapshots, a storage limit under
// each policy, and writes large enough to be preserved by the pipeline.
// (It found a delete dropping copies still in the write-behind before
// the readers that had found them were done: they then read the file,
// which never got them.)
func TestConcurrentSnapshotReads(t *testing.T) {
	oldTrim, oldBudget := trimEvery, mapBudget
	defer func() { trimEvery, mapBudget = oldTrim, oldBudget }()
	trimEvery, mapBudget = 64<<10, 0
	const chunk = 4096
	for _, tc := range []struct {
		name       string
		persistent bool
		maxChunks  int64
		policy     Policy
		maxWrite   int   // chunks
		cursor     bool  // stream each snapshot once with the backup cursor
		faults     error // fail one diff-area write in 30 with it
		resize     bool  // SetMaxStorage from another goroutine all along
	}{
		{name: "non-persistent", maxWrite: 3},
		{name: "persistent", persistent: true, maxWrite: 3},
		{name: "limit-delete-oldest", maxChunks: 48, policy: PolicyDeleteOldest, maxWrite: 3},
		{name: "limit-invalidate", maxChunks: 48, policy: PolicyInvalidate, maxWrite: 3},
		{name: "large-writes", maxWrite: 96},
		{name: "cursor", maxWrite: 3, cursor: true},
		// Diff-area writes that fail now and then (on the fault-injecting
		// filesystem): the copies are retried elsewhere or the policy
		// applies, and the snapshots that lose one say so.
		{name: "store-eio-invalidate", maxWrite: 8, faults: syscall.EIO, policy: PolicyInvalidate},
		{name: "store-enospc-delete-oldest", maxWrite: 8, faults: syscall.ENOSPC, policy: PolicyDeleteOldest},
		{name: "store-eio-persistent", persistent: true, maxWrite: 3, faults: syscall.EIO, policy: PolicyInvalidate},
		// The association resized all the time, from 16 chunks to none.
		{name: "resize-delete-oldest", maxWrite: 3, resize: true, policy: PolicyDeleteOldest},
		{name: "resize-invalidate", maxWrite: 3, resize: true, policy: PolicyInvalidate},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nchunks := 256
			if tc.maxWrite > 3 {
				nchunks = 1024
			}
			opts := Options{ChunkSize: chunk, MaxStorage: tc.maxChunks * chunk, Policy: tc.policy}
			var v *Volume
			if tc.faults != nil {
				ffs := newFaultFS()
				ffs.Put("/o", make([]byte, chunk*nchunks))
				r := rand.New(rand.NewPCG(1, 2)) // under ffs.mu, like writeErr
				ffs.setWriteErr(func(p string) error {
					if strings.Contains(p, "store") && r.IntN(30) == 0 {
						return tc.faults
					}
					return nil
				})
				opts.StorageDir, opts.FS = "/d", ffs
				var err error
				if v, err = Open("v", "/o", opts); err != nil {
					t.Fatal(err)
				}
				defer v.Close()
			} else {
				opts.StorageDir = memDirOrTemp(t)
				v, _ = newTestVolume(t, int64(chunk*nchunks), opts)
			}
			stop, done := make(chan struct{}), make(chan error, 1)
			if tc.resize {
				go func() {
					r := rand.New(rand.NewPCG(3, 4))
					for {
						select {
						case <-stop:
							done <- nil
							return
						default:
						}
						if err := v.SetMaxStorage(int64(r.IntN(4)) * 16 * chunk); err != nil {
							done <- err
							return
						}
						time.Sleep(200 * time.Microsecond)
					}
				}()
			}
			concurrentReads(t, v, chunk, nchunks, tc.maxWrite, tc.persistent, tc.cursor)
			if tc.resize {
				close(stop)
				if err := <-done; err != nil {
					t.Fatal(err)
				}
			}
			// Under a tight limit most snapshots die before they are read.
			if tc.maxChunks == 0 && tc.faults == nil && !tc.resize && v.store != nil && v.store.m.b != nil && v.store.m.copied.Load() == 0 {
				t.Fatal("no slot was read through the diff-area mapping")
			}
		})
	}
}

// commitAndOpen creates a snapshot of v and opens it, returning the
// open's error: under a storage limit with policy delete-oldest, writers
// may fill the diff area between the commit and the open, and the policy
// then deletes the new snapshot too.
func commitAndOpen(t *testing.T, v *Volume, persistent bool) (provider.Snapshot, *Snapshot, error) {
	t.Helper()
	info, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{Persistent: persistent})
	if err != nil {
		t.Fatal(err)
	}
	s, err := v.OpenSnapshot(info.ID)
	return info, s, err
}

// stopWorkers stops the test's goroutines and fails the test with the
// first error one of them reported.
func stopWorkers(t *testing.T, stop chan struct{}, wg *sync.WaitGroup, errs chan error) {
	t.Helper()
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
}

// stampBlock fills b, one block of a test volume, so that it says which
// block and which write it is: block number and write sequence as the
// first two little-endian u64s, then bytes derived from both.
func stampBlock(b []byte, blk, seq int) {
	for i := range b {
		b[i] = byte(blk*31 + seq*7 + i)
	}
	binary.LittleEndian.PutUint64(b, uint64(blk))
	binary.LittleEndian.PutUint64(b[8:], uint64(seq))
}

// writeAny writes p at off the way one of the front-ends would: WriteAt,
// TryWriteAt, or TryWriteFrom filling the origin file itself (as a splice
// from a socket does), falling back to WriteAt when a try would wait.
func writeAny(r *rand.Rand, v *Volume, p []byte, off int64) error {
	switch r.IntN(3) {
	case 1:
		if _, ok, err := v.TryWriteAt(p, off); ok || err != nil {
			return err
		}
	case 2:
		ok, err := v.TryWriteFrom(off, int64(len(p)), func(f *os.File, at int64) error {
			_, err := f.WriteAt(p, at)
			return err
		})
		if ok || err != nil {
			return err
		}
	}
	_, err := v.WriteAt(p, off)
	return err
}

func concurrentReads(t *testing.T, v *Volume, chunk, nchunks, maxWrite int, persistent, cursor bool) {
	size := chunk * nchunks
	// differ names the first block where got (read at off) and want differ.
	differ := func(got, want []byte, off int) string {
		for i := range got {
			if got[i] != want[i] {
				b := (off + i) / chunk * chunk
				at := func(x []byte) string {
					lo := b - off
					if lo < 0 || lo+16 > len(x) {
						return "?"
					}
					return fmt.Sprintf("block %d write %d", binary.LittleEndian.Uint64(x[lo:]), binary.LittleEndian.Uint64(x[lo+8:]))
				}
				return fmt.Sprintf("first at byte %d: want %s, got %s", off+i, at(want), at(got))
			}
		}
		return ""
	}
	p := make([]byte, size)
	for blk := range nchunks {
		stampBlock(p[blk*chunk:(blk+1)*chunk], blk, 0)
	}
	mustWrite(t, v, p, 0)
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
		reads int
	)
	// gone reports an error a read of a snapshot may end with: it was
	// deleted (by the test or the policy) or invalidated by the policy.
	gone := func(err error) bool {
		return errors.Is(err, provider.ErrNotFound) || errors.Is(err, provider.ErrSnapshotInvalid) ||
			cursor && errors.Is(err, ErrReleased)
	}
	worker := func(seed uint64, f func(r *rand.Rand) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, rand.Uint64()))
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
	for w := range 2 {
		seq := 0
		buf := make([]byte, maxWrite*chunk)
		worker(uint64(w), func(r *rand.Rand) error {
			seq++
			n := 1 + r.IntN(maxWrite)
			blk := r.IntN(nchunks - n + 1)
			for i := range n {
				stampBlock(buf[i*chunk:(i+1)*chunk], blk+i, seq)
			}
			return writeAny(r, v, buf[:n*chunk], int64(blk*chunk))
		})
	}
	for w := range 2 {
		worker(uint64(10+w), func(r *rand.Rand) error {
			mu.Lock()
			if len(snaps) == 0 {
				mu.Unlock()
				return nil
			}
			l := snaps[r.IntN(len(snaps))]
			mu.Unlock()
			off := r.IntN(nchunks) * chunk
			n := min(1+r.IntN(16*chunk), size-off)
			got := make([]byte, n)
			if _, err := l.s.ReadAt(got, int64(off)); err != nil {
				if gone(err) {
					return nil
				}
				return err
			}
			if !bytes.Equal(got, l.data[off:off+n]) {
				return fmt.Errorf("snapshot %s [%d,+%d) read other bytes than at commit: %s", l.id, off, n, differ(got, l.data[off:off+n], off))
			}
			mu.Lock()
			reads++
			mu.Unlock()
			return nil
		})
	}
	r := rand.New(rand.NewPCG(5, 6))
	for round := 0; round < 150; round++ {
		info, s, err := commitAndOpen(t, v, persistent)
		data := make([]byte, size)
		if !persistent && round%8 == 4 {
			// Copies wait in the write-behind until a batch fills or the
			// flusher has time: with the machine busy (another test
			// process) whole runs read them all from memory. Now and then
			// they go to the diff area and the oldest snapshot is read
			// whole, so reads take the diff area's mapping too.
			v.mu.Lock()
			st := v.store
			v.mu.Unlock()
			if st != nil {
				st.wb.drain()
			}
			mu.Lock()
			var old *live
			if len(snaps) > 0 {
				l := snaps[0]
				old = &l
			}
			mu.Unlock()
			if old != nil {
				got := make([]byte, size)
				if _, err := old.s.ReadAt(got, 0); err != nil && !gone(err) {
					t.Fatal(err)
				} else if err == nil && !bytes.Equal(got, old.data) {
					t.Fatalf("round %d: snapshot %s read other bytes than at commit: %s", round, old.id, differ(got, old.data, 0))
				}
			}
		}
		if err == nil {
			_, err = s.ReadAt(data, 0)
		}
		if err == nil {
			mu.Lock()
			snaps = append(snaps, live{info.ID, s, data})
			mu.Unlock()
		} else if !gone(err) {
			t.Fatal(err)
		}
		if cursor && err == nil && round%2 == 0 {
			// A backup's pass: ascending, releasing what is behind it, while
			// the writers go on; every piece still reads as at commit.
			piece := make([]byte, 16*chunk)
			for off := 0; off < size; off += len(piece) {
				n := min(len(piece), size-off)
				if _, err := s.ReadAt(piece[:n], int64(off)); err != nil {
					t.Fatalf("round %d: streaming %s at %d: %v", round, info.ID, off, err)
				}
				if !bytes.Equal(piece[:n], data[off:off+n]) {
					t.Fatalf("round %d: streaming %s [%d,+%d) read other bytes than at commit: %s", round, info.ID, off, n, differ(piece[:n], data[off:off+n], off))
				}
				s.SetCursor(int64(off + n))
			}
			if _, err := s.ReadAt(piece[:chunk], 0); !errors.Is(err, ErrReleased) {
				t.Fatalf("round %d: read behind the cursor of %s: %v, want ErrReleased", round, info.ID, err)
			}
		}
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
			if err := v.DeleteSnapshot(id); err != nil && !errors.Is(err, provider.ErrNotFound) {
				t.Fatal(err)
			}
		}
	}
	stopWorkers(t, stop, &wg, errs)
	t.Logf("%d snapshot reads checked", reads)
	if reads == 0 {
		t.Fatal("no snapshot read completed: the test tested nothing")
	}
}

// TestSnapshotPointInTime commits snapshots while two writers write,
// each in its own half of the volume, one write after another (up to
// 384 KiB: large writes go in pieces), and checks each snapshot against
// the writers' logs: per writer, the writes it holds are a prefix of that
// writer's sequence — every one of them whole (every block at that write
// or a later one), none after — and that prefix holds every write that
// had returned before the commit began and none begun after it returned.
// A write torn by the commit (some pieces before, some after), a write
// let through the gate or a copy lost shows as a violation.
func TestSnapshotPointInTime(t *testing.T) {
	const chunk, nchunks, maxWrite = 4096, 1024, 96
	v, _ := newTestVolume(t, chunk*nchunks, Options{ChunkSize: chunk, StorageDir: memDirOrTemp(t)})
	type write struct{ blk, n, seq int }
	var (
		mu                 sync.Mutex
		seq                int
		logs               [2][]write
		started, completed [2]int // seq of each writer's newest write begun / returned
		stop               = make(chan struct{})
		errs               = make(chan error, 2)
		wg                 sync.WaitGroup
	)
	half := nchunks / 2
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 9))
			buf := make([]byte, maxWrite*chunk)
			for {
				select {
				case <-stop:
					return
				default:
				}
				n := 1 + r.IntN(8)
				if r.IntN(4) == 0 {
					n = 1 + r.IntN(maxWrite)
				}
				blk := w*half + r.IntN(half-n+1)
				mu.Lock()
				seq++
				s := seq
				logs[w] = append(logs[w], write{blk, n, s})
				started[w] = s
				mu.Unlock()
				for i := range n {
					stampBlock(buf[i*chunk:(i+1)*chunk], blk+i, s)
				}
				if err := writeAny(r, v, buf[:n*chunk], int64(blk*chunk)); err != nil {
					errs <- err
					return
				}
				mu.Lock()
				completed[w] = s
				mu.Unlock()
			}
		}()
	}
	data := make([]byte, chunk*nchunks)
	held := make([]int, nchunks) // seq of the write each block of the snapshot holds
	for round := 0; round < 60; round++ {
		mu.Lock()
		before := completed
		mu.Unlock()
		info, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{Persistent: round%4 == 3})
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		after := started
		var log [2][]write
		for w := range 2 {
			log[w] = logs[w][:len(logs[w]):len(logs[w])]
		}
		mu.Unlock()
		s, err := v.OpenSnapshot(info.ID)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.ReadAt(data, 0); err != nil {
			t.Fatal(err)
		}
		for blk := range nchunks {
			b := data[blk*chunk:]
			got, gs := binary.LittleEndian.Uint64(b), int(binary.LittleEndian.Uint64(b[8:]))
			if gs != 0 && got != uint64(blk) {
				t.Fatalf("round %d: snapshot %s block %d holds block %d", round, info.ID, blk, got)
			}
			held[blk] = gs
		}
		for w := range 2 {
			cut := slices.Max(held[w*half : (w+1)*half])
			if cut < before[w] || cut > after[w] {
				t.Fatalf("round %d: snapshot %s holds writer %d's writes up to %d; want %d (the last returned before the commit) to %d (the last begun before it returned)",
					round, info.ID, w, cut, before[w], after[w])
			}
			for _, wr := range log[w] {
				if wr.seq > cut {
					break
				}
				for b := wr.blk; b < wr.blk+wr.n; b++ {
					if held[b] < wr.seq {
						t.Fatalf("round %d: snapshot %s holds writer %d's write %d but block %d of its write %d (blocks %d+%d) is at %d: torn",
							round, info.ID, w, cut, b, wr.seq, wr.blk, wr.n, held[b])
					}
				}
			}
		}
		if round >= 2 {
			if err := v.DeleteSnapshot(fmt.Sprintf("snap-%d", round-1)); err != nil && !errors.Is(err, provider.ErrNotFound) {
				t.Fatal(err)
			}
		}
	}
	stopWorkers(t, stop, &wg, errs)
}

// TestConcurrentCrash: two writers keep writing while persistent
// snapshots are committed, read and deleted, and the power goes at a
// random moment with writes in flight (the fault-injecting filesystem
// keeps a random part of what was not synced). After each restart every
// persistent snapshot whose commit returned and whose delete had not
// returned is there and reads exactly what it read after its commit (a
// deleted one that comes back must read so too), and the volume takes
// the next round. Twenty power losses a run.
func TestConcurrentCrash(t *testing.T) {
	const chunk, nchunks = 4096, 256
	size := chunk * nchunks
	ffs := newFaultFS()
	ffs.Put("/o", make([]byte, size))
	open := func() *Volume {
		v, err := Open("v", "/o", Options{StorageDir: "/d", FS: ffs})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	r := rand.New(rand.NewPCG(11, 12))
	want := map[string][]byte{} // snapshot -> what it reads
	deleted := map[string]bool{}
	seq := 0
	for crash := 0; crash < 20; crash++ {
		v := open()
		for _, s := range v.Snapshots() {
			if _, ok := want[s.ID]; !ok {
				t.Fatalf("restart %d: snapshot %s was never committed", crash, s.ID)
			}
		}
		live := map[string]bool{}
		for _, s := range v.Snapshots() {
			live[s.ID] = true
		}
		for id, data := range want {
			if !live[id] {
				if !deleted[id] {
					t.Fatalf("restart %d: snapshot %s is gone", crash, id)
				}
				delete(want, id)
				continue
			}
			s, err := v.OpenSnapshot(id)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, size)
			if _, err := s.ReadAt(got, 0); err != nil {
				t.Fatalf("restart %d: read %s: %v", crash, id, err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("restart %d: snapshot %s reads other bytes than after its commit", crash, id)
			}
		}
		var wg sync.WaitGroup
		stop := make(chan struct{})
		for w := range 2 {
			wg.Add(1)
			wr := rand.New(rand.NewPCG(uint64(crash), uint64(w)))
			base := seq + w*1_000_000
			go func() {
				defer wg.Done()
				buf := make([]byte, 8*chunk)
				for k := base; ; k++ {
					select {
					case <-stop:
						return
					default:
					}
					n := 1 + wr.IntN(8)
					blk := wr.IntN(nchunks - n + 1)
					for i := range n {
						stampBlock(buf[i*chunk:(i+1)*chunk], blk+i, k)
					}
					if _, err := v.WriteAt(buf[:n*chunk], int64(blk*chunk)); err != nil {
						return // the power went
					}
				}
			}()
		}
		seq += 2_000_000
		rounds := 2 + r.IntN(10)
		for round := 0; round < rounds; round++ {
			info, s, err := commitAndOpen(t, v, true)
			if err != nil {
				t.Fatal(err) // no storage limit here: nothing deletes it
			}
			data := make([]byte, size)
			if _, err := s.ReadAt(data, 0); err != nil {
				t.Fatal(err)
			}
			want[info.ID] = data
			var ids []string
			for _, id := range slices.Sorted(maps.Keys(want)) {
				if !deleted[id] {
					ids = append(ids, id)
				}
			}
			if r.IntN(3) == 0 && len(ids) > 1 {
				id := ids[r.IntN(len(ids))]
				deleted[id] = true // from the moment the delete is asked
				if err := v.DeleteSnapshot(id); err != nil {
					t.Fatal(err)
				}
			}
			if r.IntN(4) == 0 {
				if err := v.Flush(); err != nil {
					t.Fatal(err)
				}
			}
		}
		ffs.Crash(r) // writers still writing
		close(stop)
		wg.Wait()
		v.Close()
	}
}
