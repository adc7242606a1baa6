package backup

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"
)

// Policy says which images prune keeps, per volume (restic's forget
// semantics): the newest Last images, and the newest image of each of the
// last Hourly hours, Daily days, Weekly ISO weeks and Monthly months that
// have one. An image kept by any rule is kept.
type Policy struct {
	Last, Hourly, Daily, Weekly, Monthly int
}

func (p Policy) empty() bool { return p == Policy{} }

// PruneReport says what prune did (or would do, with DryRun).
type PruneReport struct {
	DryRun        bool     `json:"dry_run"`
	Kept          []string `json:"kept"`
	Removed       []string `json:"removed"`
	PacksDeleted  int      `json:"packs_deleted"`
	PacksRepacked int      `json:"packs_repacked"`
	BytesFreed    int64    `json:"bytes_freed"`
	Recovered     int      `json:"packs_reindexed"` // packs found with no index naming them and still needed
}

// ErrNoPolicy: prune without any keep rule would delete every image.
var ErrNoPolicy = errors.New("no keep rule: give at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly")

// Select splits images (oldest first) into kept and removed by policy.
func (p Policy) Select(images []*Image) (keep, remove []*Image) {
	byVol := map[string][]*Image{}
	var vols []string
	for _, x := range images {
		if byVol[x.Volume] == nil {
			vols = append(vols, x.Volume)
		}
		byVol[x.Volume] = append(byVol[x.Volume], x)
	}
	kept := map[*Image]bool{}
	for _, v := range vols {
		list := byVol[v]
		rules := []struct {
			n   int
			key func(time.Time) string
		}{
			{p.Last, func(t time.Time) string { return t.Format(time.RFC3339Nano) }},
			{p.Hourly, func(t time.Time) string { return t.Format("2006-01-02T15") }},
			{p.Daily, func(t time.Time) string { return t.Format("2006-01-02") }},
			{p.Weekly, func(t time.Time) string { y, w := t.ISOWeek(); return fmt.Sprintf("%d-W%02d", y, w) }},
			{p.Monthly, func(t time.Time) string { return t.Format("2006-01") }},
		}
		for _, rule := range rules {
			left, last := rule.n, ""
			for i := len(list) - 1; i >= 0 && left > 0; i-- {
				k := rule.key(list[i].Created.Local())
				if k == last {
					continue
				}
				last = k
				kept[list[i]] = true
				left--
			}
		}
	}
	for _, x := range images {
		if kept[x] {
			keep = append(keep, x)
		} else {
			remove = append(remove, x)
		}
	}
	return keep, remove
}

// repackBelow: a pack whose live blobs are less than this fraction of it
// is rewritten; above, its dead blobs stay until more of it dies.
const repackBelow = 0.8

// Prune removes the images the policy does not keep, then collects
// garbage: packs no kept image needs are deleted, mostly-dead packs are
// rewritten, and one new index replaces the old ones. It holds an
// exclusive lock. Order makes every step crash-safe: image records go
// first; new packs and the new index are durable before old indexes go;
// packs are deleted last.
func (r *Repo) Prune(ctx context.Context, p Policy, dryRun bool) (PruneReport, error) {
	rep := PruneReport{DryRun: dryRun}
	if p.empty() {
		return rep, ErrNoPolicy
	}
	unlock, err := r.Lock(ctx, "prune", true)
	if err != nil {
		return rep, err
	}
	defer unlock()
	list, errs := r.images(ctx)
	if len(errs) > 0 {
		return rep, fmt.Errorf("prune %s: %w", r.Location(), unreadable(errs))
	}
	keep, remove := p.Select(list)
	for _, x := range keep {
		rep.Kept = append(rep.Kept, x.ID)
	}
	for _, x := range remove {
		rep.Removed = append(rep.Removed, x.ID)
	}
	if dryRun {
		return rep, nil
	}
	if err := r.removeImages(ctx, rep.Removed); err != nil {
		return rep, fmt.Errorf("prune: %w", err)
	}
	return rep, r.collect(ctx, keep, &rep)
}

