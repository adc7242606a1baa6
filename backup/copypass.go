package backup

import (
	"context"
	"fmt"

	"umbra/internal/zero"
)

// Pass-through: when two repositories compress chunks the same way, a
// chunk the target lacks is copied as the source compressed it, never
// compressed again. With the same chunk names (the same key, or none) a
// blob moves as stored (passBlobs); with other names (another key, or
// one repository encrypted and not the other) each blob is opened, its
// chunks checked against the source's hashes and hashed as the target
// names them, and its compressed bytes sealed for the target
// (resealBlobs). Each blob is opened on arrival as the target would
// open it and every chunk the target will list in it is checked against
// its hash before the blob is packed. A blob's chunks that the image
// does not need stay in it, unlisted: a backup makes a blob of one
// image's new chunks, so they are few.

// passThrough reports whether a copy from src to dst may copy blobs as
// they are stored.
func passThrough(src, dst *Repo) bool {
	return SameChunkNames(src, dst) && src.cfg.Compression == dst.cfg.Compression && src.cfg.Encryption == dst.cfg.Encryption
}

// reseal reports whether a copy from src to dst, which name chunks
// differently, may copy blobs' compressed bytes.
func reseal(src, dst *Repo) bool {
	return !SameChunkNames(src, dst) && src.cfg.Compression == dst.cfg.Compression && src.cfg.ChunkSize == dst.cfg.ChunkSize
}

// blobRef names a stored blob of the source.
type blobRef struct {
	pid      PackID
	off, len uint32
}

// passBlobs copies into dst's packs (through up) the source blobs that
// hold the chunks need names (zero: not needed), in the order the chunks
// come, listing in each only the needed chunks. scratch is memory the
// checks reuse.
func passBlobs(ctx context.Context, src, dst *Repo, up *uploader, need []Hash, sum func([]byte) Hash, scratch *[]byte, ci *CopiedImage, st *CopyStats) error {
	var order []blobRef
	ents := map[blobRef][]blobEntry{}
	for _, h := range need {
		if h == (Hash{}) {
			continue
		}
		l, pid, ok := src.lookup(h)
		if !ok {
			return src.missing(h)
		}
		ref := blobRef{pid, l.off, l.len}
		if _, seen := ents[ref]; !seen {
			order = append(order, ref)
		}
		ents[ref] = append(ents[ref], blobEntry{Hash: h, RawOff: l.rawOff, Raw: l.raw})
	}
	for _, ref := range order {
		if err := ctx.Err(); err != nil {
			return err
		}
		blob, err := src.be.Get(ctx, ref.pid.name(), int64(ref.off), int64(ref.len))
		if err == nil && len(blob) != int(ref.len) {
			err = fmt.Errorf("%w: %d bytes read of %d", ErrCorrupt, len(blob), ref.len)
		}
		if err != nil {
			return fmt.Errorf("blob at %d of pack %s: %w", ref.off, ref.pid, err)
		}
		es := ents[ref]
		if err := dst.checkStoredBlob(blob, es, sum, scratch); err != nil {
			return fmt.Errorf("blob at %d of pack %s: %w", ref.off, ref.pid, err)
		}
		if err := up.add(blob, es); err != nil {
			return err
		}
		ci.BytesWritten += int64(len(blob))
		for _, e := range es {
			ci.ChunksCopied++
			ci.BytesCopied += int64(e.Raw)
			st.BytesRead += int64(e.Raw)
		}
	}
	return nil
}

// checkStoredBlob opens a blob as r stores it (without changing it) and
// checks each chunk ents names against its hash.
func (r *Repo) checkStoredBlob(blob []byte, ents []blobEntry, sum func([]byte) Hash, scratch *[]byte) error {
	z := blob
	if r.seal != nil {
		var err error
		if z, err = r.seal.open(nil, blob); err != nil {
			return fmt.Errorf("%w: the blob does not open: %v", ErrCorrupt, err)
		}
	}
	group, err := r.decodeBlob(*scratch, z)
	if err != nil {
		return err
	}
	*scratch = group[:0]
	for _, e := range ents {
		if _, err := chunkIn(e.Hash, loc{rawOff: e.RawOff, raw: e.Raw}, group, sum); err != nil {
			return err
		}
	}
	return nil
}

// resealBlobs is passBlobs for repositories that name chunks
// differently: it copies the source blobs holding the chunks of hs (the
// source's hashes of a run of an image's chunks; zero: a hole), opened
// and checked against those hashes, their compressed bytes sealed for
// dst, listing the chunks dst lacks under dst's hashes. It returns dst's
// hashes of hs (zero for a hole or an all-zero chunk).
func resealBlobs(ctx context.Context, src, dst *Repo, up *uploader, hs []Hash, srcSum, dstSum func([]byte) Hash, scratch, check *[]byte, ci *CopiedImage, st *CopyStats) ([]Hash, error) {
	type place struct {
		i int
		l loc
	}
	out := make([]Hash, len(hs))
	var order []blobRef
	at := map[blobRef][]place{}
	for i, h := range hs {
		if h == (Hash{}) {
			continue
		}
		l, pid, ok := src.lookup(h)
		if !ok {
			return nil, src.missing(h)
		}
		ref := blobRef{pid, l.off, l.len}
		if _, seen := at[ref]; !seen {
			order = append(order, ref)
		}
		at[ref] = append(at[ref], place{i, l})
	}
	for _, ref := range order {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		where := func(err error) error { return fmt.Errorf("blob at %d of pack %s: %w", ref.off, ref.pid, err) }
		blob, err := src.be.Get(ctx, ref.pid.name(), int64(ref.off), int64(ref.len))
		if err == nil && len(blob) != int(ref.len) {
			err = fmt.Errorf("%w: %d bytes read of %d", ErrCorrupt, len(blob), ref.len)
		}
		if err != nil {
			return nil, where(err)
		}
		z, err := src.seal.openInPlace(blob)
		if err != nil {
			return nil, where(fmt.Errorf("%w: the blob does not open: %v", ErrCorrupt, err))
		}
		group, err := src.decodeBlob(*scratch, z)
		if err != nil {
			return nil, where(err)
		}
		*scratch = group[:0]
		var ents []blobEntry
		for _, p := range at[ref] {
			data, err := chunkIn(hs[p.i], p.l, group, srcSum)
			if err != nil {
				return nil, where(err)
			}
			st.BytesRead += int64(len(data))
			if zero.All(data) {
				continue
			}
			d := dstSum(data)
			out[p.i] = d
			switch {
			case up.has(d):
			case dst.known(d):
				ci.ChunksPresent++
			default:
				up.mark(d)
				ents = append(ents, blobEntry{Hash: d, RawOff: p.l.rawOff, Raw: p.l.raw})
				ci.ChunksCopied++
				ci.BytesCopied += int64(len(data))
			}
		}
		if len(ents) == 0 {
			continue
		}
		sealed := dst.seal.seal(nil, z)
		if err := dst.checkStoredBlob(sealed, ents, dstSum, check); err != nil {
			return nil, where(fmt.Errorf("as sealed for the target: %w", err))
		}
		if err := up.add(sealed, ents); err != nil {
			return nil, err
		}
		ci.BytesWritten += int64(len(sealed))
	}
	return out, nil
}

// known reports whether the repository's index names chunk h.
func (r *Repo) known(h Hash) bool { _, _, ok := r.lookup(h); return ok }
