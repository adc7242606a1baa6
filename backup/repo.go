// Package backup writes sector-level images of volumes into a repository:
// fixed-size chunks aligned to the volume, each named by its BLAKE3 hash
// and compressed with zstd, shared by every image and volume that holds
// the same bytes (dedup), and one index per image listing every chunk, so
// any image — full or incremental — restores on its own. An image appears
// only once all its chunks and its index are durable. All-zero chunks are
// never stored.
//
// This first version has a local-directory repository; the S3 backend,
// encryption, locks and prune are still to come (issue 7).
package backup

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
)

// ChunkSize is the image chunk: 4 KiB, the COW engine's default, so an
// incremental image of scattered 4 KiB changes adds about what changed.
const ChunkSize = 4096

// Config is the repository's config.json.
type Config struct {
	Version     int    `json:"version"`
	Hash        string `json:"hash"`
	ChunkSize   int    `json:"chunk_size"`
	Compression string `json:"compression"`
}

// Hash names a chunk; the zero hash stands for an all-zero chunk.
type Hash [32]byte

func (h Hash) String() string { return hex.EncodeToString(h[:]) }

// Typed errors.
var (
	ErrNoRepo  = errors.New("no Umbra repository")
	ErrCorrupt = errors.New("corrupt")
)

// Repo is an open repository.
type Repo struct {
	dir string
	cfg Config
	enc *zstd.Encoder
	dec *zstd.Decoder
}

// Init creates a repository in dir (which must be empty or missing).
func Init(dir string) (*Repo, error) {
	if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 {
		return nil, fmt.Errorf("init repository %s: the directory is not empty", dir)
	}
	for _, d := range []string{dir, filepath.Join(dir, "chunks"), filepath.Join(dir, "images")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("init repository %s: %w", dir, err)
		}
	}
	cfg := Config{Version: 1, Hash: "blake3", ChunkSize: ChunkSize, Compression: "zstd"}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	if err := writeAtomic(filepath.Join(dir, "config.json"), b); err != nil {
		return nil, err
	}
	return Open(dir)
}

// Open opens the repository in dir.
func Open(dir string) (*Repo, error) {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("open repository %s: %w (create one with `umbra repo init --repo %s`): %v", dir, ErrNoRepo, dir, err)
	}
	var cfg Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("open repository %s: config.json: %w: %v", dir, ErrCorrupt, err)
	}
	if cfg.Version != 1 || cfg.Hash != "blake3" || cfg.ChunkSize != ChunkSize || cfg.Compression != "zstd" {
		return nil, fmt.Errorf("open repository %s: unsupported format %+v", dir, cfg)
	}
	enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	dec, _ := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	return &Repo{dir: dir, cfg: cfg, enc: enc, dec: dec}, nil
}

// Close releases the codecs.
func (r *Repo) Close() { r.dec.Close(); r.enc.Close() }

func (r *Repo) chunkPath(h Hash) string {
	s := h.String()
	return filepath.Join(r.dir, "chunks", s[:2], s)
}

// writeAtomic writes a file so that it is either absent or complete and
// durable: temporary file, fsync, rename, fsync of the directory.
func writeAtomic(path string, b []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".tmp-")
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		os.Remove(f.Name())
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(f.Name())
		return err
	}
	f.Close()
	if err := os.Rename(f.Name(), path); err != nil {
		os.Remove(f.Name())
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// putChunk stores data under its hash unless it is there; it reports
// whether it wrote.
func (r *Repo) putChunk(h Hash, data []byte) (bool, int64, error) {
	p := r.chunkPath(h)
	if _, err := os.Stat(p); err == nil {
		return false, 0, nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return false, 0, err
	}
	z := r.enc.EncodeAll(data, nil)
	// Not synced one by one: Backup syncs the filesystem once before it
	// writes the index that makes the chunks reachable.
	f, err := os.CreateTemp(filepath.Dir(p), ".tmp-")
	if err != nil {
		return false, 0, fmt.Errorf("store chunk %s: %w", h, err)
	}
	_, err = f.Write(z)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
		return false, 0, fmt.Errorf("store chunk %s: %w", h, err)
	}
	return true, int64(len(z)), nil
}

