package backup

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/zeebo/blake3"
)

// VerifyReport names what verify found.
type VerifyReport struct {
	Packs      int      `json:"packs"`
	Chunks     int      `json:"chunks"`
	BadChunks  []string `json:"bad_chunks,omitempty"`
	BadImages  []string `json:"bad_images,omitempty"`
	BadIndexes []string `json:"bad_indexes,omitempty"`
	// BadPacks are packs whose bytes do not match their name (the
	// trailer or a blob is damaged), each with what is wrong.
	BadPacks   []string `json:"bad_packs,omitempty"`
	GoodImages int      `json:"good_images"`
	// Unreadable are images whose record the storage did not return
	// (not damaged as far as verify can tell: run it again).
	Unreadable []string `json:"unreadable_images,omitempty"`
	// Sample and Seed are the VerifyOptions of a sampled verify: Chunks
	// then counts the chunks checked, and GoodImages the images none of
	// whose checked chunks is damaged.
	Sample float64 `json:"sample,omitempty"`
	Seed   uint64  `json:"seed,omitempty"`
	// Checked are the images this verify checked: all of them, or those
	// VerifyOptions.Images named that the repository holds.
	Checked int `json:"checked_images"`
	// RecordError says why the verify states were not recorded
	// (VerifyOptions.Record): what verify found stands.
	RecordError string `json:"record_error,omitempty"`
}

// VerifyOptions choose what a verify checks.
type VerifyOptions struct {
	// Sample, above 0 and below 1, checks that fraction of the chunks
	// the images use, picked by Seed (the same seed picks the same
	// chunks), each read alone from its pack; packs are not checked
	// whole. 0 or 1 checks every chunk and every pack whole.
	Sample float64
	Seed   uint64
	// Images, when not nil, are the only images checked, by ID: the
	// chunks they use and the packs holding them (other packs are not
	// read). An ID the repository does not hold is ignored.
	Images []string
	// Record keeps what the verify found for each image it checked in
	// the repository (VerifyStates), stamped with Time (default: when
	// it ends). Not when the context ends first.
	Record bool
	Time   time.Time
}

// sampled reports whether a sampled verify is asked for.
func (o VerifyOptions) sampled() bool { return o.Sample > 0 && o.Sample < 1 }

// Picks reports whether a verify with these options checks chunk h:
// a hash of h and Seed below the fraction Sample of the hash space.
func (o VerifyOptions) Picks(h Hash) bool {
	if !o.sampled() {
		return true
	}
	x := binary.LittleEndian.Uint64(h[:8]) ^ o.Seed
	x ^= x >> 30 // splitmix64's finalizer: a seed changes every pick
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x < uint64(o.Sample*(1<<64))
}

// Verify re-hashes every chunk any image uses and names the images that
// a damaged or missing chunk breaks.
func (r *Repo) Verify() VerifyReport { return r.VerifyContext(context.Background(), nil) }

// VerifyContext is Verify with a context and progress (packs done, total).
func (r *Repo) VerifyContext(ctx context.Context, progress func(done, total int64)) VerifyReport {
	return r.VerifyWith(ctx, VerifyOptions{}, progress)
}

