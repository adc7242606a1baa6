package cow

import (
	"fmt"
	"sort"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
)

// Snapshot bookkeeping: the live snapshots (Volume.snaps, ascending
// generation, with each one's owned and changed chunks), the mapping of
// preserved chunks to diff-area slots (Volume.entries), and what the
// policy does when a copy finds no room. It owns the lookups over both
// (newest, maxGen, usersAbove, entryAt, snapIndex, snapByGen,
// predecessor, snapByID), deleting a snapshot (deleteLocked hands its
// entries to its predecessor or frees them), invalidating snapshots and
// dropping entries no valid snapshot reads, the policy (makeRoom before
// a slot is taken, lackRoom after one was), and freeing slots
// (freeSlots, maybeResetStore).
//
// Volume.mu guards all of it: callers hold it (exclusively for any
// change), except logFailed and metaRefused, which take it, and
// syncInvalidation, which is called without it. freeSlots also takes Volume.slotMu exclusively,
// so that no snapshot read is still reading a slot it frees.

type entry struct {
	chunk uint64
	gen   uint64
	slot  int64
}

func entryLess(a, b entry) bool {
	if a.chunk != b.chunk {
		return a.chunk < b.chunk
	}
	return a.gen < b.gen
}

type snap struct {
	gen        uint64
	id, setID  string
	created    time.Time
	persistent bool
	invalid    string // reason; "" while valid
	hasCursor  bool
	cursor     uint64          // chunks below it are released
	changed    *roaring.Bitmap // chunks first written while this was the newest
	owned      *roaring.Bitmap // chunks with an entry at this generation
	nonzero    int64           // owned entries that hold a diff-area slot
	reliable   bool            // changed is complete
}

func (s *snap) needs(c uint64) bool {
	return s.invalid == "" && (!s.hasCursor || c >= s.cursor)
}

func (v *Volume) newest() *snap {
	if len(v.snaps) == 0 {
		return nil
	}
	return v.snaps[len(v.snaps)-1]
}

// maxGen returns the newest generation with an entry for chunk c, or 0.
func (v *Volume) maxGen(c uint64) uint64 {
	var g uint64
	v.entries.DescendLessOrEqual(entry{chunk: c, gen: ^uint64(0)}, func(e entry) bool {
		if e.chunk == c {
			g = e.gen
		}
		return false
	})
	return g
}

// usersAbove reports whether a live snapshot with generation in
// (maxGen(c), upper] still needs the origin's chunk c. Every entry
// belongs to a live snapshot's owned set (deleting a snapshot hands its
// entries to the one before or drops them), so maxGen(c) is the newest
// snapshot owning c: scanning from the newest, the first owner ends the
// search, and a snapshot in range that needs c before it answers yes —
// one bitmap lookup for a first write under the newest snapshot instead
// of a walk down the B-tree of all entries.
func (v *Volume) usersAbove(c, upper uint64) bool {
	for i := len(v.snaps) - 1; i >= 0; i-- {
		s := v.snaps[i]
		if s.owned.Contains(uint32(c)) {
			return false
		}
		if s.gen <= upper && s.needs(c) {
			return true
		}
	}
	return false
}

// entryAt finds chunk c's entry that holds slot. Caller holds mu.
func (v *Volume) entryAt(c uint64, slot int64) (entry, bool) {
	var found entry
	ok := false
	v.entries.AscendRange(entry{chunk: c}, entry{chunk: c + 1}, func(e entry) bool {
		if e.slot == slot {
			found, ok = e, true
			return false
		}
		return true
	})
	return found, ok
}

// lackRoom applies the policy when entry e's copy finds no room; true
// means try again (the oldest snapshot was deleted). Caller holds mu.
func (v *Volume) lackRoom(e entry, why string) bool {
	if v.policy == PolicyInvalidate || len(v.snaps) == 0 {
		v.dropReaders(e, why)
		return false
	}
	v.deleteLocked(v.snaps[0], true)
	return true
}

// dropReaders invalidates the snapshots that read chunk e.chunk through
// entry e and drops it. Caller holds mu.
func (v *Volume) dropReaders(e entry, why string) {
	var below uint64
	v.entries.DescendLessOrEqual(entry{chunk: e.chunk, gen: e.gen - 1}, func(x entry) bool {
		if x.chunk == e.chunk {
			below = x.gen
		}
		return false
	})
	for _, s := range v.snaps {
		if s.gen > below && s.gen <= e.gen && s.needs(e.chunk) {
			v.invalidate(s, why)
		}
	}
	var freed []int64
	v.dropEntry(e, &freed)
	v.freeSlots(freed)
}

