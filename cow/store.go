package cow

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
)

// store is the diff-area data file: fixed-size slots, one preserved chunk
// each. Guarded by Volume.mu except where noted.
type store struct {
	f    File
	path string
	hwm  int64   // slots ever handed out since the last reset
	free []int64 // released slots below hwm
	keep int64   // slots below it keep their space when freed (retainBytes)
	idle *time.Timer
	shut bool // closed: the idle timer does nothing
	sync *groupSyncer
	wb   *writeBehind // copies for non-persistent snapshots
	m    *storeMap    // slot reads copy from it in memory (storemap.go)
}

// newStore wraps the open diff-area file f; a write-behind failure marks
// the volume for settleWriteBehind.
func (v *Volume) newStore(f File) *store {
	s := &store{f: f, path: v.storePath(), wb: newWriteBehind(f, v.chunk), m: newStoreMap(f), keep: v.keepSlots()}
	s.wb.onFail = func() { v.wbFailed.Store(true) }
	s.sync = newGroupSyncer(f.Sync)
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

func (s *store) used() int64 { return s.hwm - int64(len(s.free)) }

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
	s.sync = newGroupSyncer(s.f.Sync)
}

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

// metaLog is the open metadata log. Appends happen under Volume.mu; the
// fsync runs outside it, shared by concurrent callers.
type metaLog struct {
	path string
	sync *groupSyncer

	mu     sync.RWMutex // held shared during fsync, exclusively to swap or close f
	f      File
	off    int64
	err    error // a failed append: every later sync reports it
	closed bool
}

func newMetaLog(path string, f File, off int64) *metaLog {
	l := &metaLog{path: path, f: f, off: off}
	l.sync = newGroupSyncer(l.fsync)
	return l
}

func (l *metaLog) fsync() error {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.err != nil {
		return l.err
	}
	if l.closed {
		return nil
	}
	return l.f.Sync()
}

func (v *Volume) diffDir() string   { return filepath.Join(v.storageDir, v.name+".umbra") }
func (v *Volume) storePath() string { return filepath.Join(v.diffDir(), "store") }
func (v *Volume) metaPath() string  { return filepath.Join(v.diffDir(), "meta.log") }

// logAppend appends rec when a persistent snapshot lives. Caller holds mu
// (which orders appends and guards f and off against a checkpoint; err is
// also read by fsync, outside mu: it is set under l.mu).
func (v *Volume) logAppend(rec record) {
	l := v.log
	if l == nil || l.err != nil {
		return
	}
	b := rec.encode()
	if _, err := l.f.WriteAt(b, l.off); err != nil {
		l.mu.Lock()
		l.err = fmt.Errorf("append to metadata %s: %w", l.path, err)
		l.mu.Unlock()
		return
	}
	l.off += int64(len(b))
}

// syncLog makes appended records durable (group commit). Callers must not
// hold mu... except commit, which is the only writer then (gate closed).
func (v *Volume) syncLog() error {
	l := v.log
	if l == nil {
		return nil
	}
	return l.sync.sync()
}

// logSyncer returns the current log's syncer; caller holds mu.
func (v *Volume) logSyncer() *groupSyncer {
	if v.log == nil {
		return nil
	}
	return v.log.sync
}

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

// dropLog removes the metadata log once no persistent snapshot lives.
func (v *Volume) dropLog() {
	l := v.log
	if l == nil {
		return
	}
	v.log = nil
	l.mu.Lock()
	l.closed = true
	l.f.Close()
	l.mu.Unlock()
	_ = v.fs.Remove(l.path)
	_ = v.fs.SyncDir(v.diffDir())
}

