package backup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/zeebo/blake3"
)

// An image is its chunk list and images/ID, a small sealed JSON record
// of the image that names the list's hashes. The list is cut into
// segments of SegmentChunks chunks (Image.EncodeChunkList, sealed), written while
// the backup runs, so neither a backup nor a restore holds more than a
// segment of it. Format 5 names a segment by the repository's chunk
// hash of its plain encoding, segments/HH/HASH, with nothing of the
// image in it: an incremental whose changes fall in a few segments
// stores only those (a full list costs 32 bytes per non-zero chunk, 8
// GiB per image of a volume holding 1 TiB), and images share the rest.
// Format 3 wrote lists/ID/NNNNNN per image; format 2 one object,
// lists/ID. The record is written last, so an image is listed only when
// it is whole.

// segmentChunks is how many chunks a segment of a chunk list covers:
// 65536 (256 MiB of volume at 4 KiB chunks, at most 2 MiB stored). (A
// variable: tests make segments small.)
var segmentChunks int64 = 1 << 16

func segmentName(id string, k int) string { return fmt.Sprintf("lists/%s/%06d", id, k) }

// segmentVersion is the version of the shared segments this repository
// holds: 4 with 16-byte hashes, else 3.
func (r *Repo) segmentVersion() uint16 {
	if r.hashLen() == 16 {
		return 4
	}
	return 3
}

// sharedSegmentName names a format-5 segment by its hash.
func sharedSegmentName(h Hash) string { s := h.String(); return "segments/" + s[:2] + "/" + s }

// writeImage makes the image's chunk list (written by a listWriter)
// durable, then writes its record.
func (r *Repo) writeImage(ctx context.Context, x *Image) error {
	if err := r.be.Sync(ctx); err != nil {
		return err
	}
	rec, _ := json.Marshal(x)
	if err := r.putObject(ctx, imageName(x.ID), rec); err != nil {
		return err
	}
	return r.be.Sync(ctx)
}

// listWriter writes an image's chunk list segment by segment as the
// backup hands it the chunks' hashes in order.
type listWriter struct {
	r      *Repo
	x      *Image
	parent *Image // when set, a changed segment may be stored as a patch of the parent's
	pbuf   []Hash // the parent's hashes of the chunks in buf
	sum    func([]byte) Hash
	buf    []Hash
	// changed: the chunks of the segment being written that an
	// incremental read, as places in it (addChanged); the others are
	// the parent's.
	changed []patchEntry
	first   int64
	bytes   int64 // stored
}

func (r *Repo) newListWriter(x *Image) *listWriter {
	x.SegmentChunks, x.Shared = segmentChunks, true
	return &listWriter{r: r, x: x, sum: r.hasher()}
}

// add appends the next chunks' hashes, and with a parent, the parent's
// hashes of the same chunks.
func (w *listWriter) add(ctx context.Context, hs, prevs []Hash) error {
	if w.buf == nil && len(hs) > 0 {
		// Made at the first chunks added, not before: an incremental
		// that patches or reuses every segment never needs it (2 MiB).
		w.buf = make([]Hash, 0, min(w.x.SegmentChunks, w.x.NumChunks()))
	}
	for len(hs) > 0 {
		n := min(len(hs), int(w.x.SegmentChunks)-len(w.buf))
		w.buf = append(w.buf, hs[:n]...)
		hs = hs[n:]
		if w.parent != nil {
			w.pbuf = append(w.pbuf, prevs[:n]...)
			prevs = prevs[n:]
		}
		if int64(len(w.buf)) == w.x.SegmentChunks {
			if err := w.flush(ctx); err != nil {
				return err
			}
		}
	}
	return nil
}

// flush writes the segment collected so far.
func (w *listWriter) flush(ctx context.Context) error {
	if len(w.buf) == 0 {
		return nil
	}
	if w.parent != nil {
		done, err := w.flushPatch(ctx)
		if err != nil || done {
			return err
		}
	}
	return w.writeBase(ctx)
}