// VerifyWith is VerifyContext that checks what opts choose: a sample of
// the chunks, or all of them.
func (r *Repo) VerifyWith(ctx context.Context, opts VerifyOptions, progress func(done, total int64)) VerifyReport {
	var rep VerifyReport
	if opts.sampled() {
		rep.Sample, rep.Seed = opts.Sample, opts.Seed
	}
	if err := r.recheckIndexes(ctx); err != nil {
		rep.BadIndexes = append(rep.BadIndexes, err.Error())
	}
	r.mu.Lock()
	for _, e := range r.indexErrs {
		rep.BadIndexes = append(rep.BadIndexes, e.Error())
	}
	r.mu.Unlock()
	list, errs := r.images(ctx)
	var scope map[string]bool // nil: every image
	if opts.Images != nil {
		scope = make(map[string]bool, len(opts.Images))
		for _, id := range opts.Images {
			scope[id] = true
		}
		list = slices.DeleteFunc(list, func(x *Image) bool { return !scope[x.ID] })
	}
	var checked []string
	for _, x := range list {
		checked = append(checked, x.ID)
	}
	for _, e := range errs {
		if re, ok := e.(*RecordError); ok && scope != nil && !scope[re.ID] {
			continue
		}
		rep.BadIndexes = append(rep.BadIndexes, e.Error())
		if re, ok := e.(*RecordError); ok {
			if errors.Is(e, ErrCorrupt) {
				rep.BadImages = append(rep.BadImages, re.ID)
				checked = append(checked, re.ID)
			} else {
				rep.Unreadable = append(rep.Unreadable, re.ID)
			}
		}
	}
	// The chunks the images need, as positions in the index: a bit each
	// (a map of hashes took ~150 bytes a chunk); those no index names
	// apart (damage: as many as there are).
	idx, err := r.chunks.frozen()
	if err != nil {
		rep.BadIndexes = append(rep.BadIndexes, fmt.Sprintf("chunk index: %v", err))
		return rep
	}
	defer idx.unpin()
	r.mu.Lock()
	packs := slices.Clone(r.packs)
	r.mu.Unlock()
	page := make([]byte, runPage)
	indexFailed := false
	position := func(h Hash) (int, bool) {
		i, _, ok, err := idx.find(&h, page)
		if err != nil && !indexFailed {
			indexFailed = true // once, not for every chunk of the page
			rep.BadIndexes = append(rep.BadIndexes, fmt.Sprintf("chunk index: %v", err))
		}
		return int(i), ok
	}
	needed := newBitset(int(idx.n))
	missing := map[Hash]bool{}
	var usable []*Image
	seen := map[Hash]bool{} // shared segments already read whole
	var sb segBuf           // what the segments are read into, reused
	for _, x := range list {
		err := r.eachNewSegment(ctx, x, seen, &sb, func(_ int64, hs []Hash) error {
			for _, h := range hs {
				if h == (Hash{}) {
					continue
				}
				if i, ok := position(h); ok {
					if opts.Picks(h) {
						needed.set(i)
					}
				} else if !indexFailed { // else the index could not say
					missing[h] = true
				}
			}
			return nil
		})
		if err != nil {
			rep.BadIndexes = append(rep.BadIndexes, err.Error())
			rep.BadImages = append(rep.BadImages, x.ID)
			continue
		}
		usable = append(usable, x)
	}
	sb = segBuf{} // not held while the packs are checked (4 MiB)
	// The packs are checked a batch at a time, each pack in one read:
	// the positions of a batch's needed chunks (4 bytes each, at most
	// verifyBatch of them) are gathered in one pass over the index, so
	// that what verify holds does not grow with the repository (the
	// positions of all of them took 64 MiB at 16 Mi chunks). A chunk
	// found good is taken out of needed: what stays there is damaged or
	// missing.
	var it *runIter // its read buffer reused from pass to pass
	eachPos := func(fn func(int, indexEntry)) {
		it = idx.iterReusing(it)
		i := 0
		for e, ok := it.next(); ok; e, ok = it.next() {
			fn(i, e)
			i++
		}
		if it.err != nil {
			rep.BadIndexes = append(rep.BadIndexes, fmt.Sprintf("chunk index: %v", it.err))
		}
	}
	count := make([]int, len(packs)) // needed chunks in each pack
	nNeeded := 0
	eachPos(func(i int, e indexEntry) {
		if needed.has(i) {
			count[e.l.pack]++
			nNeeded++
		}
	})
	packNo := make(map[PackID]uint32, len(packs))
	var neededPacks []uint32 // in the order of their IDs
	for p, pid := range packs {
		packNo[pid] = uint32(p)
		if count[p] > 0 {
			neededPacks = append(neededPacks, uint32(p))
		}
	}
	sort.Slice(neededPacks, func(i, j int) bool { return string(packs[neededPacks[i]][:]) < string(packs[neededPacks[j]][:]) })
	// Every stored pack is checked whole against its name, the ones no
	// image needs too: a damaged trailer makes a pack impossible to
	// re-index should its index be lost. Not when sampling: a sample
	// reads the chunks it picks, not whole packs; nor when checking some
	// images: only the packs holding their chunks are read.
	var others []PackID
	if !opts.sampled() && scope == nil {
		if names, err := r.be.List(ctx, "packs/"); err != nil {
			rep.BadPacks = append(rep.BadPacks, fmt.Sprintf("list packs: %v", err))
		} else {
			for _, n := range names {
				if pid, ok := parsePackName(n); ok {
					if p, known := packNo[pid]; !known || count[p] == 0 {
						others = append(others, pid)
					}
				}
			}
		}
	}
	sort.Slice(others, func(i, j int) bool { return string(others[i][:]) < string(others[j][:]) })
	total := int64(len(neededPacks) + len(others))
	var mu sync.Mutex // guards needed, rep.BadPacks, rep.BadIndexes, done
	done := int64(0)
	// check checks the packs of a batch on every core; pos gives the
	// positions of a pack's needed chunks. Each worker's buffers are
	// kept from batch to batch: made again for each, a 16 Mi-chunk
	// verify (16 batches) let go of ~10 MiB of them 16 times, and the
	// collector's freed spans were 12 MiB more of its peak RSS than at
	// 1 Mi chunks (one batch; measured 2026-12-07).
	works := make([]*verifyWork, runtime.GOMAXPROCS(0))
	for i := range works {
		works[i] = &verifyWork{sum: r.hasher(), page: make([]byte, runPage)}
	}
	check := func(pids []PackID, pos func(PackID) []uint32) {
		next := make(chan PackID)
		var wg sync.WaitGroup
		for _, w := range works {
			wg.Add(1)
			go func() {
				defer wg.Done()
				page := w.page
				for pid := range next {
					ps := pos(pid)
					w.items = slices.Grow(w.items[:0], len(ps))[:len(ps)]
					for j, i := range ps {
						e, err := idx.entryAt(int64(i), page)
						if err != nil {
							mu.Lock()
							rep.BadIndexes = append(rep.BadIndexes, fmt.Sprintf("chunk index: %v", err))
							mu.Unlock()
						}
						w.items[j] = verifyItem{e: e, pos: i}
					}
					check := r.checkPack
					if opts.sampled() {
						check = r.checkBlobs
					}
					perr := check(ctx, pid, w)
					mu.Lock()
					if perr != nil {
						rep.BadPacks = append(rep.BadPacks, perr.Error())
					}
					for _, it := range w.items {
						if it.good {
							needed.clear(int(it.pos))
						}
					}
					done++
					if progress != nil {
						progress(done, total)
					}
					mu.Unlock()
				}
			}()
		}
		for _, p := range pids {
			next <- p
		}
		close(next)
		wg.Wait()
	}
	inBatch := make([]bool, len(packs))
	first := make([]int, len(packs)) // a batch pack's first place in order
	var order []uint32               // the positions of a batch's needed chunks, reused
	for len(neededPacks) > 0 {
		var batch []PackID
		n := 0
		for len(neededPacks) > 0 && (n == 0 || n+count[neededPacks[0]] <= verifyBatch) {
			p := neededPacks[0]
			neededPacks = neededPacks[1:]
			inBatch[p], first[p] = true, n
			n += count[p]
			batch = append(batch, packs[p])
		}
		order = slices.Grow(order[:0], n)[:n]
		fill := 0
		eachPos(func(i int, e indexEntry) {
			if p := e.l.pack; inBatch[p] && needed.has(i) && fill < n {
				order[first[p]] = uint32(i)
				first[p]++
				fill++
			}
		})
		// first[p] is now the end of p's positions; its start is the
		// end less its count.
		check(batch, func(pid PackID) []uint32 {
			p := packNo[pid]
			return order[first[p]-count[p] : first[p]]
		})
		for _, pid := range batch {
			inBatch[packNo[pid]] = false
		}
	}
	check(others, func(PackID) []uint32 { return nil })
	rep.Packs = int(total)
	sort.Strings(rep.BadPacks)
	rep.Chunks = nNeeded + len(missing)
	eachPos(func(i int, e indexEntry) {
		if needed.has(i) {
			rep.BadChunks = append(rep.BadChunks, e.h.String())
		}
	})
	for h := range missing {
		rep.BadChunks = append(rep.BadChunks, h.String())
	}
	sort.Strings(rep.BadChunks)
	if len(rep.BadChunks) == 0 {
		// Every chunk of every usable image was found and is good: no
		// need to read their lists again to say which ones are broken.
		rep.GoodImages += len(usable)
		usable = nil
	}
	for _, x := range usable {
		ok := true
		err := r.eachSegmentInto(ctx, x, &sb, func(_ int64, hs []Hash) error {
			for _, h := range hs {
				if h == (Hash{}) {
					continue
				}
				i, found := position(h)
				if found && !opts.Picks(h) {
					continue // not in the sample
				}
				if !found || needed.has(i) {
					ok = false
					return errStop
				}
			}
			return nil
		})
		if err != nil && err != errStop {
			ok = false
			rep.BadIndexes = append(rep.BadIndexes, err.Error())
		}
		if ok {
			rep.GoodImages++
		} else {
			rep.BadImages = append(rep.BadImages, x.ID)
		}
	}
	sort.Strings(rep.BadImages)
	rep.Checked = len(checked)
	if opts.Record && ctx.Err() == nil {
		bad := make(map[string]bool, len(rep.BadImages))
		for _, id := range rep.BadImages {
			bad[id] = true
		}
		if err := r.recordVerify(ctx, opts, checked, bad); err != nil {
			rep.RecordError = err.Error()
		}
	}
	return rep
}

