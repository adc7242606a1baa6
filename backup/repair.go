package backup

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"sort"
)

// RepairReport says what repair found and did (or, DryRun, would do).
type RepairReport struct {
	DryRun bool `json:"dry_run"`
	// Packs is how many packs were read, Chunks how many chunks the new
	// index names (each checked against its hash).
	Packs  int `json:"packs"`
	Chunks int `json:"chunks"`
	// DamagedPacks do not match their names (a damaged trailer or blob):
	// their chunks that still read were written into new packs and the
	// packs deleted.
	DamagedPacks []string `json:"damaged_packs,omitempty"`
	PacksWritten int      `json:"packs_written"`
	// LostChunks could not be read from any pack.
	LostChunks int `json:"lost_chunks"`
	// IndexesReplaced are the index objects the new one replaced (the
	// damaged ones among them).
	IndexesReplaced []string `json:"indexes_replaced,omitempty"`
	// RemovedRecords are images whose record was damaged: deleted.
	RemovedRecords []string `json:"removed_records,omitempty"`
	// BrokenImages need chunks no pack holds (or a chunk list that does
	// not read): they stay, named here; a backup that stores the same
	// data again mends them, else delete them with `umbra images delete`.
	BrokenImages []string `json:"broken_images,omitempty"`
}

// Repair rebuilds the repository's index from its packs, as restic's
// `repair index` does, and drops what cannot be read, naming the images
// it breaks: every pack is read whole and each chunk it holds is hashed
// (a pack's trailer says where they are; a pack whose trailer does not
// read is taken from the index entries that name it); the chunks of a
// damaged pack that still read are written into new packs and the pack
// deleted; a new index (objects of at most indexEveryChunks entries)
// names every good chunk and replaces all the old index objects; image
// records that are damaged are deleted. Memory does not grow with the
// repository: the chunks found are kept in a chunk store on disk, and
// one pack is in memory at a time. It holds an exclusive lock. With
// dryRun it changes nothing.
func (r *Repo) Repair(ctx context.Context, dryRun bool) (RepairReport, error) {
	rep := RepairReport{DryRun: dryRun}
	unlock, err := r.Lock(ctx, "repair", true)
	if err != nil {
		return rep, err
	}
	defer unlock()
	names, err := r.be.List(ctx, "packs/")
	if err != nil {
		return rep, fmt.Errorf("repair %s: %w", r.Location(), err)
	}
	// What the current index says of a pack is the fallback for a pack
	// whose trailer does not read: read from the index (one pass over it)
	// for such a pack only.
	old, err := r.chunks.frozen()
	if err != nil {
		return rep, fmt.Errorf("repair: chunk index: %w; run `umbra repo repair` again", err)
	}
	defer old.unpin()
	r.mu.Lock()
	oldNo := maps.Clone(r.packIdx)
	r.mu.Unlock()
	indexed := func(pid PackID) []blobEntry {
		p, ok := oldNo[pid]
		if !ok {
			return nil
		}
		var out []blobEntry
		eachAt(old, func(_ int, e indexEntry) { // an error: nothing more to fall back on
			if e.l.pack == p {
				out = append(out, blobEntry{Hash: e.h, Off: e.l.off, Len: e.l.len, RawOff: e.l.rawOff, Raw: e.l.raw})
			}
		})
		return out
	}
	// The chunks that read, each at its first place, in a chunk store of
	// their own (on disk, bounded memory: a map of them took ~400 MiB at
	// 1 Mi chunks), numbering the packs in newPacks.
	found := newChunkStore(r.hashLen(), r.chunks.tmpDir)
	defer found.close()
	found.filtGrow = true
	defer found.useFilter()() // every chunk of every pack is looked up
	var newPacks []PackID
	type salvage struct {
		id   PackID
		ents []blobEntry // its chunks that read and are nowhere before
	}
	var damaged []salvage
	isDamaged := map[uint32]bool{} // numbers in newPacks of the damaged packs
	for _, n := range names {
		pid, ok := parsePackName(n)
		if !ok {
			continue
		}
		rep.Packs++
		b, err := r.be.Get(ctx, n, 0, -1)
		if err != nil {
			return rep, fmt.Errorf("repair: read pack %s: %w; check the storage and try again", pid, err)
		}
		ents := r.packChunks(n, b, func() []blobEntry { return indexed(pid) })
		p := uint32(len(newPacks))
		newPacks = append(newPacks, pid)
		var fresh []blobEntry
		es := make([]indexEntry, 0, len(ents))
		seen := make(map[Hash]bool, len(ents))
		for _, e := range ents {
			if _, known := found.get(e.Hash); known || seen[e.Hash] {
				continue
			}
			seen[e.Hash] = true
			fresh = append(fresh, e)
			es = append(es, e.entry(p))
		}
		found.addMany(es)
		if err := found.failed(); err != nil {
			return rep, fmt.Errorf("repair: %w; check the free space of %s and try again", err, cmp.Or(r.chunks.tmpDir, os.TempDir()))
		}
		if r.checkPackBytes(pid, b) != nil {
			rep.DamagedPacks = append(rep.DamagedPacks, pid.String())
			damaged = append(damaged, salvage{pid, fresh})
			isDamaged[p] = true
		}
	}
	if err := eachAt(old, func(_ int, e indexEntry) {
		if _, ok := found.get(e.h); !ok {
			rep.LostChunks++
		}
	}); err != nil {
		return rep, fmt.Errorf("repair: chunk index: %w; run `umbra repo repair` again", err)
	}
	good := func(h Hash) bool {
		_, ok := found.get(h)
		return ok
	}
	list, errs := r.images(ctx)
	for _, e := range errs {
		var re *RecordError
		if !errors.As(e, &re) || !errors.Is(e, ErrCorrupt) {
			return rep, fmt.Errorf("repair: %w; check that the storage answers and try again", e)
		}
		rep.RemovedRecords = append(rep.RemovedRecords, re.ID)
	}
	for _, x := range list {
		err := r.eachSegment(ctx, x, func(_ int64, hs []Hash) error {
			for _, h := range hs {
				if h != (Hash{}) && !good(h) {
					return errStop
				}
			}
			return nil
		})
		if err != nil {
			rep.BrokenImages = append(rep.BrokenImages, x.ID)
		}
	}
	sort.Strings(rep.BrokenImages)
	r.mu.Lock()
	oldIndexes := append([]string(nil), r.indexes...)
	r.mu.Unlock()
	listedIndexes, err := r.be.List(ctx, "index/") // the damaged ones too
	if err != nil {
		return rep, fmt.Errorf("repair: %w", err)
	}
	seen := map[string]bool{}
	for _, n := range append(oldIndexes, listedIndexes...) {
		if !seen[n] {
			seen[n] = true
			rep.IndexesReplaced = append(rep.IndexesReplaced, n)
		}
	}
	rep.Chunks = found.len()
	if err := found.failed(); err != nil {
		return rep, fmt.Errorf("repair: %w; check the free space of %s and try again", err, cmp.Or(r.chunks.tmpDir, os.TempDir()))
	}
	if dryRun {
		return rep, nil
	}

	// The chunks of damaged packs that read go into new packs.
	if err := r.upgradeFormat(ctx); err != nil {
		return rep, fmt.Errorf("repair: %w", err)
	}
	up := r.newUploader(ctx)
	defer up.abort()
	var pend []byte
	var pendEnts []blobEntry
	flush := func() error {
		if len(pendEnts) == 0 {
			return nil
		}
		err := up.add(r.seal.seal(nil, r.enc.encode(nil, pend)), pendEnts)
		pend, pendEnts = pend[:0], pendEnts[:0]
		return err
	}
	sum := r.hasher()
	for _, d := range damaged {
		data, err := r.be.Get(ctx, d.id.name(), 0, -1) // one damaged pack in memory at a time
		if err != nil {
			return rep, fmt.Errorf("repair: read pack %s: %w; check the storage and try again", d.id, err)
		}
		sortBlobs(d.ents)
		for _, g := range blobGroups(d.ents) {
			group, err := r.openBlob(data[g[0].Off : g[0].Off+g[0].Len])
			if err != nil {
				return rep, fmt.Errorf("repair: pack %s: %w", d.id, err) // it opened a moment ago
			}
			for _, e := range g {
				data, err := chunkIn(e.Hash, loc{rawOff: e.RawOff, raw: e.Raw}, group, sum)
				if err != nil {
					return rep, fmt.Errorf("repair: pack %s: %w", d.id, err)
				}
				if len(pend)+len(data) > groupRaw {
					if err := flush(); err != nil {
						return rep, fmt.Errorf("repair: %w", err)
					}
				}
				pendEnts = append(pendEnts, blobEntry{Hash: e.Hash, RawOff: uint32(len(pend)), Raw: e.Raw})
				pend = append(pend, data...)
			}
		}
	}
	if err := flush(); err != nil {
		return rep, fmt.Errorf("repair: %w", err)
	}
	if err := up.finishPacks(); err != nil {
		return rep, fmt.Errorf("repair: %w", err)
	}
	rep.PacksWritten = len(up.done)
	// The new index: every chunk found in a pack kept, then the new
	// packs', in objects of at most indexEveryChunks entries.
	var newIndexes []string
	iw := &indexWriter{write: func(ps []packBlobs) error {
		name := "index/" + randomID()
		if err := r.be.Put(ctx, name, wrapObject(r.seal.seal(nil, r.enc.encode(nil, encodeChunkIndex(ps, r.hashLen()))))); err != nil {
			return fmt.Errorf("repair: write index: %w", err)
		}
		newIndexes = append(newIndexes, name)
		return nil
	}}
	if err := found.each(func(h Hash, l loc) {
		if !isDamaged[l.pack] {
			iw.add(newPacks[l.pack], blobEntry{Hash: h, Off: l.off, Len: l.len, RawOff: l.rawOff, Raw: l.raw})
		}
	}); err != nil {
		return rep, fmt.Errorf("repair: %w", err)
	}
	for _, p := range up.done {
		for _, b := range p.Blobs {
			iw.add(p.ID, b)
		}
	}
	if err := iw.finish(); err != nil {
		return rep, err
	}
	if err := r.be.Sync(ctx); err != nil {
		return rep, fmt.Errorf("repair: %w", err)
	}
	for _, n := range rep.IndexesReplaced {
		if err := r.be.Delete(ctx, n); err != nil {
			return rep, fmt.Errorf("repair: remove old index %s: %w", n, err)
		}
	}
	if err := r.be.Sync(ctx); err != nil {
		return rep, fmt.Errorf("repair: %w", err)
	}
	written := map[PackID]bool{}
	for _, p := range up.done {
		written[p.ID] = true
	}
	for _, d := range damaged {
		if written[d.id] {
			continue // rewritten byte for byte as it was before the damage
		}
		if err := r.be.Delete(ctx, d.id.name()); err != nil {
			return rep, fmt.Errorf("repair: remove damaged pack %s: %w", d.id, err)
		}
	}
	for _, id := range rep.RemovedRecords {
		if err := r.be.Delete(ctx, imageName(id)); err != nil {
			return rep, fmt.Errorf("repair: remove damaged record of image %s: %w", id, err)
		}
		r.deleteList(ctx, id)
	}
	// The index is now the new objects: read again (and the local cache
	// written again to cover them).
	r.resetIndex(nil)
	if err := r.loadIndexNames(ctx, newIndexes); err != nil {
		return rep, fmt.Errorf("repair: read the new index: %w", err)
	}
	r.mu.Lock()
	ierr := errors.Join(r.indexErrs...)
	r.mu.Unlock()
	if ierr != nil {
		return rep, fmt.Errorf("repair: read the new index: %w; open the repository again", ierr)
	}
	r.updateCache()
	return rep, r.be.Sync(ctx)
}