// writeBase writes the segment collected as a segment of its own (a
// base), and moves on.
func (w *listWriter) writeBase(ctx context.Context) error {
	x := w.x
	// Nothing of the image in the segment, so that another image with the
	// same chunks there has the same segment.
	seg := &Image{Size: x.Size, ChunkSize: x.ChunkSize, Created: time.Unix(0, 0), Chunks: w.buf, First: w.first, format: w.r.segmentVersion()}
	plain := seg.EncodeChunkList()
	h := w.sum(plain)
	if err := w.store(ctx, sharedSegmentName(h), plain); err != nil {
		return err
	}
	w.next(h, Hash{}, int64(len(w.buf)))
	return nil
}

// store seals plain and stores it as name, unless name is stored
// already: one stored by an earlier image, or by a backup that died
// after storing it, is whole (a Put is atomic), and its name is the hash
// of its contents.
func (w *listWriter) store(ctx context.Context, name string, plain []byte) error {
	have, err := w.r.be.Has(ctx, name)
	if err != nil {
		return fmt.Errorf("chunk list: %w", err)
	}
	if !have {
		obj := w.r.seal.seal(nil, plain)
		if err := w.r.be.Put(ctx, name, obj); err != nil {
			return fmt.Errorf("chunk list: %w", err)
		}
		w.bytes += int64(len(obj))
	}
	return nil
}

// next records the segment just written or reused, base and patch, of
// n chunks, and moves on.
func (w *listWriter) next(base, patch Hash, n int64) {
	w.x.Segments = append(w.x.Segments, base)
	if w.x.Patches != nil {
		w.x.Patches = append(w.x.Patches, patch)
	}
	w.first += n
	w.buf, w.pbuf, w.changed = w.buf[:0], w.pbuf[:0], w.changed[:0]
}

// addChanged adds the hashes hs of chunks at (ascending, in the segment
// being written) of an incremental whose other chunks in that segment
// are the parent's; done: the segment has no more changes. The segment
// is then stored as a patch of the parent's: the parent's patch there
// with these chunks set, so neither the parent's segment is read nor
// its unchanged chunks handled. Only when that patch would be too large
// is the parent's segment read, the changes applied to it, and the
// segment written whole.
func (w *listWriter) addChanged(ctx context.Context, at []int64, hs []Hash, done bool) error {
	x, k := w.x, len(w.x.Segments)
	if w.parent == nil || len(w.buf) != 0 || w.first != int64(k)*x.SegmentChunks || k >= len(w.parent.Segments) {
		return fmt.Errorf("chunk list: changed chunks at %d, not in a segment of the parent's on its boundary", w.first)
	}
	for i, c := range at {
		if c < w.first || c >= w.first+x.SegmentChunks || len(w.changed) > 0 && uint32(c-w.first) <= w.changed[len(w.changed)-1].at {
			return fmt.Errorf("chunk list: changed chunk %d out of order in the segment from %d", c, w.first)
		}
		w.changed = append(w.changed, patchEntry{uint32(c - w.first), hs[i]})
	}
	if !done {
		return nil
	}
	n := min(x.SegmentChunks, x.NumChunks()-w.first)
	var prior []patchEntry
	if h, ok := w.parent.patched(k); ok {
		p, err := w.r.readPatch(ctx, w.parent, k, h)
		if err != nil {
			return fmt.Errorf("chunk list: the previous image's: %w", err)
		}
		prior = p.ents
	}
	// The parent's patch with the changes over it, both in place order.
	ents := make([]patchEntry, 0, len(prior)+len(w.changed))
	ch := w.changed
	for len(prior) > 0 || len(ch) > 0 {
		switch {
		case len(ch) == 0 || len(prior) > 0 && prior[0].at < ch[0].at:
			ents = append(ents, prior[0])
			prior = prior[1:]
		default:
			if len(prior) > 0 && prior[0].at == ch[0].at {
				prior = prior[1:]
			}
			ents = append(ents, ch[0])
			ch = ch[1:]
		}
	}
	if len(ents) <= int(n)/patchDivisor {
		return w.writePatch(ctx, n, ents)
	}
	// Too many for a patch: the segment whole, the parent's base with
	// the parent's patch and the changes set, as a new base.
	_, base, err := w.r.baseSegment(ctx, w.parent, k)
	if err != nil {
		return fmt.Errorf("chunk list: the previous image's: %w", err)
	}
	if int64(len(base)) != n {
		return fmt.Errorf("chunk list: the previous image's segment %d holds %d chunks, want %d: %w", k, len(base), n, ErrCorrupt)
	}
	w.buf = append(w.buf[:0], base...)
	for _, e := range ents {
		w.buf[e.at] = e.h
	}
	return w.writeBase(ctx)
}