var errStop = errors.New("stop")

// eachNewSegment is eachSegmentInto without the shared segments (format
// 5 on) that seen holds: read whole, unpatched, by an earlier call; it
// adds those it reads so. An incremental's unchanged segments are its
// parent's: verify read them (and looked up their chunks) once for
// each image, twice as often as needed for a full and an incremental.
func (r *Repo) eachNewSegment(ctx context.Context, x *Image, seen map[Hash]bool, sb *segBuf, fn func(first int64, hashes []Hash) error) error {
	if !x.Shared || x.Chunks != nil {
		return r.eachSegmentInto(ctx, x, sb, fn)
	}
	for k, sh := range x.Segments {
		_, patched := x.patched(k)
		if !patched && seen[sh] {
			continue
		}
		first, hs, err := r.segmentInto(ctx, x, k, sb)
		if err != nil {
			return err
		}
		if err := fn(first, hs); err != nil {
			return err
		}
		if !patched {
			seen[sh] = true
		}
	}
	return nil
}

// verifyBatch bounds the needed chunks of the packs verify checks
// together (4 bytes each); a variable: tests make it small.
var verifyBatch = 1 << 20

// verifyWork is what a verify worker checks packs with, reused from
// pack to pack so that what verify holds is a few buffers a worker,
// whatever the number or size of the packs: the chunks of the pack it
// checks (their index entries, their places in the index, whether each
// was found good), a buffer for a piece of a pack file or a blob as
// stored, and one for a blob opened (up to the largest blob, 4 MiB).
// A pool shared by the three uses grew every buffer in it
// to the largest use and kept up to five 4 MiB ones alive, and each
// pack allocated a map of its chunks' verdicts, their entries twice, a
// good part of verify's garbage.
type verifyWork struct {
	sum     func([]byte) Hash
	page    []byte // a page of the index
	items   []verifyItem
	buf     []byte
	scratch []byte
}

