package cow

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/cespare/xxhash/v2"
)

// The volume's side of the metadata log (metalog.go has the file): what
// a checkpoint writes of the snapshots, how a replayed record changes
// them, and recovering them at open. All of it runs under Volume.mu or
// before the volume is shared.

// dropLog removes the metadata log once no persistent snapshot lives.
// Caller holds mu.
func (v *Volume) dropLog() {
	if v.log == nil {
		return
	}
	v.log.remove()
	v.log = nil
}

// checkpoint rewrites the log compactly: the snapshots from the oldest
// persistent one on, their entries, tracking bitmaps and cursors, and a
// CLEAN record when clean. Caller holds mu.
func (v *Volume) checkpoint(clean bool) error {
	buf, err := v.checkpointRecords(clean)
	if err != nil || buf == nil {
		return err
	}
	f, err := rewriteLog(v.fs, v.metaPath(), buf, func() error {
		if v.store == nil {
			return nil
		}
		if err := v.store.f.Sync(); err != nil {
			return fmt.Errorf("checkpoint: sync diff area %s: %w", v.storePath(), err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if v.log != nil {
		v.log.swap(f, int64(len(buf)))
	} else {
		v.log = newMetaLog(v.fs, v.metaPath(), f, int64(len(buf)))
	}
	return nil
}

// checkpointRecords returns the header and records of a checkpoint, nil
// when no persistent snapshot lives. Caller holds mu.
func (v *Volume) checkpointRecords(clean bool) ([]byte, error) {
	var minGen uint64
	for _, s := range v.snaps {
		if s.persistent {
			minGen = s.gen
			break
		}
	}
	if minGen == 0 {
		return nil, nil
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
			return nil, fmt.Errorf("checkpoint %s: encode tracking: %w", v.metaPath(), err)
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
	return buf, nil
}

// recover rebuilds the persistent snapshots from the diff area. Problems
// with the diff area are recorded in v.recovery and leave the origin
// usable; a diff area made for another chunk or volume size is refused.
func (v *Volume) recover() error {
	meta := v.metaPath()
	l, hdr, records, err := loadMetaLog(v.fs, meta, v.storePath())
	var lost *logLost
	switch {
	case errors.Is(err, errNoLog):
		// No persistent snapshot: what the store holds ended with the
		// last run.
		_ = v.fs.Remove(v.storePath())
		return nil
	case errors.As(err, &lost):
		v.recovery = append(v.recovery, lost)
		return nil
	case err != nil:
		return fmt.Errorf("open volume %s: %w", v.name, err)
	}
	if int64(hdr.ChunkSize) != v.chunk {
		l.f.Close()
		return fmt.Errorf("open volume %s: diff area %s was made with chunk size %d, not %d: open the volume with chunk size %d", v.name, meta, hdr.ChunkSize, v.chunk, hdr.ChunkSize)
	}
	if int64(hdr.VolSize) != v.size {
		l.f.Close()
		return fmt.Errorf("open volume %s: origin %s is %d bytes but diff area %s was made for %d bytes: a volume cannot change size while it has snapshots", v.name, v.originPath, v.size, meta, hdr.VolSize)
	}
	sf, err := v.fs.OpenFile(v.storePath(), os.O_RDWR, 0)
	storeMissing := errors.Is(err, fs.ErrNotExist)
	if err != nil && !storeMissing {
		l.f.Close()
		return fmt.Errorf("open volume %s: diff area %s: %w", v.name, v.storePath(), err)
	}
	if storeMissing {
		sf, err = v.fs.OpenFile(v.storePath(), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			l.f.Close()
			return fmt.Errorf("open volume %s: diff area %s: %w", v.name, v.storePath(), err)
		}
	}
	v.store = v.newStore(sf)
	v.log = l

	v.recovering = true
	clean, revert := replay(records, v.applyRecord)
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

// applyRecord applies one replayed log record to the snapshots and the
// mapping (see replay). Only recover calls it, before the volume is
// shared.
func (v *Volume) applyRecord(r record) {
	switch r.Type {
	case recSnapCreate:
		if v.snapByGen(r.Gen) != nil || (len(v.snaps) > 0 && r.Gen <= v.newest().gen) {
			return
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
			return
		}
		if r.Summed {
			if !v.slotHolds(r.Slot, r.Chunk, r.Sum) {
				// Its data did not reach the disk, so the origin write
				// that waited for it was never issued: the chunk is still
				// the origin's. (Or the slot was freed and reused later
				// in the log, which drops this entry anyway.)
				v.replayDropped++
				return
			}
			v.replayVerified++
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
	case recRevertEnd:
		if s := v.snapByGen(r.Gen); s != nil {
			v.finishRevert(s)
		}
	}
}

// slotHolds reports whether the diff area's slot holds chunk c's bytes
// with xxHash64 sum (replay of a MAP record written with its data; see
// record.Sum).
func (v *Volume) slotHolds(slot int64, c uint64, sum uint64) bool {
	b := make([]byte, v.chunkLen(c))
	if n, err := v.store.f.ReadAt(b, slot*v.chunk); n < len(b) || (err != nil && !errors.Is(err, io.EOF)) {
		return false
	}
	return xxhash.Sum64(b) == sum
}