// getChunk reads, decompresses and verifies a chunk.
func (r *Repo) getChunk(h Hash, dst []byte) ([]byte, error) {
	z, err := os.ReadFile(r.chunkPath(h))
	if err != nil {
		return nil, fmt.Errorf("chunk %s: %w", h, err)
	}
	data, err := r.dec.DecodeAll(z, dst[:0])
	if err != nil {
		return nil, fmt.Errorf("chunk %s: %w: %v", h, ErrCorrupt, err)
	}
	if blake3.Sum256(data) != h {
		return nil, fmt.Errorf("chunk %s: %w: content does not match its hash", h, ErrCorrupt)
	}
	return data, nil
}

// Index is one image: every chunk of the volume at the snapshot.
type Index struct {
	ID       string    `json:"id"`
	Volume   string    `json:"volume"`
	Snapshot string    `json:"snapshot"` // the snapshot it was read from
	Parent   string    `json:"parent,omitempty"`
	Size     int64     `json:"size"`
	Created  time.Time `json:"created"`
	Chunks   []Hash    `json:"-"`
}

const indexMagic = "UMBRAIDX"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Encode serializes the index (format in docs/formats.md).
func (x *Index) Encode() []byte {
	var b []byte
	b = append(b, indexMagic...)
	b = binary.LittleEndian.AppendUint16(b, 1)
	b = binary.LittleEndian.AppendUint32(b, ChunkSize)
	b = binary.LittleEndian.AppendUint64(b, uint64(x.Size))
	b = binary.LittleEndian.AppendUint64(b, uint64(x.Created.UnixNano()))
	for _, s := range []string{x.ID, x.Volume, x.Snapshot, x.Parent} {
		b = binary.LittleEndian.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	}
	b = binary.LittleEndian.AppendUint64(b, uint64(len(x.Chunks)))
	for _, h := range x.Chunks {
		b = append(b, h[:]...)
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// DecodeIndex parses an index and checks it.
func DecodeIndex(b []byte) (*Index, error) {
	bad := func(why string) (*Index, error) { return nil, fmt.Errorf("image index: %w: %s", ErrCorrupt, why) }
	if len(b) < len(indexMagic)+2+4+8+8+4 || string(b[:8]) != indexMagic {
		return bad("bad magic or too short")
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return bad("checksum mismatch")
	}
	p := body[8:]
	if binary.LittleEndian.Uint16(p) != 1 {
		return bad("unknown version")
	}
	if binary.LittleEndian.Uint32(p[2:]) != ChunkSize {
		return bad("other chunk size")
	}
	x := &Index{Size: int64(binary.LittleEndian.Uint64(p[6:])), Created: time.Unix(0, int64(binary.LittleEndian.Uint64(p[14:]))).UTC()}
	p = p[22:]
	var strs [4]string
	for i := range strs {
		if len(p) < 2 {
			return bad("truncated")
		}
		n := int(binary.LittleEndian.Uint16(p))
		if len(p) < 2+n {
			return bad("truncated")
		}
		strs[i], p = string(p[2:2+n]), p[2+n:]
	}
	x.ID, x.Volume, x.Snapshot, x.Parent = strs[0], strs[1], strs[2], strs[3]
	if len(p) < 8 {
		return bad("truncated")
	}
	n := binary.LittleEndian.Uint64(p)
	p = p[8:]
	if x.Size < 0 || n != uint64((x.Size+ChunkSize-1)/ChunkSize) || uint64(len(p)) != n*32 {
		return bad("chunk count does not match the size")
	}
	x.Chunks = make([]Hash, n)
	for i := range x.Chunks {
		copy(x.Chunks[i][:], p[i*32:])
	}
	return x, nil
}

func (r *Repo) indexPath(id string) string { return filepath.Join(r.dir, "images", id+".idx") }

// Image reads image id's index.
func (r *Repo) Image(id string) (*Index, error) {
	b, err := os.ReadFile(r.indexPath(id))
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", id, err)
	}
	x, err := DecodeIndex(b)
	if err != nil {
		return nil, fmt.Errorf("image %s (%s): %w", id, r.indexPath(id), err)
	}
	return x, nil
}

// Images lists the images, oldest first; unreadable indexes are reported
// in errs.
func (r *Repo) Images() (list []*Index, errs []error) {
	ents, err := os.ReadDir(filepath.Join(r.dir, "images"))
	if err != nil {
		return nil, []error{err}
	}
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, ".idx") {
			continue
		}
		x, err := r.Image(strings.TrimSuffix(name, ".idx"))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		list = append(list, x)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Created.Before(list[j].Created) })
	return list, errs
}