// verifyItem is a chunk a worker checks: its index entry, its position
// in the index, and whether it was found good.
type verifyItem struct {
	e    indexEntry
	pos  uint32
	good bool
}

// checkPack reads a pack whole, checks it against its name and its
// trailer, and checks the chunks w.items in it (their index entries:
// where they are is not looked up again), blob by blob: one opened
// blob in memory at a time (decrypted in place and decompressed into
// memory it reuses), not the whole pack opened. The error says what is
// wrong with the pack itself.
func (r *Repo) checkPack(ctx context.Context, pid PackID, w *verifyWork) error {
	if o, ok := r.be.(objectOpener); ok {
		return r.checkPackFile(ctx, o, pid, w)
	}
	b, err := r.be.Get(ctx, pid.name(), 0, -1)
	var perr error
	if err != nil {
		perr = fmt.Errorf("pack %s: %w", pid, err)
	} else {
		perr = r.checkPackBytes(pid, b)
	}
	r.checkChunks(w, func(l loc) ([]byte, error) {
		if err != nil {
			return nil, err
		}
		if int64(l.off)+int64(l.len) > int64(len(b)) {
			return nil, fmt.Errorf("pack %s: %w: blob at %d past its end", pid, ErrCorrupt, l.off)
		}
		return b[l.off : l.off+l.len], nil
	})
	return perr
}

