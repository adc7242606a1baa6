package cow

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"time"
)

// store is the diff-area data file: fixed-size slots, one preserved chunk
// each. Guarded by Volume.mu except where noted.
type store struct {
	f     File
	path  string
	chunk int64   // the volume's chunk size: a slot's
	hwm   int64   // slots ever handed out since the last reset
	free  []int64 // released slots below hwm
	keep  int64   // slots below it keep their space when freed (retainBytes)
	idle  *time.Timer
	shut  bool // closed: the idle timer does nothing
	sync  *groupSyncer
	wb    *writeBehind // copies for non-persistent snapshots
	m     *storeMap    // slot reads copy from it in memory (storemap.go)

	// Written space ahead of the persistent copies (zeroAhead): slots
	// below ready are space the file has written (zeros or older
	// copies), so a copy written over one changes no file metadata and
	// its fdatasync commits no journal transaction. A hint: a slot that
	// is not (punched, say) costs that commit, nothing else.
	ready    int64
	reserved int64 // slots taken out of the allocator while zeroAhead zeroes them
	zeroing  bool  // a zeroAhead is under way
}

// newStore wraps the open diff-area file f; a write-behind failure marks
// the volume for settleWriteBehind.
func (v *Volume) newStore(f File) *store {
	s := &store{f: f, path: v.storePath(), chunk: v.chunk, wb: newWriteBehind(f, v.chunk), m: newStoreMap(f), keep: v.keepSlots()}
	s.wb.onFail = func() { v.pre.wbFailed.Store(true) }
	s.sync = newGroupSyncer(s.datasync)
	return s
}

// alloc hands out a slot; full is true when max (>0) slots are in use.
func (s *store) alloc(max int64) (slot int64, full bool) {
	if max > 0 && s.used() >= max {
		return 0, true
	}
	if n := len(s.free); n > 0 {
		slot = s.free[n-1]
		s.free = s.free[:n-1]
		return slot, false
	}
	s.hwm++
	return s.hwm - 1, false
}

func (s *store) release(slot int64) { s.free = append(s.free, slot) }

func (s *store) used() int64 { return s.hwm - int64(len(s.free)) - s.reserved }

// Preallocation for persistent copies. A copy appended past the end of
// the file, or into a hole, allocates blocks and grows the file: its
// fdatasync then waits for a journal commit (ext4), which on a disk
// costs more than writing the 4 KiB. fallocate does not help: ext4
// marks the blocks unwritten, and converting them is journalled as
// well. So the space ahead is written with zeros, zeroBatch at a time
// (one commit then, for every copy that lands in it), as dm-snapshot's
// exception store and blksnap's diff storage are allocated ahead of
// their use. Measured 2026-12-07, ext4 on a loop device: 4.4-5.0 ms an
// fdatasync of an appended 4 KiB with a commit each, 4.2-4.4 into
// fallocated space (a commit each), 2.4-3.0 ms over written zeros (none).
// (A variable: tests make it small.)
var zeroBatch int64 = 2 << 20

// reserveZeros takes the next zeroBatch of slots out of the allocator
// for zeroAhead when slot, just handed out to a persistent copy, is past
// the written space and none is being zeroed; n is 0 when there is
// nothing to do, or no room: the batch must stay within the slots that
// keep their space (keep), so the file never holds more than the
// association's maximum. Caller holds Volume.mu.
func (s *store) reserveZeros(slot int64) (from, n int64) {
	if s.zeroing || slot < s.ready {
		return 0, 0
	}
	n = max(zeroBatch/s.chunk, 1)
	if s.hwm+n > s.keep {
		return 0, 0
	}
	from = s.hwm
	s.hwm += n
	s.reserved += n
	s.zeroing = true
	return from, n
}

// zeroAhead writes zeros over the n slots from from (reserveZeros) and
// hands them to the allocator, lowest first; the fdatasync of the copy
// that reserved them makes them durable space. Caller holds neither
// Volume.mu nor any slot of them: nobody else can have them (the
// allocator is not reset while slots are reserved).
func (v *Volume) zeroAhead(st *store, from, n int64) {
	_, err := writeZeros(st.f, from*v.chunk, n*v.chunk)
	v.mu.Lock()
	defer v.mu.Unlock()
	st.zeroing = false
	st.reserved -= n
	k := len(st.free)
	for s := from + n - 1; s >= from; s-- {
		st.free = append(st.free, s)
	}
	// The association's max may have shrunk meanwhile (setKeep): then
	// the file is past what keeps its space, and they are punched out.
	st.punch(st.free[k:], v.chunk)
	if err == nil && v.store == st && st.hwm <= st.keep {
		st.ready = max(st.ready, from+n)
	}
}

// zeroBlock is the zeros the engine writes (zeroAhead, the log's space
// ahead, WriteZeroes where the origin cannot punch), never written to:
// an array, so nothing is allocated for it at every command's start nor
// at every use.
var zeroBlock [1 << 20]byte

// writeZeros writes n zero bytes to f at off, a zeroBlock at a time, and
// returns how many it wrote before an error.
func writeZeros(f io.WriterAt, off, n int64) (int64, error) {
	done := int64(0)
	for done < n {
		k := min(int64(len(zeroBlock)), n-done)
		if _, err := f.WriteAt(zeroBlock[:k], off+done); err != nil {
			return done, err
		}
		done += k
	}
	return done, nil
}

