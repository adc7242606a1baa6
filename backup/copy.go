package backup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/zeebo/blake3"
)

// Copy moves images from one repository into another (`umbra copy`,
// the sync job), storing only the chunks the target lacks.
//
// Chunk names: when both repositories name a chunk the same way (same
// hash, same hash length, same key: two unencrypted repositories with
// the same hash, as an encrypted repository's key is its own) the
// target's index says which chunks it lacks without reading any data,
// and only those are read from the source. Otherwise every chunk of an
// image is read from the source and hashed again as the target names
// it; only the ones the target lacks are stored. Either way the lookups
// go to the repositories' own indexes, and memory is bounded by a
// segment of a chunk list and a few batches, not by the image.
//
// Crash safety and resuming: the target's packs are made durable, then
// the index objects naming them (every copyIndexEvery packs, so an
// interrupted copy keeps most of what it moved), then the image's chunk
// list, and the record last, as a backup writes them: an interrupted
// copy leaves no image in the target, and a rerun finds the chunks that
// were indexed and moves only the rest (packs stored but not yet indexed
// are garbage that prune removes). Image IDs are kept, so a rerun skips
// the images that arrived.
//
// Compression: with the same compression (zstd, whatever the level),
// the blobs holding the chunks the target lacks keep the source's
// compressed bytes (copypass.go): as stored with the same chunk names,
// opened and sealed again for the target otherwise. A blob whose chunks
// fall in two segments of a chunk list is copied for each (at most one
// blob of 4 MiB a segment of 256 MiB), and one the target holds some
// chunks of is copied whole, those chunks unlisted.
//
// Verification on arrival: every chunk read from the source is checked
// against the source's hash; every blob written (compressed here, or as
// the source stored it) is opened as the target will open it and each
// chunk it lists checked against the target's hash before it is packed; the chunk list is read back from the target, must match
// what was written and name only chunks the target's index holds, and
// its totals (chunks, non-zero chunks) must be the source image's.

// CopyOptions choose the images of a copy. Images, else Volumes, else All.
type CopyOptions struct {
	Images  []string // these image IDs
	Volumes []string // every image of these volumes
	All     bool     // every image
	// Progress is told, per image, how far the copy of its volume has
	// come (bytes of the volume).
	Progress func(image string, done, total int64)
}

// Results of one image's copy.
const (
	CopyCopied  = "copied"
	CopyPresent = "present"      // the target has an image of this ID
	CopySame    = "same-content" // the target has an image with the same chunk list
	CopyFailed  = "failed"
)

// CopiedImage says what became of one image.
type CopiedImage struct {
	ID     string `json:"id"`
	Volume string `json:"volume"`
	Result string `json:"result"` // copied | present | same-content | failed
	// SameAs names the target's image with the same content.
	SameAs        string  `json:"same_as,omitempty"`
	Error         string  `json:"error,omitempty"`
	Size          int64   `json:"size"`
	ChunksCopied  int64   `json:"chunks_copied"`
	ChunksPresent int64   `json:"chunks_present"`
	BytesCopied   int64   `json:"bytes_copied"`
	BytesWritten  int64   `json:"bytes_written"`
	Seconds       float64 `json:"seconds"`
}

// CopyStats of one copy.
type CopyStats struct {
	From   string        `json:"from"`
	To     string        `json:"to"`
	Images []CopiedImage `json:"images"`
	// Rehashed: the repositories name chunks differently, so every
	// chunk of an image was read and hashed again.
	Rehashed bool `json:"rehashed"`
	// BytesRead: chunk data read from the source, uncompressed.
	BytesRead int64 `json:"bytes_read"`
	// ChunksCopied and BytesCopied (uncompressed): chunks stored in the
	// target; ChunksPresent: chunks it had already (each counted once an
	// image).
	ChunksCopied  int64 `json:"chunks_copied"`
	ChunksPresent int64 `json:"chunks_present"`
	BytesCopied   int64 `json:"bytes_copied"`
	// BytesWritten: the new chunks as stored (packs); BytesIndex: the
	// index objects and chunk lists written.
	BytesWritten int64   `json:"bytes_written"`
	BytesIndex   int64   `json:"bytes_index"`
	Seconds      float64 `json:"seconds"`
}