// verifyPiece is how much of a pack file verify hashes at a time.
const verifyPiece = 1 << 20

// checkPackFile is checkPack for a pack in a file (a local repository):
// hashed a piece at a time, its trailer and the blobs of the chunks
// read as ranges, so that what a worker holds does not depend on the
// pack's size. Read whole, two workers held two packs (15 MiB each at
// 4 Mi chunks, up to the pack size of 16 MiB and more), and the
// collector's goal twice that: verify's peak grew with the packs.
func (r *Repo) checkPackFile(ctx context.Context, o objectOpener, pid PackID, w *verifyWork) error {
	f, size, err := o.openObject(ctx, pid.name())
	var perr error
	if err != nil {
		perr = fmt.Errorf("pack %s: %w", pid, err)
	} else {
		defer f.Close()
		perr = r.checkPackAt(pid, f, size, w)
	}
	r.checkChunks(w, func(l loc) ([]byte, error) {
		if err != nil {
			return nil, err
		}
		if int64(l.off)+int64(l.len) > size {
			return nil, fmt.Errorf("pack %s: %w: blob at %d past its end", pid, ErrCorrupt, l.off)
		}
		w.buf = slices.Grow(w.buf[:0], int(l.len))[:l.len]
		if _, err := f.ReadAt(w.buf, int64(l.off)); err != nil {
			return nil, fmt.Errorf("pack %s: blob at %d: %w", pid, l.off, err)
		}
		return w.buf, nil
	})
	return perr
}

// checkPackAt is checkPackBytes for a pack read through ra, of size
// bytes, a piece at a time into w.buf.
func (r *Repo) checkPackAt(pid PackID, ra io.ReaderAt, size int64, w *verifyWork) error {
	w.buf = slices.Grow(w.buf[:0], verifyPiece)[:verifyPiece]
	buf := w.buf
	h := blake3.New()
	for off := int64(0); off < size; {
		n, err := ra.ReadAt(buf[:min(int64(len(buf)), size-off)], off)
		if err != nil && !(err == io.EOF && off+int64(n) == size) {
			return fmt.Errorf("pack %s: read at %d: %w", pid, off, err)
		}
		h.Write(buf[:n])
		off += int64(n)
	}
	var got PackID
	h.Sum(got[:0])
	return packVerdict(pid, got, r.packTrailerAt(pid.name(), ra, size, w))
}

// packTrailerAt checks the trailer of pack name, read through ra (size
// bytes) into w.buf, as packTrailer does.
func (r *Repo) packTrailerAt(name string, ra io.ReaderAt, size int64, w *verifyWork) error {
	if size < 4 {
		return corrupt(name, "too short")
	}
	var lb [4]byte
	if _, err := ra.ReadAt(lb[:], size-4); err != nil {
		return fmt.Errorf("%s trailer: %w", name, err)
	}
	tl := int64(binary.LittleEndian.Uint32(lb[:]))
	if tl > size-4 {
		return corrupt(name, "trailer length exceeds the pack")
	}
	w.buf = slices.Grow(w.buf[:0], int(tl))[:tl]
	if _, err := ra.ReadAt(w.buf, size-4-tl); err != nil {
		return fmt.Errorf("%s trailer: %w", name, err)
	}
	_, _, err := r.sealedTrailer(name, w.buf, size-4-tl)
	return err
}