// Latest returns the newest image of vol, or nil.
func (r *Repo) Latest(vol string) *Index {
	list, _ := r.Images()
	for i := len(list) - 1; i >= 0; i-- {
		if list[i].Volume == vol {
			return list[i]
		}
	}
	return nil
}

var zeroChunk = make([]byte, ChunkSize)

// Restore writes image id to the file or device at path, verifying every
// chunk; zero chunks of a regular file are left as holes.
func (r *Repo) Restore(id, path string, progress func(done, total int64)) error {
	x, err := r.Image(id)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("restore to %s: %w", path, err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	regular := fi.Mode().IsRegular()
	if regular {
		if err := f.Truncate(0); err != nil {
			return err
		}
		if err := f.Truncate(x.Size); err != nil {
			return err
		}
	}
	buf := make([]byte, ChunkSize)
	for i, h := range x.Chunks {
		off := int64(i) * ChunkSize
		n := min(ChunkSize, x.Size-off)
		var data []byte
		if h == (Hash{}) {
			if regular {
				continue
			}
			data = zeroChunk[:n]
		} else {
			if data, err = r.getChunk(h, buf); err != nil {
				return fmt.Errorf("restore %s at %d: %w", id, off, err)
			}
		}
		if _, err := f.WriteAt(data[:n], off); err != nil {
			return fmt.Errorf("restore to %s: %w", path, err)
		}
		if progress != nil && i%4096 == 0 {
			progress(off, x.Size)
		}
	}
	return f.Sync()
}

// VerifyReport names what verify found.
type VerifyReport struct {
	Chunks     int      `json:"chunks"`
	BadChunks  []string `json:"bad_chunks,omitempty"`
	BadImages  []string `json:"bad_images,omitempty"`
	BadIndexes []string `json:"bad_indexes,omitempty"`
	GoodImages int      `json:"good_images"`
}

// Verify re-hashes every chunk any image uses and names the images that
// a damaged or missing chunk breaks.
func (r *Repo) Verify() VerifyReport {
	var rep VerifyReport
	list, errs := r.Images()
	for _, e := range errs {
		rep.BadIndexes = append(rep.BadIndexes, e.Error())
	}
	state := map[Hash]bool{} // hash -> good
	buf := make([]byte, ChunkSize)
	for _, x := range list {
		ok := true
		for _, h := range x.Chunks {
			if h == (Hash{}) {
				continue
			}
			good, seen := state[h]
			if !seen {
				_, err := r.getChunk(h, buf)
				good = err == nil
				state[h] = good
				rep.Chunks++
				if !good {
					rep.BadChunks = append(rep.BadChunks, h.String())
				}
			}
			ok = ok && good
		}
		if ok {
			rep.GoodImages++
		} else {
			rep.BadImages = append(rep.BadImages, x.ID)
		}
	}
	return rep
}