// makeRoom applies the policy when chunk c cannot be preserved for lack of
// space. It returns true when the caller should try again.
func (v *Volume) makeRoom(c, gen uint64, why string) bool {
	if v.policy == PolicyInvalidate {
		v.invalidateUsers(c, gen, why)
		return false
	}
	if len(v.snaps) == 0 {
		return false
	}
	v.deleteLocked(v.snaps[0], true)
	return true
}

// invalidateUsers marks invalid every live snapshot that needed chunk c of
// the origin (those in (maxGen(c), gen]).
func (v *Volume) invalidateUsers(c, gen uint64, why string) {
	g := v.maxGen(c)
	for _, s := range v.snaps {
		if s.gen > g && s.gen <= gen && s.needs(c) {
			v.invalidate(s, why)
		}
	}
}

func (v *Volume) invalidate(s *snap, why string) {
	if s.invalid != "" {
		return
	}
	s.invalid = why
	v.log.append(record{Type: recInvalid, Gen: s.gen, Reason: why})
}

// syncInvalidation makes invalidation records durable before the origin
// write that caused them is issued; an error means that write must not
// be issued (see logFailed).
func (v *Volume) syncInvalidation(lsync *groupSyncer) error {
	if lsync != nil {
		if err := lsync.sync(); err != nil {
			return v.logFailed(err)
		}
	}
	return nil
}

// logFailed deals with a failed sync of the metadata log: records
// appended since its last good sync may be lost, a copy's mapping among
// them, so every live snapshot is invalid. That must be durable before
// the origin write that waited for the sync is issued, or after a
// restart a snapshot could read that write's bytes: the log is rewritten
// from memory as a new file (checkpoint), with the snapshots invalid.
// When that fails too, it returns an error: the write is refused, and so
// is every later write under the snapshots until a rewrite succeeds or
// no persistent snapshot is left (metaRefused). Called without mu.
func (v *Volume) logFailed(err error) error {
	why := fmt.Sprintf("syncing metadata %s failed: %v", v.metaPath(), err)
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, s := range v.snaps {
		if s.invalid == "" {
			s.invalid = why
		}
	}
	v.metaErr = why
	return v.rewriteFailedLog()
}

// logSyncFailedLocked deals with a failed sync (err) of records a change
// made under mu appended (a snapshot created, a revert begun or ended)
// after the caller has undone in memory what failed: the records may
// reach the disk all the same, so the log is rewritten from memory as
// logFailed does, refusing writes when that fails. Caller holds mu.
func (v *Volume) logSyncFailedLocked(err error) error {
	v.metaErr = fmt.Sprintf("syncing metadata %s failed: %v", v.metaPath(), err)
	return v.rewriteFailedLog()
}

