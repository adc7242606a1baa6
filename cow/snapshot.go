package cow

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"umbra/provider"
)

// Snapshot reads one shadow copy of a volume. It is safe for concurrent
// use; it fails with provider.ErrNotFound once the snapshot is deleted and
// with provider.ErrSnapshotInvalid once it is invalid.
type Snapshot struct {
	v      *Volume
	gen    uint64
	id     string
	closed atomic.Bool
}

// OpenSnapshot opens snapshot id for reading.
func (v *Volume) OpenSnapshot(id string) (*Snapshot, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	s := v.snapByID(id)
	if s == nil {
		return nil, fmt.Errorf("snapshot %s@%s: %w", v.name, id, provider.ErrNotFound)
	}
	return &Snapshot{v: v, gen: s.gen, id: id}, nil
}

// ID returns the snapshot's id.
func (s *Snapshot) ID() string { return s.id }

// Size returns the volume size at the snapshot.
func (s *Snapshot) Size() int64 { return s.v.size }

// Volume returns the snapshot's volume.
func (s *Snapshot) Volume() *Volume { return s.v }

// Info describes the snapshot.
func (s *Snapshot) Info() (provider.Snapshot, error) {
	s.v.mu.RLock()
	defer s.v.mu.RUnlock()
	sn, err := s.live()
	if err != nil {
		return provider.Snapshot{}, err
	}
	return s.v.info(sn), nil
}

// live returns the snapshot's state; caller holds v.mu.
func (s *Snapshot) live() (*snap, error) {
	if s.closed.Load() {
		return nil, fmt.Errorf("snapshot %s@%s: %w", s.v.name, s.id, ErrClosed)
	}
	sn := s.v.snapByGen(s.gen)
	if sn == nil {
		return nil, fmt.Errorf("snapshot %s@%s: %w", s.v.name, s.id, provider.ErrNotFound)
	}
	return sn, nil
}

func (s *Snapshot) readable(c uint64) (*snap, error) {
	sn, err := s.live()
	if err != nil {
		return nil, err
	}
	if sn.invalid != "" {
		return nil, fmt.Errorf("snapshot %s@%s: %w: %s", s.v.name, s.id, provider.ErrSnapshotInvalid, sn.invalid)
	}
	if sn.hasCursor && c < sn.cursor {
		return nil, fmt.Errorf("snapshot %s@%s chunk %d: %w", s.v.name, s.id, c, ErrReleased)
	}
	return sn, nil
}

// lookup returns the entry snapshot gen reads chunk c from; caller holds
// v.mu.
func (v *Volume) lookup(c, gen uint64) (entry, bool) {
	var found entry
	ok := false
	v.entries.AscendGreaterOrEqual(entry{chunk: c, gen: gen}, func(e entry) bool {
		if e.chunk == c {
			found, ok = e, true
		}
		return false
	})
	return found, ok
}

// ReadAt reads the snapshot: exactly the bytes the volume held at commit,
// or an error.
func (s *Snapshot) ReadAt(p []byte, off int64) (int, error) {
	v := s.v
	if off < 0 {
		return 0, v.checkRange(off, int64(len(p)))
	}
	if off >= v.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := len(p)
	if int64(len(p)) > v.size-off {
		p = p[:v.size-off]
	}
	done := 0
	for done < len(p) {
		n := min(len(p)-done, preserveBatch)
		if err := s.readSpan(p[done:done+n], off+int64(done)); err != nil {
			return done, err
		}
		done += n
	}
	if done < want {
		return done, io.EOF
	}
	return done, nil
}

// fromOrigin marks a chunk a snapshot reads from the origin.
const fromOrigin = -2

// originGap: a snapshot read takes the origin's chunks on both sides of
// a gap of at most this many bytes (chunks it reads from the diff area)
// in one pread, copying the gap for nothing: a system call costs about
// what copying 8-16 KiB from the page cache does (BenchmarkDeepRead).
// (A variable: the model test sets it to 0 and to large values.)
var originGap int64 = 16 << 10