// flushPatch stores the segment collected as a patch of the parent's
// base segment there, when it differs from that base in few enough
// chunks (or names the base alone when not at all), and reports whether
// it did. The patch is the parent's (cumulative: against the base, so a
// segment is never more than its base and one patch) with the chunks
// that differ from the parent's set; neither base is read.
func (w *listWriter) flushPatch(ctx context.Context) (bool, error) {
	k := len(w.x.Segments)
	if k >= len(w.parent.Segments) || len(w.pbuf) != len(w.buf) {
		return false, nil
	}
	var prior []patchEntry
	if h, ok := w.parent.patched(k); ok {
		p, err := w.r.readPatch(ctx, w.parent, k, h)
		if err != nil {
			return false, fmt.Errorf("chunk list: the previous image's: %w", err)
		}
		prior = p.ents
	}
	limit := len(w.buf) / patchDivisor
	var ents []patchEntry
	for i := range w.buf {
		inPrior := len(prior) > 0 && prior[0].at == uint32(i)
		if inPrior {
			prior = prior[1:]
		}
		if inPrior || w.buf[i] != w.pbuf[i] {
			if len(ents) == limit {
				return false, nil // a new base
			}
			ents = append(ents, patchEntry{uint32(i), w.buf[i]})
		}
	}
	return true, w.writePatch(ctx, int64(len(w.buf)), ents)
}

// writePatch stores ents as the patch of the parent's segment at the
// segment being written, of n chunks (none: the parent's segment as it
// is), and moves on.
func (w *listWriter) writePatch(ctx context.Context, n int64, ents []patchEntry) error {
	x, k := w.x, len(w.x.Segments)
	if len(ents) == 0 {
		w.next(w.parent.Segments[k], Hash{}, n)
		return nil
	}
	p := &segPatch{chunkSize: x.ChunkSize, size: x.Size, first: w.first, count: n, base: w.parent.Segments[k], ents: ents}
	plain := encodePatch(p, w.r.hashLen())
	h := w.sum(plain)
	if err := w.store(ctx, patchName(h), plain); err != nil {
		return err
	}
	w.next(p.base, h, n)
	return nil
}

// reuse names segment h, of n chunks, as the next one: a segment of the
// parent's list that did not change. It must be there (a parent whose
// segment is gone would pass its loss on).
func (w *listWriter) reuse(ctx context.Context, ref segRef, n int64) error {
	if len(w.buf) != 0 || w.first != int64(len(w.x.Segments))*w.x.SegmentChunks {
		return fmt.Errorf("chunk list: reusing a segment at chunk %d, not on a segment boundary", w.first)
	}
	names := []string{sharedSegmentName(ref.base)}
	if ref.patch != (Hash{}) {
		if w.x.Patches == nil {
			return fmt.Errorf("chunk list: reusing a patched segment in an image without patches")
		}
		names = append(names, patchName(ref.patch))
	}
	for _, name := range names {
		have, err := w.r.be.Has(ctx, name)
		if err != nil {
			return fmt.Errorf("chunk list: %w", err)
		}
		if !have {
			return fmt.Errorf("chunk list: the previous image's segment %s is missing: %w; run `umbra verify`, and back up with --full", name, ErrCorrupt)
		}
	}
	w.x.Segments = append(w.x.Segments, ref.base)
	if w.x.Patches != nil {
		w.x.Patches = append(w.x.Patches, ref.patch)
	}
	w.first += n
	return nil
}

