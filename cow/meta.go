package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// The metadata log (meta.log) of a volume's diff area: a header, then
// records appended in order. Each record is framed as
//
//	type u8 | payload length u32 | payload | crc32c(type|length|payload) u32
//
// and replayed in order on open. A torn or corrupt tail ends the log (it
// was never fsynced, so nothing relied on it). See docs/formats.md.

// Version 2 added the data checksum of MAP records appended while the
// volume runs (see record.Sum); version 1 logs, whose MAP records all
// follow their data's fsync, are read as before.
const (
	metaMagic      = "UMBRAMLG"
	metaVersion    = 2
	metaVersionMin = 1
	metaHeaderSize = 64
	maxPayload     = 64 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt reports metadata that fails its checks.
var ErrCorrupt = errors.New("corrupt metadata")

type metaHeader struct {
	Version   uint16
	ChunkSize uint32
	VolSize   uint64
	Created   int64 // unix nanoseconds
}

func (h metaHeader) encode() []byte {
	b := make([]byte, metaHeaderSize)
	copy(b, metaMagic)
	binary.LittleEndian.PutUint16(b[8:], h.Version)
	binary.LittleEndian.PutUint32(b[12:], h.ChunkSize)
	binary.LittleEndian.PutUint64(b[16:], h.VolSize)
	binary.LittleEndian.PutUint64(b[24:], uint64(h.Created))
	binary.LittleEndian.PutUint32(b[60:], crc32.Checksum(b[:60], castagnoli))
	return b
}

func decodeMetaHeader(b []byte) (metaHeader, error) {
	var h metaHeader
	if len(b) < metaHeaderSize {
		return h, fmt.Errorf("header is %d bytes, want %d: %w", len(b), metaHeaderSize, ErrCorrupt)
	}
	if string(b[:8]) != metaMagic {
		return h, fmt.Errorf("bad magic %q: %w", b[:8], ErrCorrupt)
	}
	if got, want := binary.LittleEndian.Uint32(b[60:]), crc32.Checksum(b[:60], castagnoli); got != want {
		return h, fmt.Errorf("header checksum %08x, want %08x: %w", got, want, ErrCorrupt)
	}
	h.Version = binary.LittleEndian.Uint16(b[8:])
	h.ChunkSize = binary.LittleEndian.Uint32(b[12:])
	h.VolSize = binary.LittleEndian.Uint64(b[16:])
	h.Created = int64(binary.LittleEndian.Uint64(b[24:]))
	if h.Version < metaVersionMin || h.Version > metaVersion {
		return h, fmt.Errorf("metadata version %d, this build reads %d to %d: %w", h.Version, metaVersionMin, metaVersion, ErrCorrupt)
	}
	if err := validChunkSize(int64(h.ChunkSize)); err != nil {
		return h, fmt.Errorf("%v: %w", err, ErrCorrupt)
	}
	return h, nil
}

type recType uint8

const (
	recSnapCreate  recType = 1
	recSnapDelete  recType = 2
	recInvalid     recType = 3
	recMap         recType = 4
	recUnmap       recType = 5
	recCursor      recType = 6
	recCBT         recType = 7
	recClean       recType = 8
	recRevertBegin recType = 9
	recRevertEnd   recType = 10
)

// record is the decoded form of every record type; fields unused by a
// type are zero.
type record struct {
	Type       recType
	Gen        uint64
	Chunk      uint64
	Slot       int64 // zeroSlot for an all-zero chunk
	Persistent bool
	Reliable   bool
	Created    int64
	ID, SetID  string
	Reason     string
	Bitmap     []byte // serialized roaring bitmap (recCBT)
	// Summed: a MAP record written before its slot's data was known
	// durable carries Sum, the xxHash64 of the chunk's bytes (its length:
	// chunkLen), and replay keeps it only if the slot holds them.
	Summed bool
	Sum    uint64
}

func (r record) payload() []byte {
	var b []byte
	u64 := func(v uint64) { b = binary.LittleEndian.AppendUint64(b, v) }
	str8 := func(s string) { b = append(b, byte(len(s))); b = append(b, s...) }
	switch r.Type {
	case recSnapCreate:
		u64(r.Gen)
		b = append(b, boolByte(r.Persistent))
		u64(uint64(r.Created))
		str8(r.ID)
		str8(r.SetID)
	case recSnapDelete, recRevertBegin, recRevertEnd:
		u64(r.Gen)
	case recCursor:
		u64(r.Gen)
		u64(r.Chunk)
	case recInvalid:
		u64(r.Gen)
		s := r.Reason
		if len(s) > 0xffff {
			s = s[:0xffff]
		}
		b = binary.LittleEndian.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	case recMap:
		u64(r.Chunk)
		u64(r.Gen)
		u64(uint64(r.Slot))
		if r.Summed {
			u64(r.Sum)
		}
	case recUnmap:
		u64(r.Chunk)
		u64(r.Gen)
	case recCBT:
		u64(r.Gen)
		b = append(b, boolByte(r.Reliable))
		b = append(b, r.Bitmap...)
	case recClean:
	}
	return b
}

func (r record) encode() []byte {
	p := r.payload()
	b := make([]byte, 0, 9+len(p))
	b = append(b, byte(r.Type))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(p)))
	b = append(b, p...)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// decodeRecord decodes the record at the start of b and returns its