// metaRefused is nil unless a failed metadata sync left the snapshots'
// invalidation not durable (logFailed); then it tries again to make it
// so, and returns the error refusing the write if that fails again.
// Called without mu.
func (v *Volume) metaRefused() error {
	if !v.metaBroken.Load() {
		return nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.rewriteFailedLog()
}

// rewriteFailedLog rewrites the log after a failed sync (v.metaErr says
// why) so that the snapshots' invalidation is durable, and sets
// metaBroken when it cannot. Caller holds mu.
func (v *Volume) rewriteFailedLog() error {
	if v.log == nil || v.persistent == 0 {
		v.metaBroken.Store(false) // no persistent snapshot is left to read a write
		return nil
	}
	if err := v.checkpoint(false); err != nil {
		v.metaBroken.Store(true)
		return fmt.Errorf("write volume %s refused: %s, and rewriting it failed too (%v): after a restart the persistent snapshots could read bytes written now; repair the shadow storage in %s, or delete the persistent snapshots of %s", v.name, v.metaErr, err, v.storageDir, v.name)
	}
	v.metaBroken.Store(false)
	return nil
}

func (v *Volume) snapIndex(gen uint64) int {
	i := sort.Search(len(v.snaps), func(i int) bool { return v.snaps[i].gen >= gen })
	if i < len(v.snaps) && v.snaps[i].gen == gen {
		return i
	}
	return -1
}

func (v *Volume) snapByGen(gen uint64) *snap {
	if i := v.snapIndex(gen); i >= 0 {
		return v.snaps[i]
	}
	return nil
}

// predecessor returns the newest live snapshot older than gen.
func (v *Volume) predecessor(gen uint64) *snap {
	i := sort.Search(len(v.snaps), func(i int) bool { return v.snaps[i].gen >= gen })
	if i == 0 {
		return nil
	}
	return v.snaps[i-1]
}

func (v *Volume) snapByID(id string) *snap {
	for _, s := range v.snaps {
		if s.id == id {
			return s
		}
	}
	return nil
}

// deleteLocked removes snapshot s: each of its entries goes to its
// predecessor when the predecessor has none for that chunk, and is freed
// otherwise. log says whether to record the deletion.
func (v *Volume) deleteLocked(s *snap, log bool) {
	i := v.snapIndex(s.gen)
	if i < 0 {
		return
	}
	var p *snap
	if i > 0 {
		p = v.snaps[i-1]
	}
	var freed []int64
	it := s.owned.Iterator()
	for it.HasNext() {
		c := uint64(it.Next())
		e, ok := v.entries.Delete(entry{chunk: c, gen: s.gen})
		if !ok {
			continue
		}
		if p != nil && !p.owned.Contains(uint32(c)) {
			e.gen = p.gen
			v.entries.ReplaceOrInsert(e)
			p.owned.Add(uint32(c))
			if e.slot != zeroSlot {
				p.nonzero++
			}
		} else if e.slot != zeroSlot {
			freed = append(freed, e.slot)
		}
	}
	if p != nil {
		p.changed.Or(s.changed)
		p.reliable = p.reliable && s.reliable
	}
	v.snaps = append(v.snaps[:i], v.snaps[i+1:]...)
	v.hasSnaps.Store(int32(len(v.snaps)))
	if log {
		v.log.append(record{Type: recSnapDelete, Gen: s.gen})
	}
	v.freeSlots(freed)
	if s.persistent {
		v.persistent--
		if v.persistent == 0 && log {
			v.dropLog()
		}
	}
	if log {
		v.maybeResetStore()
	}
}

// maybeResetStore empties the diff area once no snapshot lives and no
// preservation still holds a slot (one may be in flight: its copy is then
// discarded by place).
func (v *Volume) maybeResetStore() {
	st := v.store
	if st == nil || len(v.snaps) > 0 || st.used() > 0 || st.reserved > 0 {
		return
	}
	st.reset(st.keep * v.chunk)
	if st.idle != nil {
		st.idle.Reset(idleRelease)
		return
	}
	st.idle = time.AfterFunc(idleRelease, func() {
		v.mu.Lock()
		defer v.mu.Unlock()
		if v.store == st && !st.shut && len(v.snaps) == 0 && st.used() == 0 && st.reserved == 0 {
			st.reset(0)
		}
	})
}

// freeSlots returns slots to the allocator once no reader is reading them.
func (v *Volume) freeSlots(slots []int64) {
	// While recovering, the log's frees are history: the slot may hold
	// data a later record maps. rebuildFree derives the allocator after.
	if len(slots) == 0 || v.store == nil || v.recovering {
		return
	}
	// Readers that found these slots may still be reading them, from the
	// write-behind's memory or from the file: only once they are done may
	// pending copies be dropped (a reader would otherwise miss the copy in
	// memory and read the file, which never got it) and the slots reused.
	v.slotMu.Lock()
	v.store.wb.cancel(slots)
	for _, s := range slots {
		v.store.release(s)
	}
	v.slotMu.Unlock()
	v.store.punch(slots, v.chunk)
	v.maybeResetStore()
}

func (v *Volume) maxSlots() int64 {
	if v.maxStorage <= 0 {
		return 0
	}
	return max(v.maxStorage/v.chunk, 0)
}

// releaseInvalid frees entries that no valid snapshot can read.
func (v *Volume) releaseInvalid() {
	var freed []int64
	var drop []entry
	prev := map[uint64]uint64{} // chunk -> previous entry generation
	v.entries.Ascend(func(e entry) bool {
		lo := prev[e.chunk]
		prev[e.chunk] = e.gen
		for _, s := range v.snaps {
			if s.gen > lo && s.gen <= e.gen && s.needs(e.chunk) {
				return true
			}
		}
		drop = append(drop, e)
		return true
	})
	for _, e := range drop {
		v.dropEntry(e, &freed)
	}
	v.freeSlots(freed)
}

func (v *Volume) dropEntry(e entry, freed *[]int64) {
	v.entries.Delete(e)
	if s := v.snapByGen(e.gen); s != nil {
		s.owned.Remove(uint32(e.chunk))
		if e.slot != zeroSlot {
			s.nonzero--
		}
	}
	if e.slot != zeroSlot {
		*freed = append(*freed, e.slot)
	}
	v.log.append(record{Type: recUnmap, Chunk: e.chunk, Gen: e.gen})
}