// checkBlobs checks the chunks w.items of a pack reading only their
// blobs, one range read each: a sampled verify's check, which leaves the
// rest of the pack unread. The error names the blobs that did not read.
func (r *Repo) checkBlobs(ctx context.Context, pid PackID, w *verifyWork) error {
	var perr error
	r.checkChunks(w, func(l loc) ([]byte, error) {
		b, err := r.be.Get(ctx, pid.name(), int64(l.off), int64(l.len))
		if err == nil && len(b) != int(l.len) {
			err = fmt.Errorf("%w: %d bytes read of %d", ErrCorrupt, len(b), l.len)
		}
		if err != nil && perr == nil {
			perr = fmt.Errorf("pack %s: blob at %d: %w", pid, l.off, err)
		}
		return b, err
	})
	return perr
}

// checkChunks checks the chunks w.items (which it sorts), blob by blob
// in pack order, and records in each whether it matched its hash. blob
// gives the stored bytes of the blob at l (an error: its chunks are
// bad); each blob is read and opened once, decrypted in place and
// decompressed into w.scratch.
func (r *Repo) checkChunks(w *verifyWork, blob func(l loc) ([]byte, error)) {
	items := w.items
	sort.Slice(items, func(i, j int) bool { return items[i].e.l.off < items[j].e.l.off })
	var group []byte
	var gerr error
	for i := range items {
		it := &items[i]
		if i == 0 || it.e.l.off != items[i-1].e.l.off {
			var b []byte
			if b, gerr = blob(it.e.l); gerr == nil {
				if group, gerr = r.openBlobInto(w.scratch, b); gerr == nil {
					w.scratch = group[:0]
				}
			}
		}
		if gerr != nil {
			it.good = false
			continue
		}
		_, cerr := chunkIn(it.e.h, it.e.l, group, w.sum)
		it.good = cerr == nil
	}
}

// checkPackBytes checks a stored pack against its name (the BLAKE3 of
// its bytes) and its trailer's envelope (length, CRC, layout).
func (r *Repo) checkPackBytes(pid PackID, b []byte) error {
	_, _, terr := r.packTrailer(pid.name(), b)
	return packVerdict(pid, blake3.Sum256(b), terr)
}

// packVerdict is the outcome of checking pack pid whose bytes hash to
// got and whose trailer check returned terr.
func packVerdict(pid, got PackID, terr error) error {
	if got != pid {
		if terr == nil {
			return fmt.Errorf("pack %s: %w: its bytes do not match its name (a blob is damaged; its trailer reads)", pid, ErrCorrupt)
		}
		return fmt.Errorf("pack %s: %w: its bytes do not match its name (%v)", pid, ErrCorrupt, terr)
	}
	if terr != nil {
		return fmt.Errorf("pack %s: %w", pid, terr)
	}
	return nil
}

// packTrailer decodes the trailer of pack name, whose bytes are b.
func (r *Repo) packTrailer(name string, b []byte) (ents []blobEntry, hashed bool, err error) {
	if len(b) < 4 {
		return nil, false, corrupt(name, "too short")
	}
	tl := int64(binary.LittleEndian.Uint32(b[len(b)-4:]))
	if tl > int64(len(b))-4 {
		return nil, false, corrupt(name, "trailer length exceeds the pack")
	}
	return r.sealedTrailer(name, b[int64(len(b))-4-tl:len(b)-4], int64(len(b))-4-tl)
}

// sealedTrailer opens and decodes a pack's trailer as stored, st; the
// blobs are the pack's first dataLen bytes.
func (r *Repo) sealedTrailer(name string, st []byte, dataLen int64) (ents []blobEntry, hashed bool, err error) {
	t, err := r.seal.open(nil, st)
	if err != nil {
		return nil, false, fmt.Errorf("%s trailer: %w", name, err)
	}
	ents, hashed, err = decodePackTrailer(t, dataLen)
	if err != nil {
		return nil, false, fmt.Errorf("%s: %w", name, err)
	}
	return ents, hashed, nil
}