// Space the diff area's file once held is kept for reuse, as VSS keeps
// its diff area allocated and blksnap and dattobd preallocate theirs: a
// slot freed and handed out again is written over space the filesystem
// has already allocated, where punching it out and allocating it again
// costs, on tmpfs here, 0.6-0.8 ms a MiB against 0.25-0.3 for the
// overwrite (BenchmarkPhysicalLimit), and on a disk filesystem block
// allocation, its journal and fragmentation. Two bounds keep that from
// holding space nobody uses:
//   - freed slots keep their space only while every slot handed out
//     since the file was last emptied is below retainBytes and the
//     association's max (keep): the file then never holds more than
//     the max, used and kept together; otherwise they are punched out,
//     and shrinking the association below the file gives back all its
//     free space;
//   - once the last snapshot is gone, the file keeps at most retainBytes
//     for idleRelease, in case another snapshot follows (a backup
//     cycle's next one), and is then truncated to nothing.
//
// (Variables: tests make them small.)
var (
	retainBytes int64 = 1 << 30
	idleRelease       = 15 * time.Second
)

// keepSlots is how many slots keep their space when freed: retainBytes,
// within the association's max. Caller holds mu.
func (v *Volume) keepSlots() int64 {
	n := retainBytes / v.chunk
	if m := v.maxSlots(); v.maxStorage > 0 && m < n {
		n = m
	}
	return n
}

// setKeep changes how many slots keep their space; space of free slots
// above a lower bound, and of the file past what is in use, is given
// back now.
func (s *store) setKeep(n, chunk int64) {
	old := s.keep
	s.keep = n
	if n >= old {
		return
	}
	s.punch(s.free, chunk)
	s.cut(max(s.hwm, n) * chunk)
}

// cut truncates the file to size when it is longer.
func (s *store) cut(size int64) {
	s.ready = min(s.ready, size/s.chunk)
	if n, err := s.f.Size(); err == nil && n <= size {
		return
	}
	s.m.truncated()
	_ = s.f.Truncate(size)
}

// punch gives freed slots' space back to the filesystem, unless the
// file is within keep slots (see retainBytes).
// Runs of consecutive slots go in one call: a snapshot's copies are
// mostly in runs, and deleting one frees them all under the volume lock.
func (s *store) punch(slots []int64, chunk int64) {
	if s.hwm <= s.keep {
		return
	}
	if len(slots) > 1 && !slices.IsSorted(slots) {
		slots = slices.Clone(slots)
		slices.Sort(slots)
	}
	for i := 0; i < len(slots); {
		j := i + 1
		for j < len(slots) && slots[j] == slots[j-1]+1 {
			j++
		}
		_ = s.f.Punch(slots[i]*chunk, int64(j-i)*chunk) // best effort: the slots are reusable either way
		s.ready = min(s.ready, slots[i])
		i = j
	}
}

// reset empties the allocator once no slot is in use. The file keeps up
// to keep bytes of its space (see retainBytes); 0 gives it all back, and
// the write-behind's spare buffers with it.
func (s *store) reset(keep int64) {
	s.wb.drain() // nothing live is pending: no slot is in use
	if keep == 0 {
		s.wb.dropSpares()
	}
	s.hwm, s.free = 0, nil
	s.cut(keep)
	s.sync = newGroupSyncer(s.datasync)
}

// datasync makes the preserved chunks durable; the store's size and
// blocks are all its metadata a reader needs.
func (s *store) datasync() error { return datasync(s.f) }

func (s *store) close() {
	s.shut = true
	if s.idle != nil {
		s.idle.Stop()
	}
	s.wb.stop()
	s.m.close()
	s.f.Close()
}

// readAt reads p at off in the diff-area file.
func (s *store) readAt(p []byte, off int64) (int, error) {
	if s.m.read(s.f, p, off) {
		return len(p), nil
	}
	return s.f.ReadAt(p, off)
}

func (v *Volume) diffDir() string   { return filepath.Join(v.storageDir, v.name+".umbra") }
func (v *Volume) storePath() string { return filepath.Join(v.diffDir(), "store") }
func (v *Volume) metaPath() string  { return filepath.Join(v.diffDir(), "meta.log") }

func (v *Volume) openStore() error {
	if v.store != nil {
		return nil
	}
	if c, ok := v.fs.(claimer); ok && v.storageOwn == nil {
		own, err := c.claimDir(v.storageDir, "shadow storage directory", storageHint)
		if err != nil {
			return fmt.Errorf("snapshot volume %s: %w", v.name, err)
		}
		v.storageOwn = own
	}
	if err := v.fs.MkdirAll(v.diffDir(), 0o700); err != nil {
		return fmt.Errorf("create diff area %s: %w", v.diffDir(), err)
	}
	f, err := v.fs.OpenFile(v.storePath(), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open diff area %s: %w", v.storePath(), err)
	}
	v.store = v.newStore(f)
	if v.log == nil {
		v.store.reset(0) // leftovers of snapshots that ended with a restart
	}
	return nil
}

// rebuildFree recomputes the allocator from the entries.
func (v *Volume) rebuildFree() {
	var used []int64
	v.entries.Ascend(func(e entry) bool {
		if e.slot != zeroSlot {
			used = append(used, e.slot)
		}
		return true
	})
	sort.Slice(used, func(i, j int) bool { return used[i] < used[j] })
	st := v.store
	st.free = st.free[:0]
	st.hwm = 0
	if len(used) > 0 {
		st.hwm = used[len(used)-1] + 1
	}
	next := int64(0)
	var holes []int64
	for _, u := range used {
		for ; next < u; next++ {
			holes = append(holes, next)
		}
		next = u + 1
	}
	// Hand out low slots first.
	for i := len(holes) - 1; i >= 0; i-- {
		st.free = append(st.free, holes[i])
	}
	st.punch(holes, v.chunk)
	_ = st.f.Truncate(st.hwm * v.chunk)
	st.ready = 0 // holes, and whatever the file held before: not known written
}