// checkpoint rewrites the log compactly: the snapshots from the oldest
// persistent one on, their entries, tracking bitmaps and cursors, and a
// CLEAN record when clean. Caller holds mu.
func (v *Volume) checkpoint(clean bool) error {
	var minGen uint64
	for _, s := range v.snaps {
		if s.persistent {
			minGen = s.gen
			break
		}
	}
	if minGen == 0 {
		return nil
	}
	var buf []byte
	buf = append(buf, metaHeader{Version: metaVersion, ChunkSize: uint32(v.chunk), VolSize: uint64(v.size), Created: time.Now().UnixNano()}.encode()...)
	for _, s := range v.snaps {
		if s.gen < minGen {
			continue
		}
		buf = append(buf, record{Type: recSnapCreate, Gen: s.gen, ID: s.id, SetID: s.setID, Persistent: s.persistent, Created: s.created.UnixNano()}.encode()...)
		if s.invalid != "" {
			buf = append(buf, record{Type: recInvalid, Gen: s.gen, Reason: s.invalid}.encode()...)
		}
		if s.hasCursor {
			buf = append(buf, record{Type: recCursor, Gen: s.gen, Chunk: s.cursor}.encode()...)
		}
		bm, err := s.changed.ToBytes()
		if err != nil {
			return fmt.Errorf("checkpoint %s: encode tracking: %w", v.metaPath(), err)
		}
		buf = append(buf, record{Type: recCBT, Gen: s.gen, Reliable: s.reliable, Bitmap: bm}.encode()...)
	}
	v.entries.Ascend(func(e entry) bool {
		if e.gen >= minGen {
			buf = append(buf, record{Type: recMap, Chunk: e.chunk, Gen: e.gen, Slot: e.slot}.encode()...)
		}
		return true
	})
	if clean {
		buf = append(buf, record{Type: recClean}.encode()...)
	}
	tmp := v.metaPath() + ".tmp"
	f, err := v.fs.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("checkpoint %s: %w", tmp, err)
	}
	if _, err := f.WriteAt(buf, 0); err != nil {
		f.Close()
		return fmt.Errorf("checkpoint %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("checkpoint %s: %w", tmp, err)
	}
	// The store must be durable before the mappings that point into it.
	if v.store != nil {
		if err := v.store.f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("checkpoint: sync diff area %s: %w", v.storePath(), err)
		}
	}
	if err := v.fs.Rename(tmp, v.metaPath()); err != nil {
		f.Close()
		return fmt.Errorf("checkpoint %s: %w", v.metaPath(), err)
	}
	if err := v.fs.SyncDir(v.diffDir()); err != nil {
		f.Close()
		return fmt.Errorf("checkpoint %s: sync directory: %w", v.diffDir(), err)
	}
	if old := v.log; old != nil {
		old.mu.Lock()
		old.f.Close()
		old.f, old.off, old.err = f, int64(len(buf)), nil
		old.mu.Unlock()
	} else {
		v.log = newMetaLog(v.metaPath(), f, int64(len(buf)))
	}
	return nil
}

// recover rebuilds the persistent snapshots from the diff area. Problems
// with the diff area are recorded in v.recovery and leave the origin
// usable; a diff area made for another chunk or volume size is refused.
func (v *Volume) recover() error {
	meta := v.metaPath()
	lf, err := v.fs.OpenFile(meta, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		// No persistent snapshot: what the store holds ended with the
		// last run.
		_ = v.fs.Remove(v.storePath())
		return nil
	}
	if err != nil {
		v.recovery = append(v.recovery, fmt.Errorf("diff area metadata %s cannot be opened (%v): its snapshots are lost; the origin is intact", meta, err))
		return nil
	}
	size, err := lf.Size()
	var data []byte
	if err == nil {
		data = make([]byte, size)
		_, err = lf.ReadAt(data, 0)
		if err == io.EOF {
			err = nil
		}
	}
	if err != nil {
		lf.Close()
		v.recovery = append(v.recovery, fmt.Errorf("diff area metadata %s cannot be read (%v): its snapshots are lost; the origin is intact", meta, err))
		return nil
	}
	hdr, err := decodeMetaHeader(data)
	if err != nil {
		lf.Close()
		aside := fmt.Sprintf("%s.damaged-%d", meta, time.Now().Unix())
		_ = v.fs.Rename(meta, aside)
		_ = v.fs.Remove(v.storePath())
		v.recovery = append(v.recovery, fmt.Errorf("diff area metadata %s is damaged (%v): moved to %s; its snapshots are lost; the origin is intact", meta, err, aside))
		return nil
	}
	if int64(hdr.ChunkSize) != v.chunk {
		lf.Close()
		return fmt.Errorf("open volume %s: diff area %s was made with chunk size %d, not %d: open the volume with chunk size %d", v.name, meta, hdr.ChunkSize, v.chunk, hdr.ChunkSize)
	}
	if int64(hdr.VolSize) != v.size {
		lf.Close()
		return fmt.Errorf("open volume %s: origin %s is %d bytes but diff area %s was made for %d bytes: a volume cannot change size while it has snapshots", v.name, v.originPath, v.size, meta, hdr.VolSize)
	}
	sf, err := v.fs.OpenFile(v.storePath(), os.O_RDWR, 0)
	storeMissing := errors.Is(err, fs.ErrNotExist)
	if err != nil && !storeMissing {
		lf.Close()
		return fmt.Errorf("open volume %s: diff area %s: %w", v.name, v.storePath(), err)
	}
	if storeMissing {
		sf, err = v.fs.OpenFile(v.storePath(), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			lf.Close()
			return fmt.Errorf("open volume %s: diff area %s: %w", v.name, v.storePath(), err)
		}
	}
	v.store = v.newStore(sf)
	v.log = newMetaLog(meta, lf, int64(len(data)))

	v.recovering = true
	clean, revert, err := v.replay(data[metaHeaderSize:])
	if err != nil {
		v.recovery = append(v.recovery, fmt.Errorf("diff area metadata %s: %w; records after it were ignored", meta, err))
	}
	if !clean {
		for _, s := range v.snaps {
			s.reliable = false
			if s.hasCursor {
				v.invalidate(s, "a backup cursor was active at an unclean stop: data behind it may have been released")
			}
		}
	}
	// Slots the store cannot hold mean lost preserved data.
	ssize, _ := sf.Size()
	var need int64 // bytes the store must have for the entries
	v.entries.Ascend(func(e entry) bool {
		if e.slot != zeroSlot {
			need = max(need, e.slot*v.chunk+v.chunkLen(e.chunk))
		}
		return true
	})
	if need > 0 && (storeMissing || need > ssize) {
		why := fmt.Sprintf("diff area data file %s is missing or shorter than its metadata %s says", v.storePath(), meta)
		if storeMissing {
			why = fmt.Sprintf("diff area data file %s is missing", v.storePath())
		}
		v.recovery = append(v.recovery, errors.New(why))
		for _, s := range v.snaps {
			v.invalidate(s, why)
		}
	}
	for i := len(v.snaps) - 1; i >= 0; i-- {
		if !v.snaps[i].persistent {
			v.deleteLocked(v.snaps[i], false)
		}
	}
	v.persistent = len(v.snaps)
	v.hasSnaps.Store(int32(len(v.snaps)))
	if revert != 0 {
		if s := v.snapByGen(revert); s != nil {
			if err := v.revertLocked(s); err != nil {
				v.recovery = append(v.recovery, fmt.Errorf("finishing the interrupted revert to %s: %w", s.id, err))
			}
		}
	}
	v.recovering = false
	v.rebuildFree()
	if len(v.snaps) == 0 {
		v.dropLog()
		v.store.reset(0)
		return nil
	}
	if err := v.checkpoint(false); err != nil {
		return fmt.Errorf("open volume %s: %w", v.name, err)
	}
	return nil
}