// removeImages deletes images' records, makes that durable, then deletes
// their chunk lists: an image is gone once its record is, and a list
// left by a crash in between is collected later.
func (r *Repo) removeImages(ctx context.Context, ids []string) error {
	for _, id := range ids {
		if err := r.be.Delete(ctx, imageName(id)); err != nil {
			return fmt.Errorf("remove image %s: %w", id, err)
		}
	}
	if err := r.be.Sync(ctx); err != nil {
		return err
	}
	for _, id := range ids {
		r.deleteList(ctx, id)
	}
	r.forgetVerify(ctx, ids)
	return nil
}

// unreadable is the error for image records that stop a garbage
// collection (it cannot know which chunks they need). Only records that
// are damaged are offered for deletion; one that could not be fetched
// (the storage did not answer) is to be tried again.
func unreadable(errs []error) error {
	var damaged []string
	for _, e := range errs {
		var re *RecordError
		if errors.As(e, &re) && errors.Is(e, ErrCorrupt) {
			damaged = append(damaged, re.ID)
		}
	}
	msg := fmt.Sprintf("%d image records are unreadable (first: %v); not collecting garbage, which could delete what they need", len(errs), errs[0])
	if len(damaged) < len(errs) {
		msg += "; check that the repository's storage answers, and try again"
	}
	if len(damaged) > 0 {
		msg += fmt.Sprintf("; delete the damaged ones with `umbra images delete %s` if they cannot be repaired (`umbra verify` names every damaged image)", strings.Join(damaged, " "))
	}
	return errors.New(msg)
}

// Delete removes images ids — their records, even damaged ones, and
// their chunk lists — then collects garbage as Prune does, so the space
// only they used is freed. It holds an exclusive lock; an ID that is not
// in the repository is an error and nothing is deleted.
func (r *Repo) Delete(ctx context.Context, ids []string) (PruneReport, error) {
	var rep PruneReport
	for _, id := range ids {
		if !validImageID(id) {
			return rep, fmt.Errorf("image %q: not an image ID (see `umbra images list`)", id)
		}
	}
	unlock, err := r.Lock(ctx, "delete", true)
	if err != nil {
		return rep, err
	}
	defer unlock()
	for _, id := range ids {
		ok, err := r.be.Has(ctx, imageName(id))
		if err != nil {
			return rep, fmt.Errorf("image %s: %w", id, err)
		}
		if !ok {
			return rep, fmt.Errorf("image %s in %s: %w; nothing deleted", id, r.Location(), ErrNoImage)
		}
	}
	if err := r.removeImages(ctx, ids); err != nil {
		return rep, err
	}
	rep.Removed = append(rep.Removed, ids...)
	keep, errs := r.images(ctx)
	if len(errs) > 0 {
		return rep, fmt.Errorf("deleted %d images from %s, but %w", len(ids), r.Location(), unreadable(errs))
	}
	for _, x := range keep {
		rep.Kept = append(rep.Kept, x.ID)
	}
	return rep, r.collect(ctx, keep, &rep)
}