// readTrailer reads the chunks a pack holds from the pack itself. A
// version 2 trailer gives their places only: each blob is opened and its
// chunks hashed; the chunks of a blob that does not open are left out.
func (r *Repo) readTrailer(ctx context.Context, name string) ([]blobEntry, error) {
	b, err := r.be.Get(ctx, name, 0, -1)
	if err != nil {
		return nil, err
	}
	ents, hashed, err := r.packTrailer(name, b)
	if err != nil || hashed {
		return ents, err
	}
	sum := r.hasher()
	var out []blobEntry
	for _, g := range blobGroups(ents) {
		group, err := r.openBlob(b[g[0].Off : g[0].Off+g[0].Len])
		for _, e := range g {
			if err == nil && uint64(e.RawOff)+uint64(e.Raw) <= uint64(len(group)) {
				e.Hash = sum(group[e.RawOff : e.RawOff+e.Raw])
				out = append(out, e)
			}
		}
	}
	return out, nil
}

// RepoStats describes a repository.
type RepoStats struct {
	Location    string  `json:"location"`
	Encryption  string  `json:"encryption"`
	Hash        string  `json:"hash"`
	HashBytes   int     `json:"hash_bytes"` // of the hash naming a chunk: 16 or 32
	ChunkSize   int     `json:"chunk_size"`
	Images      int     `json:"images"`
	Volumes     int     `json:"volumes"`
	ImageBytes  int64   `json:"image_bytes"` // sum of image sizes
	Chunks      int     `json:"chunks"`      // unique chunks stored
	Packs       int     `json:"packs"`
	RawBytes    int64   `json:"raw_bytes"`    // unique chunks, uncompressed
	StoredBytes int64   `json:"stored_bytes"` // unique chunks as stored
	DedupRatio  float64 `json:"dedup_ratio"`  // image bytes / stored bytes
	// Format is the repository's format version.
	Format int `json:"format"`
	// ListSegments counts the chunk-list segments the images name, and
	// ListObjects the objects holding them: fewer when images share
	// segments (format 5).
	ListSegments int `json:"list_segments"`
	ListObjects  int `json:"list_objects"`
	// Level is the zstd level new blobs get (fastest, default, better);
	// Encoder what compresses them in this binary: "c" (the reference
	// zstd, a cgo build) or "go".
	Level   string `json:"level"`
	Encoder string `json:"encoder"`
}

// Stats summarizes the repository.
func (r *Repo) Stats(ctx context.Context) RepoStats {
	st := RepoStats{Location: r.Location(), Encryption: r.cfg.Encryption, Hash: r.cfg.Hash, HashBytes: r.hashLen(), ChunkSize: r.cfg.ChunkSize, Level: r.cfg.Level, Encoder: r.enc.name()}
	list, _ := r.images(ctx)
	vols := map[string]bool{}
	for _, x := range list {
		st.ImageBytes += x.Size
		vols[x.Volume] = true
	}
	st.Images, st.Volumes = len(list), len(vols)
	st.Format = r.Config().Version
	shared := map[string]bool{}
	for _, x := range list {
		st.ListSegments += x.numSegments()
		if !x.Shared {
			st.ListObjects += x.numSegments()
		}
		x.sharedSegments(shared)
	}
	st.ListObjects += len(shared)
	r.mu.Lock()
	st.Packs = len(r.packs)
	blobs := map[blobKey]bool{}
	r.chunks.each(func(_ Hash, l loc) {
		st.Chunks++
		st.RawBytes += int64(l.raw)
		if k := (blobKey{l.pack, l.off}); !blobs[k] { // a blob holds many chunks
			blobs[k] = true
			st.StoredBytes += int64(l.len)
		}
	})
	r.mu.Unlock()
	if st.StoredBytes > 0 {
		st.DedupRatio = float64(st.ImageBytes) / float64(st.StoredBytes)
	}
	return st
}