// copyIndexEvery: a copy writes an index object every this many packs
// (64 MiB at the default pack size), so that an interrupted copy's rerun
// finds all but the last few packs' chunks. (A variable: tests change it.)
var copyIndexEvery = 4

// SameChunkNames reports whether two repositories name chunks the same
// way, so that a copy between them need not read chunks the target has.
func SameChunkNames(a, b *Repo) bool {
	return a.cfg.Hash == b.cfg.Hash && a.hashLen() == b.hashLen() && bytes.Equal(a.hashKey, b.hashKey) && a.cfg.ChunkSize == b.cfg.ChunkSize
}

// Copy copies images from src into dst (see the comment at the top of
// copy.go). It holds a shared lock on both (a copy only adds to the
// target; prune, which deletes, takes an exclusive one). An image that
// fails does not stop the others; the error names every image that
// failed, and the stats say what became of each.
func Copy(ctx context.Context, src, dst *Repo, opts CopyOptions) (CopyStats, error) {
	st := CopyStats{From: src.Location(), To: dst.Location(), Images: []CopiedImage{}}
	start := time.Now()
	if src.cfg.ID == dst.cfg.ID {
		return st, fmt.Errorf("copy: %s and %s are the same repository (id %s): give another target", src.Location(), dst.Location(), src.cfg.ID)
	}
	if src.cfg.ChunkSize != dst.cfg.ChunkSize {
		return st, fmt.Errorf("copy from %s to %s: the source's chunks are %d bytes, the target's %d: copy into a repository created with `umbra repo init --chunk-size %d`",
			src.Location(), dst.Location(), src.cfg.ChunkSize, dst.cfg.ChunkSize, src.cfg.ChunkSize)
	}
	if len(opts.Images) == 0 && len(opts.Volumes) == 0 && !opts.All {
		return st, fmt.Errorf("copy: no images chosen: name image IDs, a volume, or all")
	}
	unlockSrc, err := src.Lock(ctx, "copy to "+dst.Location(), false)
	if err != nil {
		return st, fmt.Errorf("copy: source: %w", err)
	}
	defer unlockSrc()
	unlockDst, err := dst.Lock(ctx, "copy from "+src.Location(), false)
	if err != nil {
		return st, fmt.Errorf("copy: target: %w", err)
	}
	defer unlockDst()
	defer dst.chunks.useFilter()() // most of a copy's lookups in the target are of chunks it lacks
	// Under the locks, the indexes as they are now: a prune that ran
	// since the repositories were opened may have removed packs.
	if err := src.Refresh(ctx); err != nil {
		return st, fmt.Errorf("copy: source %s: %w", src.Location(), err)
	}
	if err := dst.Refresh(ctx); err != nil {
		return st, fmt.Errorf("copy: target %s: %w", dst.Location(), err)
	}
	images, err := src.chooseImages(ctx, opts)
	if err != nil {
		return st, err
	}
	have, herrs := dst.images(ctx)
	if len(herrs) > 0 && len(have) == 0 {
		if _, ok := herrs[0].(*RecordError); !ok {
			return st, fmt.Errorf("copy: target %s: %w", dst.Location(), herrs[0])
		}
	}
	haveID := map[string]bool{}
	for _, y := range have {
		haveID[y.ID] = true
	}
	damaged := map[string]error{} // records of the target that do not read
	for _, e := range herrs {
		if re, ok := e.(*RecordError); ok {
			damaged[re.ID] = re.Err
		}
	}
	same := SameChunkNames(src, dst)
	st.Rehashed = !same
	if err := dst.upgradeFormat(ctx); err != nil {
		return st, fmt.Errorf("copy: target: %w", err)
	}
	var failed []error
	for _, x := range images {
		ci := CopiedImage{ID: x.ID, Volume: x.Volume, Size: x.Size}
		if haveID[x.ID] {
			ci.Result = CopyPresent
			st.Images = append(st.Images, ci)
			continue
		}
		if e := damaged[x.ID]; e != nil {
			err := fmt.Errorf("image %s: the target has a record of this ID that does not read (%v): remove it with `umbra images delete --repo %s %s` and copy again", x.ID, e, dst.Location(), x.ID)
			ci.Result, ci.Error = CopyFailed, err.Error()
			st.Images = append(st.Images, ci)
			failed = append(failed, err)
			continue
		}
		if same {
			y, err := sameContent(ctx, src, x, dst, have)
			if err != nil {
				return st, err
			}
			if y != nil {
				ci.Result, ci.SameAs = CopySame, y.ID
				st.Images = append(st.Images, ci)
				continue
			}
		}
		t0 := time.Now()
		y, err := copyImage(ctx, src, dst, x, same, opts.Progress, &st, &ci)
		ci.Seconds = time.Since(t0).Seconds()
		if err != nil {
			if ctx.Err() != nil {
				return st, fmt.Errorf("copy %s: %w (interrupted: run the copy again, it moves only what is still missing)", x.ID, ctx.Err())
			}
			ci.Result, ci.Error = CopyFailed, err.Error()
			st.Images = append(st.Images, ci)
			failed = append(failed, err)
			continue
		}
		ci.Result = CopyCopied
		st.Images = append(st.Images, ci)
		have = append(have, y)
		haveID[y.ID] = true
	}
	st.Seconds = time.Since(start).Seconds()
	if len(failed) > 0 {
		return st, fmt.Errorf("copy from %s to %s: %d of %d images failed (the others were copied; the target has none of the failed ones): %w",
			src.Location(), dst.Location(), len(failed), len(images), errors.Join(failed...))
	}
	return st, nil
}