// collect is prune's garbage collection over the kept images, in
// memory that does not grow with the repository: the chunks the images
// need are bits at their places in the chunk index (a sorted run on
// disk), what each pack holds is summed in one pass over it, the blobs
// of the packs to repack are gathered a batch of packs at a time, and
// the new index is written as objects of at most indexEveryChunks
// entries straight from another pass.
func (r *Repo) collect(ctx context.Context, keep []*Image, rep *PruneReport) error {
	idx, err := r.chunks.frozen()
	if err != nil {
		return fmt.Errorf("prune: chunk index: %w; not collecting garbage", err)
	}
	defer idx.unpin()
	page := make([]byte, runPage)
	used := newBitset(int(idx.n))
	unindexed := map[Hash]bool{} // needed chunks no index names (a backup that died before its index)
	// Each shared segment is read once (an incremental's unchanged ones
	// are its parent's: 4096 read twice for a 1 TiB volume's full image
	// and incremental), into memory kept from segment to segment
	// (segBuf).
	seen := map[Hash]bool{}
	var sb segBuf
	for _, x := range keep {
		err := r.eachNewSegment(ctx, x, seen, &sb, func(_ int64, hs []Hash) error {
			for _, h := range hs {
				if h == (Hash{}) {
					continue
				}
				i, _, ok, err := idx.find(&h, page)
				if err != nil {
					return err
				}
				if ok {
					used.set(int(i))
				} else {
					unindexed[h] = true
				}
			}
			return nil
		})
		x.Chunks = nil // bounded memory: only the used set is kept
		if err != nil {
			return fmt.Errorf("prune: %w; not collecting garbage, which could delete what that image needs: "+
				"run `umbra verify`, and delete the image with `umbra images delete %s` if it cannot be repaired", err, x.ID)
		}
	}
	sb = segBuf{} // not held from here (4 MiB)
	isUsed := func(h Hash) (bool, error) {
		i, _, ok, err := idx.find(&h, page)
		if ok {
			return used.has(int(i)), err
		}
		return unindexed[h], err
	}
	r.mu.Lock()
	packs := slices.Clone(r.packs)
	oldIndexes := slices.Clone(r.indexes)
	r.mu.Unlock()
	// What each indexed pack holds, live and in all (chunk bytes,
	// uncompressed).
	type packStat struct {
		live, total int64
		n           int
	}
	stats := make([]packStat, len(packs))
	if err := eachAt(idx, func(i int, e indexEntry) {
		s := &stats[e.l.pack]
		s.n++
		s.total += int64(e.l.raw)
		if used.has(i) {
			s.live += int64(e.l.raw)
		}
	}); err != nil {
		return fmt.Errorf("prune: chunk index: %w; not collecting garbage", err)
	}
	packNo := make(map[PackID]uint32, len(packs))
	for p, pid := range packs {
		packNo[pid] = uint32(p)
	}
	// Every stored pack: indexed, or read through its trailer (a backup
	// that died before its index, or a damaged index).
	names, err := r.be.List(ctx, "packs/")
	if err != nil {
		return err
	}
	listedIndexes, _ := r.be.List(ctx, "index/") // the damaged ones too
	present := map[PackID]bool{}
	recovered := map[PackID][]blobEntry{}
	located := map[Hash]bool{} // unindexed chunks found in a trailer
	for _, n := range names {
		pid, ok := parsePackName(n)
		if !ok {
			continue
		}
		present[pid] = true
		if p, indexed := packNo[pid]; indexed && stats[p].n > 0 {
			continue
		}
		ents, err := r.readTrailer(ctx, n)
		if err != nil {
			continue // unreadable and unindexed: garbage
		}
		needed := false
		for _, e := range ents {
			if unindexed[e.Hash] && !located[e.Hash] {
				needed = true
				located[e.Hash] = true
			}
		}
		if needed {
			recovered[pid] = ents
			rep.Recovered++
		} else {
			size := objectSize(ctx, r.be, n, 0)
			if r.be.Delete(ctx, n) == nil {
				rep.PacksDeleted++
				rep.BytesFreed += size
			}
		}
	}
	// Decide per pack: keep, delete, or repack its live blobs.
	keepNo := make([]bool, len(packs))
	var keepRecovered []packBlobs
	var drop []PackID
	var repackNo []uint32
	var repackRecovered []packBlobs
	decide := func(live, total int64) int {
		switch {
		case live == 0:
			return -1
		case float64(live) < repackBelow*float64(total):
			return 0
		}
		return 1
	}
	for p, s := range stats {
		if s.n == 0 || !present[packs[p]] {
			continue // indexed but gone: its chunks are missing (verify says which images)
		}
		switch decide(s.live, s.total) {
		case -1:
			drop = append(drop, packs[p])
		case 0:
			repackNo = append(repackNo, uint32(p))
			drop = append(drop, packs[p])
		default:
			keepNo[p] = true
		}
	}
	for pid, bs := range recovered {
		sortBlobs(bs)
		var live, total int64
		for _, b := range bs {
			total += int64(b.Raw)
			if u, err := isUsed(b.Hash); err != nil {
				return fmt.Errorf("prune: chunk index: %w", err)
			} else if u {
				live += int64(b.Raw)
			}
		}
		switch decide(live, total) {
		case -1:
			drop = append(drop, pid)
		case 0:
			repackRecovered = append(repackRecovered, packBlobs{ID: pid, Blobs: bs})
			drop = append(drop, pid)
		default:
			keepRecovered = append(keepRecovered, packBlobs{ID: pid, Blobs: bs})
		}
	}
	// Copy live blobs verbatim (they are sealed on their own) into new packs.
	if err := r.upgradeFormat(ctx); err != nil {
		return fmt.Errorf("prune: %w", err)
	}
	up := r.newUploader(ctx)
	defer up.abort()
	var pend []byte // live chunks taken out of partly dead blobs
	var pendEnts []blobEntry
	flush := func() error {
		if len(pendEnts) == 0 {
			return nil
		}
		blob := r.seal.seal(nil, r.enc.encode(nil, pend))
		err := up.add(blob, pendEnts)
		pend, pendEnts = pend[:0], pendEnts[:0]
		return err
	}
	repackOne := func(p packBlobs, live map[Hash]bool) error {
		for _, g := range blobGroups(p.Blobs) {
			var keep []blobEntry
			for _, b := range g {
				if live[b.Hash] && !up.has(b.Hash) {
					keep = append(keep, b)
				}
			}
			if len(keep) == 0 {
				continue
			}
			blob, err := r.be.Get(ctx, p.ID.name(), int64(g[0].Off), int64(g[0].Len))
			if err != nil {
				return fmt.Errorf("prune: repack %s: %w", p.ID, err)
			}
			if len(keep) == len(g) { // wholly live: copy it as it is
				for _, b := range g {
					up.mark(b.Hash)
				}
				if err := up.add(blob, g); err != nil {
					return fmt.Errorf("prune: repack: %w", err)
				}
				continue
			}
			group, err := r.openBlob(blob)
			if err != nil {
				return fmt.Errorf("prune: repack %s: %w; run `umbra verify`", p.ID, err)
			}
			sum := r.hasher()
			for _, b := range keep {
				l := loc{rawOff: b.RawOff, raw: b.Raw}
				data, err := chunkIn(b.Hash, l, group, sum)
				if err != nil {
					return fmt.Errorf("prune: repack %s: %w; run `umbra verify`", p.ID, err)
				}
				if len(pend)+len(data) > groupRaw {
					if err := flush(); err != nil {
						return fmt.Errorf("prune: repack: %w", err)
					}
				}
				up.mark(b.Hash)
				pendEnts = append(pendEnts, blobEntry{Hash: b.Hash, RawOff: uint32(len(pend)), Raw: b.Raw})
				pend = append(pend, data...)
			}
		}
		rep.PacksRepacked++
		return nil
	}
	for _, p := range repackRecovered {
		live := map[Hash]bool{}
		for _, b := range p.Blobs {
			if u, _ := isUsed(b.Hash); u {
				live[b.Hash] = true
			}
		}
		if err := repackOne(p, live); err != nil {
			return err
		}
	}
	// The indexed packs to repack, a batch of at most repackBatch
	// entries at a time, each batch gathered in one pass over the index.
	for len(repackNo) > 0 {
		batch := map[uint32]*packBlobs{}
		n := 0
		for len(repackNo) > 0 && (n == 0 || n+stats[repackNo[0]].n <= repackBatch) {
			p := repackNo[0]
			repackNo = repackNo[1:]
			batch[p] = &packBlobs{ID: packs[p]}
			n += stats[p].n
		}
		live := map[Hash]bool{}
		if err := eachAt(idx, func(i int, e indexEntry) {
			if pb := batch[e.l.pack]; pb != nil {
				pb.Blobs = append(pb.Blobs, blobEntry{Hash: e.h, Off: e.l.off, Len: e.l.len, RawOff: e.l.rawOff, Raw: e.l.raw})
				if used.has(i) {
					live[e.h] = true
				}
			}
		}); err != nil {
			return fmt.Errorf("prune: chunk index: %w", err)
		}
		nums := slices.Sorted(maps.Keys(batch))
		for _, p := range nums {
			sortBlobs(batch[p].Blobs)
			if err := repackOne(*batch[p], live); err != nil {
				return err
			}
		}
	}
	if err := flush(); err != nil {
		return fmt.Errorf("prune: repack: %w", err)
	}
	if err := up.finishPacks(); err != nil {
		return fmt.Errorf("prune: %w", err)
	}
	// What is freed is what the packs shrink by: the packs deleted, less
	// the packs written for their live blobs.
	for _, p := range up.done {
		rep.BytesFreed -= objectSize(ctx, r.be, p.ID.name(), storedBytes(p.Blobs))
	}
	// The new index: every entry of the kept packs, then the new packs',
	// in objects of at most indexEveryChunks entries.
	var newIndexes []string
	oldGone := false
	writeIndex := func(ps []packBlobs) error {
		b := r.packObject(encodeChunkIndex(ps, r.hashLen()))
		name := "index/" + randomID()
		err := r.be.Put(ctx, name, b)
		if isNoSpace(err) {
			// A full filesystem: first what no kept image needs and
			// nothing names (chunk lists of removed images), then the
			// old index objects — should this process die before the
			// new ones are written, the packs stay, named by no index,
			// and the next prune or `umbra repo repair` indexes them
			// again from their trailers.
			r.deleteDeadLists(ctx, keep)
			if err = r.be.Put(ctx, name, b); isNoSpace(err) && !oldGone {
				for _, n := range append(oldIndexes, listedIndexes...) {
					if derr := r.be.Delete(ctx, n); derr != nil {
						return fmt.Errorf("prune: write index: %w; and removing old index %s to make room: %v", err, n, derr)
					}
				}
				oldGone = true
				err = r.be.Put(ctx, name, b)
			}
		}
		if err != nil {
			return fmt.Errorf("prune: write index: %w", err)
		}
		newIndexes = append(newIndexes, name)
		return nil
	}
	used, unindexed = nil, nil // not needed from here: let go before the writer's peak
	iw := &indexWriter{write: writeIndex, every: pruneIndexEvery}
	if err := eachAt(idx, func(_ int, e indexEntry) {
		if keepNo[e.l.pack] {
			iw.add(packs[e.l.pack], blobEntry{Hash: e.h, Off: e.l.off, Len: e.l.len, RawOff: e.l.rawOff, Raw: e.l.raw})
		}
	}); err != nil {
		return fmt.Errorf("prune: chunk index: %w", err)
	}
	for _, p := range append(keepRecovered, up.done...) {
		for _, b := range p.Blobs {
			iw.add(p.ID, b)
		}
	}
	if err := iw.finish(); err != nil {
		return err
	}
	if err := r.be.Sync(ctx); err != nil {
		return err
	}
	isNew := map[string]bool{}
	for _, n := range newIndexes {
		isNew[n] = true
	}
	for _, n := range append(oldIndexes, listedIndexes...) {
		if !isNew[n] {
			if err := r.be.Delete(ctx, n); err != nil {
				return fmt.Errorf("prune: remove old index %s: %w", n, err)
			}
		}
	}
	if err := r.be.Sync(ctx); err != nil {
		return err
	}
	for _, pid := range drop {
		size := objectSize(ctx, r.be, pid.name(), storedBytes(recovered[pid]))
		if err := r.be.Delete(ctx, pid.name()); err != nil {
			return fmt.Errorf("prune: remove pack %s: %w", pid, err)
		}
		rep.PacksDeleted++
		rep.BytesFreed += size
	}
	r.deleteDeadLists(ctx, keep)
	// The index is now the new objects: read again (and the local cache
	// written again to cover them).
	r.resetIndex(nil)
	if err := r.loadIndexNames(ctx, newIndexes); err != nil {
		return fmt.Errorf("prune: read the new index: %w", err)
	}
	r.mu.Lock()
	ierr := errors.Join(r.indexErrs...)
	r.mu.Unlock()
	if ierr != nil {
		return fmt.Errorf("prune: read the new index: %w; open the repository again", ierr)
	}
	r.updateCache()
	return r.be.Sync(ctx)
}

