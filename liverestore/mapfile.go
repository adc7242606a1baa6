package liverestore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"

	"umbra/cow"
)

// The map file (sidecar) records which chunks of a live restore's target
// hold their final bytes: restored from the image, or written through the
// volume. Layout (docs/formats.md, "live restore map"):
//
//	header, mapHeaderSize bytes:
//	  magic "UMBRALRM" | version u16 | reserved u16 | chunk size u32 |
//	  image size i64 | image ID length u16 | image ID | zeros |
//	  crc32c of the bytes before it u32 (the header's last 4 bytes)
//	bitmap: a little-endian u64 word per 64 chunks; bit i%64 of word i/64
//	  set: chunk i is the target's own
//
// The header is written once, when the restore starts, and made durable
// before the target is used. Bits only ever go from 0 to 1, each only
// after the chunk's data is durable, so a torn write of the bitmap leaves
// a mix of old and new bits, every one of them true: the bitmap needs no
// checksum.
const (
	mapMagic      = "UMBRALRM"
	mapVersion    = 1
	mapHeaderSize = 4096
	maxIDLen      = 256
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// mapHeader is the decoded header of a map file.
type mapHeader struct {
	chunk int64
	size  int64
	image string
}

func (h mapHeader) nchunks() int64 { return (h.size + h.chunk - 1) / h.chunk }

func (h mapHeader) words() int64 { return (h.nchunks() + 63) / 64 }

func encodeMapHeader(h mapHeader) []byte {
	b := make([]byte, mapHeaderSize)
	copy(b, mapMagic)
	binary.LittleEndian.PutUint16(b[8:], mapVersion)
	binary.LittleEndian.PutUint32(b[12:], uint32(h.chunk))
	binary.LittleEndian.PutUint64(b[16:], uint64(h.size))
	binary.LittleEndian.PutUint16(b[24:], uint16(len(h.image)))
	copy(b[26:], h.image)
	binary.LittleEndian.PutUint32(b[mapHeaderSize-4:], crc32.Checksum(b[:mapHeaderSize-4], castagnoli))
	return b
}

// errMap says a map file is not one this version reads.
var errMap = errors.New("not a live restore map")

func decodeMapHeader(b []byte) (mapHeader, error) {
	var h mapHeader
	if len(b) < mapHeaderSize {
		return h, fmt.Errorf("%w: %d bytes, a header has %d", errMap, len(b), mapHeaderSize)
	}
	if string(b[:8]) != mapMagic {
		return h, fmt.Errorf("%w: bad magic", errMap)
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != mapVersion {
		return h, fmt.Errorf("%w: version %d (this Umbra reads %d)", errMap, v, mapVersion)
	}
	if got, want := crc32.Checksum(b[:mapHeaderSize-4], castagnoli), binary.LittleEndian.Uint32(b[mapHeaderSize-4:]); got != want {
		return h, fmt.Errorf("%w: header checksum mismatch", errMap)
	}
	h.chunk = int64(binary.LittleEndian.Uint32(b[12:]))
	h.size = int64(binary.LittleEndian.Uint64(b[16:]))
	n := int(binary.LittleEndian.Uint16(b[24:]))
	if n > maxIDLen {
		return h, fmt.Errorf("%w: image ID of %d bytes", errMap, n)
	}
	h.image = string(b[26 : 26+n])
	if h.chunk < 512 || h.chunk&(h.chunk-1) != 0 || h.size < 0 || h.size > 1<<62 {
		return h, fmt.Errorf("%w: chunk size %d, image size %d", errMap, h.chunk, h.size)
	}
	return h, nil
}

// mapFile is an open map file.
type mapFile struct {
	f cow.File
	h mapHeader
}

// createMap writes a new map file at path for h, all chunks unrestored,
// and makes it durable (file and directory entry).
func createMap(fsys cow.FS, path string, h mapHeader) (*mapFile, error) {
	if len(h.image) > maxIDLen {
		return nil, fmt.Errorf("image ID %q longer than %d bytes", h.image, maxIDLen)
	}
	f, err := fsys.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create live restore map: %w", err)
	}
	m := &mapFile{f: f, h: h}
	err = f.Truncate(mapHeaderSize + h.words()*8)
	if err == nil {
		_, err = f.WriteAt(encodeMapHeader(h), 0)
	}
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = fsys.SyncDir(dirOf(path))
	}
	if err != nil {
		f.Close()
		fsys.Remove(path)
		return nil, fmt.Errorf("create live restore map %s: %w", path, err)
	}
	return m, nil
}

// openMap opens the map file at path and reads its bitmap into words.
func openMap(fsys cow.FS, path string) (*mapFile, []uint64, error) {
	f, err := fsys.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open live restore map: %w", err)
	}
	hb := make([]byte, mapHeaderSize)
	if _, err := f.ReadAt(hb, 0); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("live restore map %s: header: %w", path, err)
	}
	h, err := decodeMapHeader(hb)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("live restore map %s: %w", path, err)
	}
	body := make([]byte, h.words()*8)
	if _, err := f.ReadAt(body, mapHeaderSize); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("live restore map %s: bitmap: %w", path, err)
	}
	words := make([]uint64, h.words())
	for i := range words {
		words[i] = binary.LittleEndian.Uint64(body[i*8:])
	}
	if n := h.nchunks(); n%64 != 0 && len(words) > 0 {
		words[len(words)-1] &= 1<<(n%64) - 1 // bits past the end mean nothing
	}
	return &mapFile{f: f, h: h}, words, nil
}

// writeWords writes words[lo:hi] of the bitmap (not synced).
func (m *mapFile) writeWords(words []uint64, lo, hi int64) error {
	b := make([]byte, (hi-lo)*8)
	for i := lo; i < hi; i++ {
		binary.LittleEndian.PutUint64(b[(i-lo)*8:], words[i])
	}
	_, err := m.f.WriteAt(b, mapHeaderSize+lo*8)
	return err
}

func dirOf(path string) string {
	for i := len(path) - 1; i >= 0; i-- {
		if path[i] == '/' {
			if i == 0 {
				return "/"
			}
			return path[:i]
		}
	}
	return "."
}