// packChunks lists the chunks of pack name (bytes b) that read and match
// their hashes: where its trailer says, or, when the trailer does not
// read, where the index says (indexed).
func (r *Repo) packChunks(name string, b []byte, indexed func() []blobEntry) []blobEntry {
	ents, _, err := r.packTrailer(name, b)
	if err != nil {
		ents = indexed()
	}
	for _, e := range ents {
		if int64(e.Off)+int64(e.Len) > int64(len(b)) {
			ents = nil // a trailer that decodes checks this; the index may not
			break
		}
	}
	sorted := append([]blobEntry(nil), ents...)
	sort.Slice(sorted, func(i, j int) bool {
		return sorted[i].Off < sorted[j].Off || sorted[i].Off == sorted[j].Off && sorted[i].RawOff < sorted[j].RawOff
	})
	sum := r.hasher()
	var out []blobEntry
	for _, g := range blobGroups(sorted) {
		group, err := r.openBlob(b[g[0].Off : g[0].Off+g[0].Len])
		if err != nil {
			continue
		}
		for _, e := range g {
			if uint64(e.RawOff)+uint64(e.Raw) > uint64(len(group)) {
				continue
			}
			h := sum(group[e.RawOff : e.RawOff+e.Raw])
			if e.Hash != (Hash{}) && e.Hash != h {
				continue // a version 1 trailer's or the index's hash: the chunk is damaged
			}
			e.Hash = h
			out = append(out, e)
		}
	}
	return out
}