// pruneIndexEvery is how many entries each index object prune writes
// holds at most: what prune holds to write one (its entries, encoded,
// compressed) was the peak of its heap, ~20 MiB at 128 Ki entries, the
// size a backup writes; a quarter of that is 1.1 MiB stored, 512
// objects at 16 Mi chunks. (A variable: tests change it.)
var pruneIndexEvery = 1 << 15

// repackBatch bounds the index entries of the packs repacked together.
var repackBatch = 1 << 18

// eachAt calls fn for every entry of the run with its position.
func eachAt(ru *run, fn func(int, indexEntry)) error {
	it := ru.iter()
	i := 0
	for e, ok := it.next(); ok; e, ok = it.next() {
		fn(i, e)
		i++
	}
	return it.err
}

// sortBlobs orders a pack's entries by place.
func sortBlobs(bs []blobEntry) {
	sort.Slice(bs, func(i, j int) bool {
		return bs[i].Off < bs[j].Off || bs[i].Off == bs[j].Off && bs[i].RawOff < bs[j].RawOff
	})
}

// indexWriter cuts entries into index objects of at most
// indexEveryChunks entries, each listing its packs' entries by place.
// Its entries' memory is kept from object to object: a map of a slice
// for each pack, grown by appending, was made again for every object
// (128 of 128 Ki entries at 16 Mi chunks), ~6 MiB each and as much
// again let go as the slices grew.
type indexWriter struct {
	write func([]packBlobs) error
	every int               // entries an object (0: indexEveryChunks)
	pids  []PackID          // the packs of the entries so far
	pidNo map[PackID]uint32 // their places in pids
	nos   []uint32          // each entry's pack, as a place in pids
	bs    []blobEntry
	rank  []uint32 // each pack's place in ID order (flush)
	ps    []packBlobs
	err   error
}

