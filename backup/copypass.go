package backup

import (
	"context"
	"fmt"
)

// Pass-through: when two repositories name chunks the same way and
// compress them the same way, a chunk the target lacks is copied as the
// source stores it — its blob's bytes, compressed (and sealed: the same
// names mean the same key, or none) — instead of being decompressed and
// compressed again. Each blob is opened on arrival as the target would
// open it and every chunk the target will list in it is checked against
// its hash before the blob is packed. A blob's chunks that the image
// does not need stay in it, unlisted: a backup makes a blob of one
// image's new chunks, so they are few.

// passThrough reports whether a copy from src to dst may copy blobs as
// they are stored.
func passThrough(src, dst *Repo) bool {
	return SameChunkNames(src, dst) && src.cfg.Compression == dst.cfg.Compression && src.cfg.Encryption == dst.cfg.Encryption
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
			return fmt.Errorf("chunk %s: %w", h, ErrMissingChunk)
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
