package backup

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// Segment patches (format 7). Scattered changes touch every segment of a
// chunk list (1 % of a volume's 4 KiB chunks rewritten leaves no 256 MiB
// segment unchanged, and no 4 MiB one either), so writing whole changed
// segments costs 32 bytes per chunk of the volume: 79 % of the changed
// bytes measured. An incremental instead names the parent's segment as
// its base and stores a patch: the chunks of the segment that differ
// from that base, 4 bytes of position and a hash each. The patch is
// cumulative (against the base, not the parent), so a segment is its
// base plus one patch, never a chain; when a patch would exceed
// 1/patchDivisor of its segment's chunks, the backup writes the whole
// segment again as a new base instead. Patches are shared objects
// (segments/HH/HASH, named by the repository's chunk hash of their plain
// encoding) like segments: prune keeps those a record names.

const patchMagic = "UMBRAPAT"

// patchFormat is the first repository format with segment patches.
const patchFormat = 8

// patchDivisor: a patch holds at most segment chunks / patchDivisor
// entries; past that a new base is cheaper to read and not much dearer
// to write.
const patchDivisor = 16

// patchEntry is one chunk of a segment that differs from its base: its
// place in the segment and its hash (zero: an all-zero chunk).
type patchEntry struct {
	at uint32
	h  Hash
}

// segPatch is a decoded patch.
type segPatch struct {
	chunkSize int
	size      int64 // the volume's
	first     int64 // the segment's first chunk
	count     int64 // the segment's chunks
	base      Hash  // the name of the segment it patches
	ents      []patchEntry
}

// encodePatch is the plain encoding of p for hashes of hashBytes bytes:
// magic, u16 version 1, u8 hash length, u32 chunk size, u64 volume size,
// u64 first chunk, u64 chunk count, 32-byte base, u32 entry count,
// entries (u32 place, strictly ascending, then the hash), CRC-32C.
func encodePatch(p *segPatch, hashBytes int) []byte {
	b := make([]byte, 0, 8+2+1+4+8*3+32+4+len(p.ents)*(4+hashBytes)+4)
	b = append(b, patchMagic...)
	b = binary.LittleEndian.AppendUint16(b, 1)
	b = append(b, byte(hashBytes))
	b = binary.LittleEndian.AppendUint32(b, uint32(p.chunkSize))
	b = binary.LittleEndian.AppendUint64(b, uint64(p.size))
	b = binary.LittleEndian.AppendUint64(b, uint64(p.first))
	b = binary.LittleEndian.AppendUint64(b, uint64(p.count))
	b = append(b, p.base[:]...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(p.ents)))
	for _, e := range p.ents {
		b = binary.LittleEndian.AppendUint32(b, e.at)
		b = append(b, e.h[:hashBytes]...)
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// decodePatch parses a patch of a repository with hashBytes-byte hashes.
func decodePatch(b []byte, hashBytes int) (*segPatch, error) {
	const what = "segment patch"
	body, err := checkCRC(what, b)
	if err != nil {
		return nil, err
	}
	const head = 8 + 2 + 1 + 4 + 8*3 + 32 + 4
	if len(body) < head || string(body[:8]) != patchMagic {
		return nil, corrupt(what, "bad magic or too short")
	}
	if binary.LittleEndian.Uint16(body[8:]) != 1 {
		return nil, corrupt(what, "unknown version")
	}
	if int(body[10]) != hashBytes {
		return nil, corrupt(what, fmt.Sprintf("%d-byte hashes in a repository of %d-byte ones", body[10], hashBytes))
	}
	p := &segPatch{chunkSize: int(binary.LittleEndian.Uint32(body[11:])), size: int64(binary.LittleEndian.Uint64(body[15:])),
		first: int64(binary.LittleEndian.Uint64(body[23:])), count: int64(binary.LittleEndian.Uint64(body[31:]))}
	copy(p.base[:], body[39:71])
	n := uint64(binary.LittleEndian.Uint32(body[71:]))
	q := body[head:]
	if !validChunkSize(p.chunkSize) || p.size < 0 || p.size > maxImageSize || p.first < 0 || p.count < 1 || p.count > maxSegmentChunks {
		return nil, corrupt(what, "bad header")
	}
	if n > uint64(p.count) || uint64(len(q)) != n*uint64(4+hashBytes) {
		return nil, corrupt(what, "entry count does not match its length")
	}
	p.ents = make([]patchEntry, n)
	for i := range p.ents {
		e := &p.ents[i]
		e.at = binary.LittleEndian.Uint32(q)
		copy(e.h[:hashBytes], q[4:])
		q = q[4+hashBytes:]
		if int64(e.at) >= p.count || i > 0 && e.at <= p.ents[i-1].at {
			return nil, corrupt(what, "places not ascending within the segment")
		}
	}
	return p, nil
}

func patchName(h Hash) string { return sharedSegmentName(h) }

// readPatch reads image x's patch of segment k, named h, and checks it
// against its name and the record: the volume, the segment and its base.
func (r *Repo) readPatch(ctx context.Context, x *Image, k int, h Hash) (*segPatch, error) {
	name := patchName(h)
	raw, err := r.be.Get(ctx, name, 0, -1)
	if err != nil {
		return nil, fmt.Errorf("image %s: chunk list patch %s: %w", x.ID, name, err)
	}
	b, err := r.seal.openInPlace(raw)
	if err != nil {
		return nil, fmt.Errorf("image %s: chunk list patch %s: %w", x.ID, name, err)
	}
	if r.hasher()(b) != h {
		return nil, fmt.Errorf("image %s: chunk list patch %s: %w: does not match its name", x.ID, name, ErrCorrupt)
	}
	p, err := decodePatch(b, r.hashLen())
	if err != nil {
		return nil, fmt.Errorf("image %s: %s: %w", x.ID, name, err)
	}
	first := int64(k) * x.SegmentChunks
	if p.chunkSize != x.ChunkSize || p.size != x.Size || p.first != first || p.count != min(x.SegmentChunks, x.NumChunks()-first) || p.base != x.Segments[k] {
		return nil, fmt.Errorf("image %s: chunk list patch %s: %w: patches another segment (size %d, chunk %d, first %d, %d chunks)", x.ID, name, ErrCorrupt, p.size, p.chunkSize, p.first, p.count)
	}
	return p, nil
}

// patched reports whether segment k of x has a patch, and its name.
func (x *Image) patched(k int) (Hash, bool) {
	if k < len(x.Patches) && x.Patches[k] != (Hash{}) {
		return x.Patches[k], true
	}
	return Hash{}, false
}