// finish writes the last segment and checks the list covers the volume.
func (w *listWriter) finish(ctx context.Context) error {
	if err := w.flush(ctx); err != nil {
		return err
	}
	if w.first != w.x.NumChunks() {
		return fmt.Errorf("chunk list: %d of %d chunks written", w.first, w.x.NumChunks())
	}
	if !slices.ContainsFunc(w.x.Patches, func(h Hash) bool { return h != Hash{} }) {
		w.x.Patches = nil // a record older Umbra reads the same
	}
	return nil
}

// numSegments is how many segments x's chunk list has (1 for format 2).
func (x *Image) numSegments() int {
	if x.Segments == nil {
		return 1
	}
	return len(x.Segments)
}

// segmentOf is the segment holding chunk i.
func (x *Image) segmentOf(i int64) int {
	if x.Segments == nil {
		return 0
	}
	return int(i / x.SegmentChunks)
}

// segment returns segment k of x's chunk list: its first chunk and the
// hashes, read and checked against the record (or sliced from Chunks
// when the whole list is in memory), with its patch applied.
func (r *Repo) segment(ctx context.Context, x *Image, k int) (int64, []Hash, error) {
	return r.segmentInto(ctx, x, k, nil)
}

// segBuf is memory a pass over chunk lists reads segments into, kept
// from segment to segment: the stored segment and its hashes decoded
// (2 MiB each for a segment of 65536 chunks). A pass that let go of
// both for each segment (prune's over the kept images, 4096 segments
// for a 1 TiB volume, most of them the same segment of a hole; verify's
// over every new one) made the collector's goal the peak of its heap
// (measured 2026-12-07: prune 37 MiB at 16 Mi chunks, 29 at 1 Mi).
type segBuf struct {
	raw    []byte
	hashes []Hash
}

// segmentInto is segment reading into sb's memory (nil: new memory):
// the hashes it returns are valid until the next read into sb.
func (r *Repo) segmentInto(ctx context.Context, x *Image, k int, sb *segBuf) (int64, []Hash, error) {
	first, hs, err := r.baseSegmentInto(ctx, x, k, sb)
	if err != nil || x.Chunks != nil {
		return first, hs, err
	}
	if h, ok := x.patched(k); ok {
		p, err := r.readPatch(ctx, x, k, h)
		if err != nil {
			return 0, nil, err
		}
		for _, e := range p.ents {
			hs[e.at] = e.h
		}
	}
	return first, hs, nil
}

// baseSegment is segment k of x's chunk list as stored, without its
// patch: a slice of its own (segment patches it in place).
func (r *Repo) baseSegment(ctx context.Context, x *Image, k int) (int64, []Hash, error) {
	return r.baseSegmentInto(ctx, x, k, nil)
}

// baseSegmentInto is baseSegment reading into sb's memory (see
// segmentInto).
func (r *Repo) baseSegmentInto(ctx context.Context, x *Image, k int, sb *segBuf) (int64, []Hash, error) {
	if x.Segments == nil || x.Chunks != nil {
		if err := r.loadChunks(ctx, x); err != nil {
			return 0, nil, err
		}
		if x.Segments == nil {
			return 0, x.Chunks, nil
		}
		first := int64(k) * x.SegmentChunks
		return first, x.Chunks[first:min(first+x.SegmentChunks, int64(len(x.Chunks)))], nil
	}
	return r.storedSegment(ctx, x, k, sb)
}