func (w *indexWriter) add(pid PackID, b blobEntry) {
	if w.err != nil {
		return
	}
	if w.pidNo == nil {
		w.pidNo = map[PackID]uint32{}
	}
	no, ok := w.pidNo[pid]
	if !ok {
		no = uint32(len(w.pids))
		w.pids = append(w.pids, pid)
		w.pidNo[pid] = no
	}
	w.nos = append(w.nos, no)
	w.bs = append(w.bs, b)
	if every := cmp.Or(w.every, indexEveryChunks); len(w.bs) >= every {
		w.err = w.flush()
	}
}

// byPackPlace orders an indexWriter's entries by pack ID, then place.
type byPackPlace struct{ w *indexWriter }

func (o byPackPlace) Len() int { return len(o.w.bs) }
func (o byPackPlace) Swap(i, j int) {
	w := o.w
	w.nos[i], w.nos[j] = w.nos[j], w.nos[i]
	w.bs[i], w.bs[j] = w.bs[j], w.bs[i]
}
func (o byPackPlace) Less(i, j int) bool {
	w := o.w
	if a, b := w.rank[w.nos[i]], w.rank[w.nos[j]]; a != b {
		return a < b
	}
	x, y := &w.bs[i], &w.bs[j]
	return x.Off < y.Off || x.Off == y.Off && x.RawOff < y.RawOff
}