// replay applies log records in order. It stops at the first torn or
// corrupt record, as write-ahead logs do: records after the last fsync may
// reach the disk in any order after a power loss, and none of them was
// relied upon. (A record damaged at rest inside the synced part looks the
// same; the log is rewritten compactly at every open, which bounds that
// exposure to one run.)
func (v *Volume) replay(b []byte) (clean bool, revert uint64, err error) {
	for len(b) > 0 {
		r, n, derr := decodeRecord(b)
		if derr != nil {
			return clean, revert, nil
		}
		b = b[n:]
		clean = false
		switch r.Type {
		case recSnapCreate:
			if v.snapByGen(r.Gen) != nil || (len(v.snaps) > 0 && r.Gen <= v.newest().gen) {
				continue
			}
			v.snaps = append(v.snaps, &snap{
				gen: r.Gen, id: r.ID, setID: r.SetID, persistent: r.Persistent,
				created: time.Unix(0, r.Created).UTC(), reliable: true,
				changed: roaring.New(), owned: roaring.New(),
			})
			v.lastGen = max(v.lastGen, r.Gen)
		case recSnapDelete:
			if s := v.snapByGen(r.Gen); s != nil {
				v.deleteLocked(s, false)
			}
		case recInvalid:
			if s := v.snapByGen(r.Gen); s != nil && s.invalid == "" {
				s.invalid = r.Reason
			}
		case recMap:
			s := v.snapByGen(r.Gen)
			if s == nil || r.Chunk >= v.nchunks || s.owned.Contains(uint32(r.Chunk)) {
				continue
			}
			v.entries.ReplaceOrInsert(entry{chunk: r.Chunk, gen: r.Gen, slot: r.Slot})
			s.owned.Add(uint32(r.Chunk))
			s.changed.Add(uint32(r.Chunk))
			if r.Slot != zeroSlot {
				s.nonzero++
			}
		case recUnmap:
			if e, ok := v.entries.Delete(entry{chunk: r.Chunk, gen: r.Gen}); ok {
				if s := v.snapByGen(r.Gen); s != nil {
					s.owned.Remove(uint32(r.Chunk))
					if e.slot != zeroSlot {
						s.nonzero--
					}
				}
			}
		case recCursor:
			if s := v.snapByGen(r.Gen); s != nil {
				s.hasCursor = true
				s.cursor = max(s.cursor, r.Chunk)
			}
		case recCBT:
			if s := v.snapByGen(r.Gen); s != nil {
				bm := roaring.New()
				if _, err := bm.FromUnsafeBytes(r.Bitmap); err == nil {
					s.changed = bm.Clone()
					s.changed.Or(s.owned)
					s.reliable = r.Reliable
				} else {
					s.reliable = false
				}
			}
		case recClean:
			clean = true
		case recRevertBegin:
			revert = r.Gen
		case recRevertEnd:
			if s := v.snapByGen(r.Gen); s != nil {
				v.finishRevert(s)
			}
			revert = 0
		}
	}
	return clean, revert, nil
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
}