// readSpan reads p at off: it resolves every chunk under one lock, then
// reads the origin's chunks (across short gaps: originGap) and runs of
// consecutive slots with one read each, and, if it read the origin,
// checks the snapshot still lives.
func (s *Snapshot) readSpan(p []byte, off int64) error {
	v := s.v
	c0 := uint64(off) >> v.shift
	c1 := uint64(off+int64(len(p))-1) >> v.shift
	locks := v.stripes.lock(c0, c1, true)
	defer locks.unlock()
	v.mu.RLock()
	if _, err := s.readable(c0); err != nil {
		v.mu.RUnlock()
		return err
	}
	// One pass over the span's entries: each chunk reads from its first
	// entry at a generation >= the snapshot's, else from the origin.
	src := make([]int64, c1-c0+1)
	for i := range src {
		src[i] = fromOrigin
	}
	anySlot := false
	v.entries.AscendRange(entry{chunk: c0}, entry{chunk: c1 + 1}, func(e entry) bool {
		if e.gen >= s.gen && src[e.chunk-c0] == fromOrigin {
			src[e.chunk-c0] = e.slot
			anySlot = anySlot || e.slot != zeroSlot
		}
		return true
	})
	var st *store
	slotsHeld := anySlot
	if anySlot {
		v.slotMu.RLock()
		defer func() {
			if slotsHeld {
				v.slotMu.RUnlock()
			}
		}()
		st = v.store
	}
	v.mu.RUnlock()
	// piece: chunk c covers p[lo:hi], starting inChunk bytes into it.
	piece := func(c uint64) (lo, hi int, inChunk int64) {
		start := max(int64(c)<<v.shift, off)
		end := min(int64(c+1)<<v.shift, off+int64(len(p)))
		return int(start - off), int(end - off), start - int64(c)<<v.shift
	}
	readOrigin := false
	// The origin first, in as few reads as pays: runs of origin chunks
	// with short gaps between them are read in one pread, and the gaps'
	// chunks are then filled from the diff area over what it read (the
	// stripe locks keep the origin's chunks as they are meanwhile).
	for i := 0; i < len(src); {
		if src[i] != fromOrigin {
			i++
			continue
		}
		j, last := i+1, i
		for k := i + 1; k < len(src) && int64(k-last-1)<<v.shift <= originGap; k++ {
			if src[k] == fromOrigin {
				j, last = k+1, k
			}
		}
		lo, _, _ := piece(c0 + uint64(i))
		_, hi, _ := piece(c0 + uint64(j-1))
		readOrigin = true
		if _, err := v.origin.ReadAt(p[lo:hi], off+int64(lo)); err != nil && err != io.EOF {
			return fmt.Errorf("snapshot %s@%s: read origin: %w", v.name, s.id, err)
		}
		i = j
	}
	for i := 0; i < len(src); {
		j := i + 1
		for j < len(src) && (src[i] < 0 && src[j] == src[i] || src[i] >= 0 && src[j] >= 0 && src[j] == src[j-1]+1) {
			j++
		}
		lo, _, inChunk := piece(c0 + uint64(i))
		_, hi, _ := piece(c0 + uint64(j-1))
		switch src[i] {
		case zeroSlot:
			clear(p[lo:hi])
		case fromOrigin: // read above
		default:
			if st.wb.anyPending(src[i], j-i) {
				// Some slots are still in memory: chunk by chunk.
				for k := i; k < j; k++ {
					lo, hi, inChunk := piece(c0 + uint64(k))
					if err := v.readChunkSlot(st, p[lo:hi], src[k], inChunk); err != nil {
						return fmt.Errorf("snapshot %s@%s: %w", v.name, s.id, err)
					}
				}
			} else if err := v.readSlot(st, p[lo:hi], src[i], inChunk); err != nil {
				return fmt.Errorf("snapshot %s@%s: %w", v.name, s.id, err)
			}
		}
		i = j
	}
	if slotsHeld {
		// Before v.mu: a delete frees slots under v.mu and waits for
		// slotMu.
		slotsHeld = false
		v.slotMu.RUnlock()
	}
	if readOrigin {
		// A write takes no stripe lock while no snapshot lives: had this
		// one been deleted during the read (with every other), the origin
		// bytes may be a write it never held. Live now means live
		// throughout, so every write since took the locks this holds.
		v.mu.RLock()
		_, err := s.live()
		v.mu.RUnlock()
		if err != nil {
			return err
		}
	}
	return nil
}

// readSlot reads p from the diff area, inChunk bytes into slot (and on
// into the slots after it). A slot at the end of a sparse store reads as
// zeros (EOF).
func (v *Volume) readSlot(st *store, p []byte, slot, inChunk int64) error {
	n, err := st.readAt(p, slot*v.chunk+inChunk)
	if err == io.EOF {
		clear(p[n:])
	} else if err != nil {
		return fmt.Errorf("read diff area %s: %w", v.storePath(), err)
	}
	return nil
}

