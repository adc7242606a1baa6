package backup

import (
	"context"
	"errors"
	"fmt"
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
// deleted; one new index names every good chunk and replaces all the
// old index objects; image records that are damaged are deleted. It
// holds an exclusive lock. With dryRun it changes nothing.
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
	// What the current index says of each pack: the fallback for a pack
	// whose trailer does not read.
	r.mu.Lock()
	indexed := map[PackID][]blobEntry{}
	r.chunks.each(func(h Hash, l loc) {
		pid := r.packs[l.pack]
		indexed[pid] = append(indexed[pid], blobEntry{Hash: h, Off: l.off, Len: l.len, RawOff: l.rawOff, Raw: l.raw})
	})
	r.mu.Unlock()
	good := map[Hash]bool{}
	var keepPacks []packBlobs
	type salvage struct {
		id   PackID
		data []byte // the damaged pack
		ents []blobEntry
	}
	var damaged []salvage
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
		ents := r.packChunks(n, b, indexed[pid])
		var fresh []blobEntry
		for _, e := range ents {
			if !good[e.Hash] {
				good[e.Hash] = true
				fresh = append(fresh, e)
			}
		}
		if r.checkPackBytes(pid, b) != nil {
			rep.DamagedPacks = append(rep.DamagedPacks, pid.String())
			damaged = append(damaged, salvage{pid, b, fresh})
			continue
		}
		if len(fresh) > 0 {
			keepPacks = append(keepPacks, packBlobs{ID: pid, Blobs: fresh})
		}
	}
	for _, bs := range indexed {
		for _, e := range bs {
			if !good[e.Hash] {
				rep.LostChunks++
			}
		}
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
				if h != (Hash{}) && !good[h] {
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
	for _, p := range keepPacks {
		rep.Chunks += len(p.Blobs)
	}
	for _, d := range damaged {
		rep.Chunks += len(d.ents)
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
		sort.Slice(d.ents, func(i, j int) bool {
			return d.ents[i].Off < d.ents[j].Off || d.ents[i].Off == d.ents[j].Off && d.ents[i].RawOff < d.ents[j].RawOff
		})
		for _, g := range blobGroups(d.ents) {
			group, err := r.openBlob(d.data[g[0].Off : g[0].Off+g[0].Len])
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
	all := append(keepPacks, up.done...)
	newIndex := "index/" + randomID()
	if err := r.be.Put(ctx, newIndex, wrapObject(r.seal.seal(nil, r.enc.encode(nil, encodeChunkIndex(all, r.hashLen()))))); err != nil {
		return rep, fmt.Errorf("repair: write index: %w", err)
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
	r.resetIndex([]string{newIndex})
	r.mu.Lock()
	r.addPacks(all)
	r.mu.Unlock()
	r.updateCache()
	return rep, r.be.Sync(ctx)
}

// packChunks lists the chunks of pack name (bytes b) that read and match
// their hashes: where its trailer says, or, when the trailer does not
// read, where the index said (indexed).
func (r *Repo) packChunks(name string, b []byte, indexed []blobEntry) []blobEntry {
	ents, _, err := r.packTrailer(name, b)
	if err != nil {
		ents = indexed
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