// storedSegment reads segment k of x's chunk list (format 3 or later)
// from the repository, without its patch.
func (r *Repo) storedSegment(ctx context.Context, x *Image, k int, sb *segBuf) (int64, []Hash, error) {
	if k < 0 || k >= len(x.Segments) {
		return 0, nil, fmt.Errorf("image %s: chunk list segment %d of %d", x.ID, k, len(x.Segments))
	}
	name := segmentName(x.ID, k)
	first := int64(k) * x.SegmentChunks
	want := min(x.SegmentChunks, x.NumChunks()-first)
	var l *Image
	var err error
	if x.Shared {
		name = sharedSegmentName(x.Segments[k])
		l, err = r.readSharedSegment(ctx, x, name, x.Segments[k], sb)
	} else {
		l, err = r.readList(ctx, x, name, x.Segments[k], 3, sb)
	}
	if err != nil {
		return 0, nil, err
	}
	if l.First != first || int64(len(l.Chunks)) != want {
		return 0, nil, fmt.Errorf("image %s: chunk list %s: %w: holds %d chunks from %d, want %d from %d", x.ID, name, ErrCorrupt, len(l.Chunks), l.First, want, first)
	}
	return first, l.Chunks, nil
}

// readList reads the chunk-list object name of image x (the whole list,
// format 2, or a segment, format 3) and checks it against the hash the
// record names and against the record itself.
func (r *Repo) readList(ctx context.Context, x *Image, name string, sum Hash, format uint16, sb *segBuf) (*Image, error) {
	raw, err := sb.get(ctx, r.be, name)
	if err != nil {
		return nil, fmt.Errorf("image %s: chunk list %s: %w", x.ID, name, err)
	}
	if blake3.Sum256(raw) != sum {
		return nil, fmt.Errorf("image %s: chunk list %s: %w: does not match the image record's hash", x.ID, name, ErrCorrupt)
	}
	b, err := r.seal.openInPlace(raw)
	if err != nil {
		return nil, fmt.Errorf("image %s: chunk list %s: %w", x.ID, name, err)
	}
	l, err := sb.decode(b)
	if err != nil {
		return nil, fmt.Errorf("image %s: %s: %w", x.ID, name, err)
	}
	if l.format != format || l.ID != x.ID || l.Size != x.Size || l.ChunkSize != r.cfg.ChunkSize {
		return nil, fmt.Errorf("image %s: chunk list %s: %w: belongs to %s (size %d, chunk %d, format %d)", x.ID, name, ErrCorrupt, l.ID, l.Size, l.ChunkSize, l.format)
	}
	return l, nil
}

// readSharedSegment reads the format-5 segment name of image x and checks
// it against its hash (the repository's chunk hash of the plain segment)
// and against the record.
func (r *Repo) readSharedSegment(ctx context.Context, x *Image, name string, sum Hash, sb *segBuf) (*Image, error) {
	raw, err := sb.get(ctx, r.be, name)
	if err != nil {
		return nil, fmt.Errorf("image %s: chunk list %s: %w", x.ID, name, err)
	}
	b, err := r.seal.openInPlace(raw)
	if err != nil {
		return nil, fmt.Errorf("image %s: chunk list %s: %w", x.ID, name, err)
	}
	if r.hasher()(b) != sum {
		return nil, fmt.Errorf("image %s: chunk list %s: %w: does not match its name", x.ID, name, ErrCorrupt)
	}
	l, err := sb.decode(b)
	if err != nil {
		return nil, fmt.Errorf("image %s: %s: %w", x.ID, name, err)
	}
	if l.format != r.segmentVersion() || l.ID != "" || l.Size != x.Size || l.ChunkSize != r.cfg.ChunkSize {
		return nil, fmt.Errorf("image %s: chunk list %s: %w: a segment of another volume (size %d, chunk %d, format %d)", x.ID, name, ErrCorrupt, l.Size, l.ChunkSize, l.format)
	}
	return l, nil
}

// get reads object name whole, into sb's memory when sb is not nil.
func (sb *segBuf) get(ctx context.Context, be Backend, name string) ([]byte, error) {
	if sb == nil {
		return be.Get(ctx, name, 0, -1)
	}
	b, err := be.GetInto(ctx, name, 0, -1, sb.raw[:cap(sb.raw)])
	if err == nil && cap(b) > cap(sb.raw) {
		sb.raw = b[:0]
	}
	return b, err
}