func (w *indexWriter) flush() error {
	if len(w.bs) == 0 {
		return nil
	}
	order := make([]uint32, len(w.pids)) // a few hundred packs
	for i := range order {
		order[i] = uint32(i)
	}
	slices.SortFunc(order, func(a, b uint32) int { return bytes.Compare(w.pids[a][:], w.pids[b][:]) })
	w.rank = slices.Grow(w.rank[:0], len(order))[:len(order)]
	for r, no := range order {
		w.rank[no] = uint32(r)
	}
	sort.Sort(byPackPlace{w})
	ps := w.ps[:0]
	for i := 0; i < len(w.bs); {
		j := i + 1
		for j < len(w.bs) && w.nos[j] == w.nos[i] {
			j++
		}
		ps = append(ps, packBlobs{ID: w.pids[w.nos[i]], Blobs: w.bs[i:j]})
		i = j
	}
	err := w.write(ps)
	clear(ps)
	w.ps = ps[:0]
	w.pids, w.nos, w.bs = w.pids[:0], w.nos[:0], w.bs[:0]
	clear(w.pidNo)
	return err
}

// finish writes what is left.
func (w *indexWriter) finish() error {
	if w.err != nil {
		return w.err
	}
	return w.flush()
}

// deleteDeadLists deletes the chunk lists no image in keep names.
func (r *Repo) deleteDeadLists(ctx context.Context, keep []*Image) {
	// Chunk lists whose image record is gone (a backup or prune that
	// died): lists/ID (format 2) and lists/ID/NNNNNN (format 3 on).
	if lists, err := r.be.List(ctx, "lists/"); err == nil {
		gone := map[string]bool{}
		for _, n := range lists {
			id, _, _ := strings.Cut(strings.TrimPrefix(n, "lists/"), "/")
			g, seen := gone[id]
			if !seen {
				ok, err := r.be.Has(ctx, imageName(id))
				g = err == nil && !ok
				gone[id] = g
			}
			if g {
				r.be.Delete(ctx, n)
			}
		}
	}
	// Shared chunk-list segments (format 5) that no listed image names:
	// only removed images used them, or a backup died before its record.
	if segs, err := r.be.List(ctx, "segments/"); err == nil {
		used := map[string]bool{}
		for _, x := range keep {
			x.sharedSegments(used)
		}
		for _, n := range segs {
			if !used[n] {
				r.be.Delete(ctx, n)
			}
		}
	}
}

// storedBytes sums the distinct blobs of entries sorted by offset.
func storedBytes(bs []blobEntry) int64 {
	var n int64
	for _, g := range blobGroups(bs) {
		n += int64(g[0].Len)
	}
	return n
}

// blobGroups splits entries sorted by offset into runs sharing a blob
// (the same offset and length).
func blobGroups(bs []blobEntry) [][]blobEntry {
	var out [][]blobEntry
	for i := 0; i < len(bs); {
		j := i + 1
		for j < len(bs) && bs[j].Off == bs[i].Off && bs[j].Len == bs[i].Len {
			j++
		}
		out = append(out, bs[i:j])
		i = j
	}
	return out
}

func parsePackName(n string) (PackID, bool) {
	var pid PackID
	s := n[strings.LastIndexByte(n, '/')+1:]
	if len(s) != 64 {
		return pid, false
	}
	for i := 0; i < 32; i++ {
		var v byte
		for _, c := range s[2*i : 2*i+2] {
			switch {
			case c >= '0' && c <= '9':
				v = v<<4 | byte(c-'0')
			case c >= 'a' && c <= 'f':
				v = v<<4 | byte(c-'a'+10)
			default:
				return pid, false
			}
		}
		pid[i] = v
	}
	return pid, true
}