// readChunkSlot reads p, within one chunk, from slot: from memory while
// the write-behind still holds it, else from the diff area.
func (v *Volume) readChunkSlot(st *store, p []byte, slot, inChunk int64) error {
	if st.wb.read(slot, p, inChunk) {
		return nil
	}
	return v.readSlot(st, p, slot, inChunk)
}

// Allocation describes [off, off+length) of the snapshot as extents.
func (s *Snapshot) Allocation(off, length int64) ([]Extent, error) {
	v := s.v
	if err := v.checkRange(off, length); err != nil {
		return nil, err
	}
	var out []Extent
	add := func(e Extent) {
		if n := len(out); n > 0 && out[n-1].Off+out[n-1].Len == e.Off && out[n-1].Hole == e.Hole && out[n-1].Zero == e.Zero {
			out[n-1].Len += e.Len
			return
		}
		out = append(out, e)
	}
	end := off + length
	// Windows of chunks: resolve their entries in one pass, then ask the
	// origin once per run of chunks it serves.
	const window = 1 << 16
	for wpos := off; wpos < end; {
		c0 := uint64(wpos) >> v.shift
		wend := min(int64(c0+window)<<v.shift, end)
		c1 := uint64(wend-1) >> v.shift
		src := make([]int64, c1-c0+1)
		for i := range src {
			src[i] = fromOrigin
		}
		v.mu.RLock()
		if _, err := s.live(); err != nil {
			v.mu.RUnlock()
			return nil, err
		}
		v.entries.AscendRange(entry{chunk: c0}, entry{chunk: c1 + 1}, func(e entry) bool {
			if e.gen >= s.gen && src[e.chunk-c0] == fromOrigin {
				src[e.chunk-c0] = e.slot
			}
			return true
		})
		v.mu.RUnlock()
		for i := 0; i < len(src); {
			j := i + 1
			for j < len(src) && (src[j] == fromOrigin) == (src[i] == fromOrigin) && (src[i] == fromOrigin || (src[j] == zeroSlot) == (src[i] == zeroSlot)) {
				j++
			}
			lo := max(int64(c0+uint64(i))<<v.shift, wpos)
			hi := min(int64(c0+uint64(j))<<v.shift, wend)
			switch src[i] {
			case fromOrigin:
				for _, x := range v.originExtents(lo, hi-lo) {
					add(x)
				}
			case zeroSlot:
				add(Extent{Off: lo, Len: hi - lo, Zero: true})
			default:
				add(Extent{Off: lo, Len: hi - lo})
			}
			i = j
		}
		wpos = wend
	}
	return out, nil
}

// Changed returns the chunks that may differ between snapshot since and
// this snapshot.
func (s *Snapshot) Changed(since string) (*provider.Bitmap, bool, error) {
	return s.v.Changed(since, s.id)
}

// SetCursor tells the engine that this snapshot's reader, streaming in
// ascending order, will not read below off again (the backup cursor):
// chunks wholly behind it are no longer preserved for this snapshot and
// preserved copies only it needed are released. Reading behind the cursor
// afterwards fails with ErrReleased.
func (s *Snapshot) SetCursor(off int64) {
	v := s.v
	v.mu.Lock()
	sn, err := s.live()
	if err != nil {
		v.mu.Unlock()
		return
	}
	c := uint64(max(off, 0)) >> v.shift
	if !sn.hasCursor {
		// Durable before any chunk is skipped for it: an unclean stop
		// must know the cursor was active.
		sn.hasCursor = true
		v.log.append(record{Type: recCursor, Gen: sn.gen})
		if lsync := v.log.syncer(); lsync != nil {
			if err := lsync.sync(); err != nil {
				v.invalidate(sn, fmt.Sprintf("recording the backup cursor in %s failed: %v", v.metaPath(), err))
			}
		}
	}
	if c <= sn.cursor {
		v.mu.Unlock()
		return
	}
	from := sn.cursor
	sn.cursor = c
	var drop []entry
	var prevChunk, prevGen uint64 = ^uint64(0), 0
	v.entries.AscendRange(entry{chunk: from}, entry{chunk: c}, func(e entry) bool {
		if e.chunk != prevChunk {
			prevChunk, prevGen = e.chunk, 0
		}
		lo := prevGen
		prevGen = e.gen
		for _, k := range v.snaps {
			if k.gen > lo && k.gen <= e.gen && k.needs(e.chunk) {
				return true
			}
		}
		drop = append(drop, e)
		return true
	})
	var freed []int64
	for _, e := range drop {
		v.dropEntry(e, &freed)
	}
	v.freeSlots(freed)
	lsync := v.log.syncer()
	v.mu.Unlock()
	if lsync != nil && len(drop) > 0 {
		_ = lsync.sync() // releasing is safe to lose; syncing bounds the replay
	}
}