// decode decodes a chunk list into sb's memory when sb is not nil.
func (sb *segBuf) decode(b []byte) (*Image, error) {
	if sb == nil {
		return DecodeChunkList(b)
	}
	l, err := decodeChunkList(b, sb.hashes)
	if err == nil && cap(l.Chunks) > cap(sb.hashes) {
		sb.hashes = l.Chunks[:0]
	}
	return l, err
}

// sharedSegments adds the names of the format-5 segments x uses to set.
func (x *Image) sharedSegments(set map[string]bool) {
	if x.Shared {
		for _, h := range x.Segments {
			set[sharedSegmentName(h)] = true
		}
		for _, h := range x.Patches {
			if h != (Hash{}) {
				set[patchName(h)] = true
			}
		}
	}
}

// eachSegment calls fn with every segment of x's chunk list, in order.
func (r *Repo) eachSegment(ctx context.Context, x *Image, fn func(first int64, hashes []Hash) error) error {
	return r.eachSegmentInto(ctx, x, nil, fn)
}

// eachSegmentInto is eachSegment reading the segments into sb's memory
// (nil: new memory for each): fn must not keep the hashes it is given.
func (r *Repo) eachSegmentInto(ctx context.Context, x *Image, sb *segBuf, fn func(first int64, hashes []Hash) error) error {
	for k := range x.numSegments() {
		first, hs, err := r.segmentInto(ctx, x, k, sb)
		if err != nil {
			return err
		}
		if err := fn(first, hs); err != nil {
			return err
		}
	}
	return nil
}

// listCursor reads an image's chunk hashes by position, keeping the
// segments read last in memory (keep of them, one when 0); cheapest in
// ascending order.
type listCursor struct {
	r    *Repo
	x    *Image
	keep int
	segs []listSegment // oldest first
}

type listSegment struct {
	first  int64
	hashes []Hash
}

func (c *listCursor) hash(ctx context.Context, i int64) (Hash, error) {
	for _, s := range c.segs {
		if i >= s.first && i < s.first+int64(len(s.hashes)) {
			return s.hashes[i-s.first], nil
		}
	}
	k := c.x.segmentOf(i)
	first, hs, err := c.r.segment(ctx, c.x, k)
	if err != nil {
		return Hash{}, err
	}
	if i < first || i >= first+int64(len(hs)) {
		return Hash{}, fmt.Errorf("image %s: chunk %d is not in its list segment %d: %w", c.x.ID, i, k, ErrCorrupt)
	}
	if len(c.segs) >= max(c.keep, 1) {
		c.segs = c.segs[1:]
	}
	c.segs = append(c.segs, listSegment{first, hs})
	return hs[i-first], nil
}

// deleteList removes image id's chunk list objects (after its record):
// a format-2 list and every segment of a format-3 one, found by name so
// that a damaged record is no obstacle.
func (r *Repo) deleteList(ctx context.Context, id string) {
	segs, _ := r.be.List(ctx, listName(id)+"/")
	for _, n := range segs {
		r.be.Delete(ctx, n)
	}
	r.be.Delete(ctx, listName(id))
}

// imageRecord reads images/ID.
func (r *Repo) imageRecord(ctx context.Context, id string) (*Image, error) {
	b, err := r.getObject(ctx, imageName(id))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("image %s in %s: %w", id, r.Location(), ErrNoImage)
	}
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", id, err)
	}
	var x Image
	if err := json.Unmarshal(b, &x); err != nil || x.ID != id {
		return nil, fmt.Errorf("image %s: record: %w", id, ErrCorrupt)
	}
	if why := x.checkRecord(r.cfg.ChunkSize); why != "" {
		return nil, fmt.Errorf("image %s: record: %w: %s", id, ErrCorrupt, why)
	}
	return &x, nil
}

// maxImageSize bounds a volume's size in a record (4 EiB), so chunk
// arithmetic cannot overflow.
const maxImageSize = 1 << 62