// encoded length. io.ErrUnexpectedEOF means b ends inside the record.
func decodeRecord(b []byte) (record, int, error) {
	var r record
	if len(b) < 5 {
		return r, 0, errTorn
	}
	n := binary.LittleEndian.Uint32(b[1:5])
	if n > maxPayload {
		return r, 0, fmt.Errorf("record payload of %d bytes: %w", n, ErrCorrupt)
	}
	total := 9 + int(n)
	if len(b) < total {
		return r, 0, errTorn
	}
	if got, want := binary.LittleEndian.Uint32(b[5+n:]), crc32.Checksum(b[:5+n], castagnoli); got != want {
		return r, 0, fmt.Errorf("record checksum %08x, want %08x: %w", got, want, ErrCorrupt)
	}
	r.Type = recType(b[0])
	p := b[5 : 5+n]
	d := decoder{b: p}
	switch r.Type {
	case recSnapCreate:
		r.Gen = d.u64()
		r.Persistent = d.u8() != 0
		r.Created = int64(d.u64())
		r.ID = d.str(int(d.u8()))
		r.SetID = d.str(int(d.u8()))
	case recSnapDelete, recRevertBegin, recRevertEnd:
		r.Gen = d.u64()
	case recCursor:
		r.Gen = d.u64()
		r.Chunk = d.u64()
	case recInvalid:
		r.Gen = d.u64()
		r.Reason = d.str(int(d.u16()))
	case recMap:
		r.Chunk = d.u64()
		r.Gen = d.u64()
		r.Slot = int64(d.u64())
		if len(d.b) == 8 {
			r.Summed, r.Sum = true, d.u64()
		}
	case recUnmap:
		r.Chunk = d.u64()
		r.Gen = d.u64()
	case recCBT:
		r.Gen = d.u64()
		r.Reliable = d.u8() != 0
		r.Bitmap = append([]byte(nil), d.rest()...)
	case recClean:
	default:
		return r, 0, fmt.Errorf("unknown record type %d: %w", b[0], ErrCorrupt)
	}
	if d.bad || (r.Type != recCBT && len(d.b) != 0) {
		return r, 0, fmt.Errorf("record type %d: payload of %d bytes does not match: %w", r.Type, n, ErrCorrupt)
	}
	if r.Type == recMap && (r.Slot < zeroSlot || r.Summed && r.Slot == zeroSlot) {
		return r, 0, fmt.Errorf("map record with slot %d (data checksum: %v): %w", r.Slot, r.Summed, ErrCorrupt)
	}
	return r, total, nil
}

var errTorn = errors.New("torn record")

type decoder struct {
	b   []byte
	bad bool
}

func (d *decoder) take(n int) []byte {
	if n > len(d.b) || d.bad {
		d.bad = true
		return make([]byte, n)
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}
func (d *decoder) u8() uint8        { return d.take(1)[0] }
func (d *decoder) u16() uint16      { return binary.LittleEndian.Uint16(d.take(2)) }
func (d *decoder) u64() uint64      { return binary.LittleEndian.Uint64(d.take(8)) }
func (d *decoder) str(n int) string { return string(d.take(n)) }
func (d *decoder) rest() []byte     { v := d.b; d.b = nil; return v }

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
}