// Close ends this reader; the snapshot stays.
func (s *Snapshot) Close() error {
	s.closed.Store(true)
	return nil
}

// Use records that a front-end client has the origin open (kind says
// what: "NBD connection", "open FUSE file"); the returned function, called
// once, ends it. Revert refuses while any is open.
func (v *Volume) Use(kind string) (done func()) {
	v.usersMu.Lock()
	if v.users == nil {
		v.users = map[string]int{}
	}
	v.users[kind]++
	v.usersMu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			v.usersMu.Lock()
			if v.users[kind]--; v.users[kind] == 0 {
				delete(v.users, kind)
			}
			v.usersMu.Unlock()
		})
	}
}

// Users says which front-end clients have the origin open, e.g.
// "2 NBD connection(s)"; empty when none.
func (v *Volume) Users() []string {
	v.usersMu.Lock()
	defer v.usersMu.Unlock()
	var out []string
	for kind, n := range v.users {
		out = append(out, fmt.Sprintf("%d %s(s)", n, kind))
	}
	sort.Strings(out)
	return out
}

// Use records that a front-end client has this snapshot open (kind says
// what: "NBD connection", "open FUSE file"); the returned function, called
// once, ends it. DeleteSnapshot refuses while any is open.
func (s *Snapshot) Use(kind string) (done func()) {
	v := s.v
	v.usersMu.Lock()
	if v.snapUsers == nil {
		v.snapUsers = map[uint64]map[string]int{}
	}
	if v.snapUsers[s.gen] == nil {
		v.snapUsers[s.gen] = map[string]int{}
	}
	v.snapUsers[s.gen][kind]++
	v.usersMu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			v.usersMu.Lock()
			defer v.usersMu.Unlock()
			m := v.snapUsers[s.gen]
			if m[kind]--; m[kind] == 0 {
				delete(m, kind)
			}
			if len(m) == 0 {
				delete(v.snapUsers, s.gen)
			}
			if v.usersLeft != nil {
				close(v.usersLeft)
				v.usersLeft = nil
			}
		})
	}
}

// WaitSnapshotUnused waits until no front-end client has snapshot id open,
// or until ctx ends, and returns the users still there (empty when none).
// A client that was just let go of (a loop device detached, an NBD client
// disconnected) closes its file or connection a moment after the command
// that let it go returns; a delete that follows at once waits for that
// rather than refusing.
func (v *Volume) WaitSnapshotUnused(ctx context.Context, id string) []string {
	for {
		v.mu.RLock()
		s := v.snapByID(id)
		v.mu.RUnlock()
		if s == nil {
			return nil
		}
		v.usersMu.Lock()
		if len(v.snapUsers[s.gen]) == 0 {
			v.usersMu.Unlock()
			return nil
		}
		if v.usersLeft == nil {
			v.usersLeft = make(chan struct{})
		}
		left := v.usersLeft
		v.usersMu.Unlock()
		select {
		case <-left:
		case <-ctx.Done():
			return v.SnapshotUsers(id)
		}
	}
}

// SnapshotUsers says which front-end clients have snapshot id open, e.g.
// "1 open FUSE file(s)"; empty when none (or no such snapshot).
func (v *Volume) SnapshotUsers(id string) []string {
	v.mu.RLock()
	defer v.mu.RUnlock()
	s := v.snapByID(id)
	if s == nil {
		return nil
	}
	return v.snapshotUsers(s.gen)
}

func (v *Volume) snapshotUsers(gen uint64) []string {
	v.usersMu.Lock()
	defer v.usersMu.Unlock()
	var out []string
	for kind, n := range v.snapUsers[gen] {
		out = append(out, fmt.Sprintf("%d %s(s)", n, kind))
	}
	sort.Strings(out)
	return out
}

// Revert rolls the origin back to snapshot id: every chunk written since
// is copied back, and later snapshots are deleted. Writes are held while it
// runs; the snapshot stays and now matches the origin. An interrupted
// revert finishes when the volume is next opened. It refuses with
// ErrInUse while a front-end client has the origin open: a filesystem
// mounted on it would find its blocks changed underneath (ForceRevert
// does it anyway).
func (v *Volume) Revert(id string) error { return v.revert(id, false) }