// checkRecord says what is wrong with a decoded image record whose
// repository uses chunkSize, or "" when nothing is: every later step
// (chunk counts, segment lookups) relies on these.
func (x *Image) checkRecord(chunkSize int) string {
	switch {
	case x.ChunkSize != chunkSize:
		return fmt.Sprintf("chunk size %d, the repository's is %d", x.ChunkSize, chunkSize)
	case x.Size < 0 || x.Size > maxImageSize:
		return fmt.Sprintf("volume size %d out of range", x.Size)
	case x.Segments == nil && x.Patches == nil:
		return ""
	case x.Segments == nil:
		return "segment patches without segments"
	case x.SegmentChunks < 1 || x.SegmentChunks > maxSegmentChunks:
		return fmt.Sprintf("%d chunks per list segment", x.SegmentChunks)
	case int64(len(x.Segments)) != (x.NumChunks()+x.SegmentChunks-1)/x.SegmentChunks:
		return fmt.Sprintf("%d list segments for %d chunks of %d a segment", len(x.Segments), x.NumChunks(), x.SegmentChunks)
	case x.Patches != nil && (!x.Shared || len(x.Patches) != len(x.Segments)):
		return fmt.Sprintf("%d segment patches for %d segments", len(x.Patches), len(x.Segments))
	}
	return ""
}

// Image reads image id with its whole chunk list (memory grows with the
// volume; OpenImage and Restore read it a segment at a time).
func (r *Repo) Image(id string) (*Image, error) {
	x, err := r.image(context.Background(), id)
	if err != nil {
		return nil, err
	}
	if err := r.loadChunks(context.Background(), x); err != nil {
		return nil, err
	}
	return x, nil
}

func (r *Repo) image(ctx context.Context, id string) (*Image, error) {
	if !validImageID(id) {
		return nil, fmt.Errorf("image %q: not an image ID (see `umbra images list`)", id)
	}
	return r.imageRecord(ctx, id)
}

// loadChunks fills x.Chunks with the whole chunk list, checking it
// against the record. Memory grows with the volume: the backup, restore,
// verify and prune paths read segment by segment instead.
func (r *Repo) loadChunks(ctx context.Context, x *Image) error {
	if x.Chunks != nil {
		return nil
	}
	if x.Segments != nil {
		all := make([]Hash, 0, x.NumChunks())
		for k := range x.Segments {
			_, hs, err := r.segment(ctx, x, k)
			if err != nil {
				return err
			}
			all = append(all, hs...)
		}
		x.Chunks = all
		return nil
	}
	l, err := r.readList(ctx, x, listName(x.ID), x.ListHash, 2, nil)
	if err != nil {
		return err
	}
	x.Chunks = l.Chunks
	return nil
}

// RecordError is an image whose record cannot be read or makes no
// sense: Images reports one per such image; `umbra images delete`
// removes it.
type RecordError struct {
	ID  string
	Err error // names the image
}

func (e *RecordError) Error() string { return e.Err.Error() }
func (e *RecordError) Unwrap() error { return e.Err }

// Images lists the images without their chunk lists, oldest first;
// unreadable records are reported in errs (each a *RecordError).
func (r *Repo) Images() (list []*Image, errs []error) { return r.images(context.Background()) }

func (r *Repo) images(ctx context.Context) (list []*Image, errs []error) {
	names, err := r.be.List(ctx, "images/")
	if err != nil {
		return nil, []error{err}
	}
	for _, n := range names {
		id := strings.TrimPrefix(n, "images/")
		x, err := r.imageRecord(ctx, id)
		if err != nil {
			errs = append(errs, &RecordError{ID: id, Err: err})
			continue
		}
		list = append(list, x)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Created.Before(list[j].Created) })
	return list, errs
}

// Latest returns the newest image of vol (without its chunk list), or nil.
func (r *Repo) Latest(vol string) *Image {
	list, _ := r.Images()
	for i := len(list) - 1; i >= 0; i-- {
		if list[i].Volume == vol {
			return list[i]
		}
	}
	return nil
}