// chooseImages returns the images opts names, oldest first. Image IDs
// that are not there are an error before anything is copied.
func (r *Repo) chooseImages(ctx context.Context, opts CopyOptions) ([]*Image, error) {
	if len(opts.Images) > 0 {
		var out []*Image
		var bad []error
		seen := map[string]bool{}
		for _, id := range opts.Images {
			if seen[id] {
				continue
			}
			seen[id] = true
			x, err := r.image(ctx, id)
			if err != nil {
				bad = append(bad, err)
				continue
			}
			out = append(out, x)
		}
		if len(bad) > 0 {
			return nil, fmt.Errorf("copy: nothing copied: %w (list the source's images with `umbra images list --repo %s`)", errors.Join(bad...), r.Location())
		}
		slices.SortStableFunc(out, func(a, b *Image) int { return a.Created.Compare(b.Created) })
		return out, nil
	}
	list, errs := r.images(ctx)
	if len(errs) > 0 {
		return nil, fmt.Errorf("copy: source %s: nothing copied: %w (name the images to copy, or `umbra images delete` the damaged records)", r.Location(), errors.Join(errs...))
	}
	if opts.All {
		return list, nil
	}
	var out []*Image
	for _, x := range list {
		if slices.Contains(opts.Volumes, x.Volume) {
			out = append(out, x)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("copy: source %s has no image of volume %s (see `umbra images list --repo %s`)", r.Location(), strings.Join(opts.Volumes, ", "), r.Location())
	}
	return out, nil
}

// sameContent returns an image of dst whose chunk list is x's (the
// repositories name chunks the same way), or nil. It compares the names
// of the list's segments as dst would write them (a segment is named by
// the hash of its content): x's own when its list is cut as dst cuts
// one and has no patches, else made from its hashes; dst's images whose
// lists have patches (incrementals backed up there) are not compared.
func sameContent(ctx context.Context, src *Repo, x *Image, dst *Repo, have []*Image) (*Image, error) {
	var names []Hash
	for _, y := range have {
		if y.Size != x.Size || y.ChunkSize != x.ChunkSize || !y.Shared || y.Patches != nil || y.SegmentChunks != segmentChunks {
			continue
		}
		if names == nil {
			var err error
			if names, err = segmentNames(ctx, src, x, dst); err != nil {
				return nil, fmt.Errorf("copy %s: %w", x.ID, err)
			}
		}
		if slices.Equal(names, y.Segments) {
			return y, nil
		}
	}
	return nil, nil
}

// segmentNames names the segments of x's chunk list as dst's list
// writer would (the repositories name chunks the same way), reading x's
// list only when its segments are not already those.
func segmentNames(ctx context.Context, src *Repo, x *Image, dst *Repo) ([]Hash, error) {
	if x.Shared && x.Patches == nil && x.SegmentChunks == segmentChunks && src.segmentVersion() == dst.segmentVersion() {
		return x.Segments, nil
	}
	sum := dst.hasher()
	var names []Hash
	buf := make([]Hash, 0, min(segmentChunks, x.NumChunks()))
	var first int64
	cut := func() {
		seg := &Image{Size: x.Size, ChunkSize: x.ChunkSize, Created: time.Unix(0, 0), Chunks: buf, First: first, format: dst.segmentVersion()}
		names = append(names, sum(seg.EncodeChunkList()))
		first += int64(len(buf))
		buf = buf[:0]
	}
	err := src.eachSegment(ctx, x, func(_ int64, hs []Hash) error {
		for len(hs) > 0 {
			n := min(len(hs), int(segmentChunks)-len(buf))
			buf = append(buf, hs[:n]...)
			hs = hs[n:]
			if int64(len(buf)) == segmentChunks {
				cut()
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(buf) > 0 {
		cut()
	}
	return names, nil
}

// copyBatch is a run of chunks read from the source.
type copyBatch struct {
	first int64  // the image's chunk number of the first
	hs    []Hash // the source's hashes (zero: not read)
	buf   []byte
	err   error
}

// copyImage copies image x's chunks that dst lacks and then its chunk
// list and record, and returns the record written.
func copyImage(ctx context.Context, src, dst *Repo, x *Image, same bool, progress func(string, int64, int64), st *CopyStats, ci *CopiedImage) (*Image, error) {
	fail := func(err error) error {
		if errors.Is(err, ErrCorrupt) || errors.Is(err, ErrMissingChunk) {
			return fmt.Errorf("image %s: %w; the source is damaged: run `umbra verify --repo %s` (nothing of this image was listed in the target)", x.ID, err, src.Location())
		}
		return fmt.Errorf("image %s: %w", x.ID, err)
	}
	y := &Image{ID: x.ID, Volume: x.Volume, Snapshot: x.Snapshot, Parent: x.Parent, Size: x.Size, ChunkSize: x.ChunkSize, Created: x.Created, Stats: x.Stats}
	cs := int64(x.ChunkSize)
	lw := dst.newListWriter(y)
	up := dst.newUploader(ctx)
	up.every = copyIndexEvery
	defer up.abort()
	workers := runtime.GOMAXPROCS(0)
	cpu := make(chan struct{}, workers)
	comp := dst.newCompressor(up, workers, cpu)
	comp.check = true
	compClosed := false
	defer func() {
		if !compClosed {
			comp.close()
		}
	}()
	hashers := make([]func([]byte) Hash, workers)
	many := make([]*manyHasher, workers)
	for i := range hashers {
		hashers[i] = dst.hasher()
		many[i] = dst.manyHasher()
	}
	perBatch := max(batchBytes/cs, 1)
	// Buffers go round: the reader fills one while this goroutine hashes
	// and queues another and the compressors still hold a third.
	const depth = 3
	free := make(chan []byte, depth)
	for range depth {
		free <- make([]byte, perBatch*cs)
	}
	cache := newChunkCache(restoreCache, 0)
	srcSum := src.hasher()
	var passScratch, checkScratch []byte
	var scratch readScratch
	// The same compression: blobs move as they are stored (the same
	// names), or sealed again for the target (other names).
	pass := same && passThrough(src, dst)
	resealing := !same && reseal(src, dst)
	wrote := blake3.New() // the target's chunk list as written
	var srcNonZero, dstNonZero int64
	w := make([]chunkWork, perBatch)
	out := make([]Hash, 0, perBatch)
	defer func() {
		st.ChunksCopied += ci.ChunksCopied
		st.ChunksPresent += ci.ChunksPresent
		st.BytesCopied += ci.BytesCopied
		st.BytesWritten += ci.BytesWritten
	}()
	err := src.eachSegment(ctx, x, func(first int64, hs []Hash) error {
		// The chunks to read: with the same names, the ones the target
		// lacks (once each); else every non-zero chunk.
		need := make([]Hash, len(hs))
		for i, h := range hs {
			if h == (Hash{}) {
				continue
			}
			srcNonZero++
			if !same {
				need[i] = h
				continue
			}
			if up.has(h) {
				continue // earlier in this image
			}
			if _, _, ok := dst.lookup(h); ok {
				ci.ChunksPresent++
				continue
			}
			up.mark(h)
			need[i] = h
		}
		// listed adds a segment whose blobs went over whole (named names
		// in the target) to the target's list and index.
		listed := func(names []Hash) error {
			for _, h := range names {
				if h != (Hash{}) {
					dstNonZero++
				}
				wrote.Write(h[:])
			}
			if err := lw.add(ctx, names, nil); err != nil {
				return err
			}
			if err := up.flushIndex(ctx, false); err != nil {
				return err
			}
			if progress != nil {
				progress(x.ID, min((first+int64(len(hs)))*cs, x.Size), x.Size)
			}
			return ctx.Err()
		}
		if pass {
			if err := passBlobs(ctx, src, dst, up, need, hashers[0], &passScratch, ci, st); err != nil {
				return err
			}
			return listed(hs)
		}
		if resealing {
			out, err := resealBlobs(ctx, src, dst, up, hs, srcSum, hashers[0], &passScratch, &checkScratch, ci, st)
			if err != nil {
				return err
			}
			return listed(out)
		}
		src.countUses(cache, first, need)
		// One goroutine reads the segment's batches ahead.
		rctx, cancel := context.WithCancel(ctx)
		defer cancel()
		batches := make(chan copyBatch, depth-1)
		var rg sync.WaitGroup
		rg.Go(func() {
			defer close(batches)
			srcMany := src.manyHasher()
			for b := 0; b < len(hs); b += int(perBatch) {
				e := min(b+int(perBatch), len(hs))
				var buf []byte
				select {
				case buf = <-free:
				case <-rctx.Done():
					return
				}
				bt := copyBatch{first: first + int64(b), hs: need[b:e], buf: buf}
				if !slices.ContainsFunc(bt.hs, func(h Hash) bool { return h != Hash{} }) {
					bt.hs = nil // nothing to read
				} else {
					bt.err = src.readChunks(rctx, x, bt.first, bt.hs, buf, srcMany, cache, &scratch)
				}
				select {
				case batches <- bt:
				case <-rctx.Done():
					free <- buf
					return
				}
				if bt.err != nil {
					return
				}
			}
		})
		defer func() {
			cancel()
			for bt := range batches {
				free <- bt.buf
			}
			rg.Wait()
		}()
		for bt := range batches {
			if bt.err == nil {
				bt.err = ctx.Err()
			}
			if bt.err != nil {
				free <- bt.buf
				return bt.err
			}
			n := int64(len(hs)) - (bt.first - first)
			n = min(n, perBatch)
			out = out[:0]
			var fresh []int
			if same {
				out = append(out, hs[bt.first-first:bt.first-first+n]...)
				for i, h := range bt.hs {
					if h == (Hash{}) {
						continue
					}
					idx := bt.first + int64(i)
					w[i] = chunkWork{kind: kindRead, hash: h, data: bt.buf[int64(i)*cs : int64(i)*cs+chunkLen(idx, cs, x.Size)]}
					fresh = append(fresh, i)
					st.BytesRead += int64(len(w[i].data))
				}
			} else {
				ws := w[:n]
				for i := range ws {
					ws[i] = chunkWork{kind: kindHole}
					if bt.hs != nil && bt.hs[i] != (Hash{}) {
						idx := bt.first + int64(i)
						ws[i] = chunkWork{kind: kindRead, data: bt.buf[int64(i)*cs : int64(i)*cs+chunkLen(idx, cs, x.Size)]}
						st.BytesRead += int64(len(ws[i].data))
					}
				}
				dst.hashBatch(ws, many, cpu)
				for i := range ws {
					c := &ws[i]
					switch {
					case c.kind != kindRead || c.zero:
						out = append(out, Hash{})
						continue
					case up.has(c.hash):
					case c.known:
						ci.ChunksPresent++
					default:
						up.mark(c.hash)
						fresh = append(fresh, i)
					}
					out = append(out, c.hash)
				}
			}
			for _, h := range out {
				if h != (Hash{}) {
					dstNonZero++
				}
				wrote.Write(h[:])
			}
			if err := lw.add(ctx, out, nil); err != nil {
				free <- bt.buf
				return err
			}
			for _, i := range fresh {
				ci.ChunksCopied++
				ci.BytesCopied += int64(len(w[i].data))
			}
			own := new(sync.WaitGroup)
			err := comp.queue(w[:n], fresh, own)
			buf := bt.buf
			rg.Go(func() { own.Wait(); free <- buf })
			if err != nil {
				return err
			}
			if err := up.flushIndex(ctx, false); err != nil {
				return err
			}
			if progress != nil {
				progress(x.ID, min((bt.first+n)*cs, x.Size), x.Size)
			}
		}
		return ctx.Err()
	})
	if err != nil {
		return nil, fail(err)
	}
	stored, err := comp.close()
	compClosed = true
	ci.BytesWritten += stored
	if err != nil {
		return nil, fail(err)
	}
	if err := lw.finish(ctx); err != nil {
		return nil, fail(err)
	}
	idx, err := up.finish()
	if err != nil {
		return nil, fail(err)
	}
	st.BytesIndex += idx + lw.bytes
	if srcNonZero != dstNonZero {
		return nil, fail(fmt.Errorf("%w: %d non-zero chunks read, %d listed in the target", ErrCorrupt, srcNonZero, dstNonZero))
	}
	if err := checkArrived(ctx, dst, y, wrote.Sum(nil), dstNonZero); err != nil {
		return nil, fmt.Errorf("image %s: in the target %s: %w", x.ID, dst.Location(), err)
	}
	if err := dst.writeImage(ctx, y); err != nil {
		return nil, fmt.Errorf("image %s: write the record in %s: %w", x.ID, dst.Location(), err)
	}
	got, err := dst.imageRecord(ctx, y.ID)
	if err != nil || got.Size != x.Size || got.NumChunks() != x.NumChunks() || !slices.Equal(got.Segments, y.Segments) {
		return nil, fmt.Errorf("image %s: the record read back from %s is not the one written (%v): run `umbra verify --repo %s`", x.ID, dst.Location(), err, dst.Location())
	}
	return y, nil
}

// checkArrived reads image y's chunk list back from dst: it must be
// the one written (digest: BLAKE3 of its hashes in order) with nonZero
// non-zero chunks, each of which dst's index names.
func checkArrived(ctx context.Context, dst *Repo, y *Image, digest []byte, nonZero int64) error {
	d := blake3.New()
	var n, listed int64
	err := dst.eachSegment(ctx, y, func(first int64, hs []Hash) error {
		if first != n {
			return fmt.Errorf("chunk list: segment at chunk %d, want %d: %w", first, n, ErrCorrupt)
		}
		for i, h := range hs {
			d.Write(h[:])
			if h == (Hash{}) {
				continue
			}
			listed++
			if _, _, ok := dst.lookup(h); !ok {
				return fmt.Errorf("chunk %s at %d: %w", h, (first+int64(i))*int64(y.ChunkSize), ErrMissingChunk)
			}
		}
		n += int64(len(hs))
		return nil
	})
	if err != nil {
		return err
	}
	if n != y.NumChunks() || listed != nonZero || !bytes.Equal(d.Sum(nil), digest) {
		return fmt.Errorf("chunk list read back: %w: %d chunks (%d non-zero), want %d (%d)", ErrCorrupt, n, listed, y.NumChunks(), nonZero)
	}
	return nil
}

// checkBlob opens a sealed blob as it will be stored and checks each
// chunk ents names against its hash (scratch: memory to reuse).
func (r *Repo) checkBlob(blob []byte, ents []blobEntry, sum func([]byte) Hash, scratch *[]byte) error {
	z := blob
	if r.seal != nil {
		var err error
		if z, err = r.seal.open(nil, blob); err != nil {
			return fmt.Errorf("a blob just sealed does not open: %w", err)
		}
	}
	group, err := r.decodeBlob(*scratch, z)
	if err != nil {
		return fmt.Errorf("a blob just compressed does not decompress: %w", err)
	}
	*scratch = group[:0]
	var raw uint32
	for _, e := range ents {
		if _, err := chunkIn(e.Hash, loc{rawOff: e.RawOff, raw: e.Raw}, group, sum); err != nil {
			return fmt.Errorf("as stored: %w", err)
		}
		raw += e.Raw
	}
	if int(raw) != len(group) {
		return fmt.Errorf("a blob just compressed holds %d bytes, its chunks %d: %w", len(group), raw, ErrCorrupt)
	}
	return nil
}