// ForceRevert is Revert even while clients have the origin open.
func (v *Volume) ForceRevert(id string) error { return v.revert(id, true) }

func (v *Volume) revert(id string, force bool) error {
	if err := v.gate.close(context.Background()); err != nil {
		return err
	}
	defer v.gate.reopen()
	if users := v.Users(); len(users) > 0 && !force {
		return fmt.Errorf("revert %s to %s: %w: %s; unmount what is on it, detach its loop device (umount, losetup -d) and disconnect NBD clients, or revert with --force",
			v.name, id, ErrInUse, strings.Join(users, ", "))
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	s := v.snapByID(id)
	if s == nil {
		return fmt.Errorf("revert %s to %s: %w", v.name, id, provider.ErrNotFound)
	}
	if s.invalid != "" {
		return fmt.Errorf("revert %s to %s: %w: %s", v.name, id, provider.ErrSnapshotInvalid, s.invalid)
	}
	if s.hasCursor && s.cursor > 0 {
		return fmt.Errorf("revert %s to %s: a backup cursor released part of it: %w", v.name, id, ErrReleased)
	}
	if !force { // the snapshots after s go with the revert
		var used []string
		for _, later := range v.snaps {
			if later.gen > s.gen {
				if users := v.snapshotUsers(later.gen); len(users) > 0 {
					used = append(used, fmt.Sprintf("%s@%s (%s)", v.name, later.id, strings.Join(users, ", ")))
				}
			}
		}
		if len(used) > 0 {
			return fmt.Errorf("revert %s to %s deletes the snapshots after it: %w: %s; detach their loop devices and disconnect their NBD clients, or revert with --force",
				v.name, id, ErrSnapshotInUse, strings.Join(used, "; "))
		}
	}
	for v.newest() != s {
		v.deleteLocked(v.newest(), true)
	}
	if v.log != nil {
		v.log.append(record{Type: recRevertBegin, Gen: s.gen})
		if err := v.log.flush(); err != nil {
			// Not begun: a restart must not finish it.
			if rerr := v.logSyncFailedLocked(err); rerr != nil {
				err = rerr
			}
			return fmt.Errorf("revert %s to %s: %w", v.name, id, err)
		}
	}
	return v.revertLocked(s)
}

// revertLocked copies s's preserved chunks back to the origin, then frees
// them. s is the newest snapshot; caller holds mu and the gate.
func (v *Volume) revertLocked(s *snap) error {
	buf := make([]byte, v.chunk)
	it := s.owned.Iterator()
	for it.HasNext() {
		c := uint64(it.Next())
		e, ok := v.entries.Get(entry{chunk: c, gen: s.gen})
		if !ok {
			continue
		}
		data := buf[:v.chunkLen(c)]
		if e.slot == zeroSlot {
			clear(data)
		} else if err := v.readChunkSlot(v.store, data, e.slot, 0); err != nil {
			return err
		}
		if _, err := v.origin.WriteAt(data, int64(c)<<v.shift); err != nil {
			return fmt.Errorf("write origin %s: %w", v.originPath, err)
		}
	}
	if err := v.origin.Sync(); err != nil {
		return fmt.Errorf("flush origin %s: %w", v.originPath, err)
	}
	v.finishRevert(s)
	if v.log != nil {
		v.log.append(record{Type: recRevertEnd, Gen: s.gen})
		if err := v.log.flush(); err != nil {
			// Done: a restart must not do it again over later writes.
			return v.logSyncFailedLocked(err)
		}
	}
	return nil
}

// finishRevert drops s's entries and tracking: the origin equals s now.
func (v *Volume) finishRevert(s *snap) {
	var freed []int64
	it := s.owned.Iterator()
	for it.HasNext() {
		c := uint64(it.Next())
		if e, ok := v.entries.Delete(entry{chunk: c, gen: s.gen}); ok && e.slot != zeroSlot {
			freed = append(freed, e.slot)
		}
	}
	s.owned.Clear()
	s.nonzero = 0
	// Every chunk is back to s's content: nothing changed since s, and
	// older snapshots differ from the origin exactly where they differed
	// from s. (Their sets must not grow: a newest snapshot's set also
	// says which chunks need no more preserving.)
	s.changed.Clear()
	v.freeSlots(freed)
}
