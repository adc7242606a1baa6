// Package backup writes sector-level images of volumes into a repository
// and reads them back. A volume is cut into fixed-size chunks aligned to
// it; each chunk is named by its hash (BLAKE3, or SHA-256 where that is
// faster; keyed when the repository is encrypted), compressed with zstd
// (the reference C library through cgo when the binary has cgo, else
// klauspost/compress: compress.go),
// optionally sealed with AES-256-GCM, and stored once as a blob in a pack
// (packs keep the object count low: a million 4 KiB chunks are a few
// hundred objects, which S3 and a filesystem both handle well). Chunk
// index files say which pack holds which chunk. Each image has its own
// chunk list naming every chunk, so any image — full or incremental —
// restores on its own, and deleting one never touches another.
//
// Invariants: an image is listed only once its chunk list, the index
// files and the packs it needs are durable (written in that reverse
// order); prune deletes nothing that a listed image needs, and removes
// index entries before the packs they name; all-zero chunks are never
// stored. Objects live behind Backend: a local directory or S3.
package backup

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
)

// DefaultChunkSize is 4 KiB: the COW engine's granule, so an incremental
// image of scattered 4 KiB changes adds about what changed (the table in
// docs/benchmarks.md compares 4 to 256 KiB).
const DefaultChunkSize = 4096

// ChunkSize is kept for callers that assume the default.
const ChunkSize = DefaultChunkSize

// packTarget is where a pack is cut. (A variable: tests make packs small.)
var packTarget = 16 << 20

// Config is the repository's config object (JSON, never encrypted).
type Config struct {
	Version int    `json:"version"`
	ID      string `json:"id"`
	Hash    string `json:"hash"` // blake3 | sha256
	// HashBytes is how many bytes of the hash name a chunk: 16 in
	// encrypted repositories from format 6 on (keyed, so a collision
	// cannot be searched for offline), else 32 (0 in older configs).
	HashBytes   int    `json:"hash_bytes,omitempty"`
	ChunkSize   int    `json:"chunk_size"`
	Compression string `json:"compression"` // zstd
	Level       string `json:"level"`       // fastest | default | better: for new blobs only
	Encryption  string `json:"encryption"`  // none | aes-256-gcm
	// Checksum is the hex SHA-256 of the config's encoding without it
	// (format 7 on: encodeConfig); empty in memory.
	Checksum string `json:"checksum,omitempty"`
}

// formatVersion 8 stores a changed segment of an incremental's chunk
// list as a patch of its parent's (Image.Patches, patch.go); 7 wraps
// every metadata object in a checksummed envelope (envelope.go) and
// gives the config a checksum; 6 names chunks by 16 bytes of their keyed hash in
// encrypted repositories (hash_bytes; chunk lists version 4, chunk index
// version 2); 5 names chunk-list segments by their content, shared
// between images (segments/HH/HASH); 4 wrote version 2 pack trailers (no
// chunk hashes); 3 cut chunk lists into segments. Repositories of formats
// 2 to 5 are read as they are and upgraded by their next backup or prune
// (upgradeFormat), before it writes anything new, so an older Umbra
// refuses them instead of missing new images' lists or taking new packs
// for garbage.
const formatVersion = 8

// initFormat5 makes Init write a format-5 repository (32-byte hashes
// when encrypted too), as earlier Umbra did: tests set it.
var initFormat5 = false

// Typed errors.
var (
	ErrNoRepo  = errors.New("no Umbra repository")
	ErrCorrupt = errors.New("corrupt")
	// ErrNoImage: the repository has no image of that ID (it is an
	// fs.ErrNotExist too).
	ErrNoImage error = noImage{}
)

type noImage struct{}

func (noImage) Error() string        { return "no such image (see `umbra images list`)" }
func (noImage) Is(target error) bool { return target == fs.ErrNotExist }

// Settings open or create a repository.
type Settings struct {
	Password string      // empty: unencrypted (Init) / none given (Open)
	Cred     Credentials // S3
	// Init only:
	ChunkSize int    // 0: DefaultChunkSize
	Hash      string // "": the faster of blake3 and sha256 here
	Level     string // "": fastest
	// CacheDir is where the local index cache lives ("": cache/ in a
	// local repository's directory, else $UMBRA_CACHE_DIR or the user's
	// cache directory, under umbra/index/).
	CacheDir string
}

type loc struct {
	pack     uint32 // index in Repo.packs
	off, len uint32 // the blob in the pack
	rawOff   uint32 // the chunk in the opened blob
	raw      uint32
}

// Repo is an open repository. Its methods may be called concurrently.
type Repo struct {
	be      Backend
	cfg     Config
	seal    *sealer // nil: not encrypted
	hashKey []byte  // nil: plain hashes
	enc     encoder
	dec     *zstd.Decoder

	version atomic.Int32 // cfg.Version, as upgraded

	mu        sync.Mutex // guards the fields below
	packs     []PackID
	packIdx   map[PackID]uint32
	chunks    *chunkStore
	cacheDir  string // the local index cache's directory ("": none)
	cacheNote string // how the cache was found at open (tests)
	cacheRead int    // index objects read at open beyond the cache (tests)
	// cacheOpenBytes: bytes of the cache read to open it (tests).
	cacheOpenBytes int64
	indexes        []string // index objects loaded
	indexErrs      []error  // index objects that could not be read
	leftLocks      []string // locks of ended operations whose delete failed
}

// Init creates an unencrypted repository at location.
func Init(location string) (*Repo, error) {
	return InitWith(context.Background(), location, Settings{})
}

// Open opens an unencrypted repository at location.
func Open(location string) (*Repo, error) {
	return OpenWith(context.Background(), location, Settings{})
}

// InitWith creates a repository at location (a directory that is empty or
// missing, or an S3 bucket/prefix holding no repository).
func InitWith(ctx context.Context, location string, set Settings) (*Repo, error) {
	be, err := OpenBackend(location, set.Cred)
	if err != nil {
		return nil, err
	}
	if s3, ok := be.(*s3Backend); ok {
		if err := s3.ensureBucket(ctx); err != nil {
			return nil, err
		}
	}
	if names, err := be.List(ctx, ""); err != nil {
		return nil, fmt.Errorf("init repository %s: %w", be.Location(), err)
	} else if len(names) > 0 {
		return nil, fmt.Errorf("init repository %s: not empty (%d objects, e.g. %s); choose an empty location", be.Location(), len(names), names[0])
	}
	cfg := Config{Version: formatVersion, ID: randomID(), Hash: set.Hash, ChunkSize: set.ChunkSize, Compression: "zstd", Level: set.Level, Encryption: "none"}
	if cfg.Level == "" {
		cfg.Level = defaultLevel
	}
	if !knownLevel(cfg.Level) {
		return nil, fmt.Errorf("init repository %s: compression %q: want fastest, default or better", be.Location(), cfg.Level)
	}
	if cfg.ChunkSize == 0 {
		cfg.ChunkSize = DefaultChunkSize
	}
	if !validChunkSize(cfg.ChunkSize) {
		return nil, fmt.Errorf("init repository %s: chunk size %d: want a power of two from 4 KiB to 4 MiB", be.Location(), cfg.ChunkSize)
	}
	if cfg.Hash == "" {
		cfg.Hash = "blake3"
		if runtime.GOARCH == "arm64" {
			cfg.Hash = "sha256" // SHA-2 instructions beat BLAKE3's NEON code there
		}
	}
	if cfg.Hash != "blake3" && cfg.Hash != "sha256" {
		return nil, fmt.Errorf("init repository %s: hash %q: want blake3 or sha256", be.Location(), cfg.Hash)
	}
	if set.Password != "" {
		cfg.Encryption = "aes-256-gcm"
		cfg.HashBytes = 16
		master := make([]byte, masterKeyLen)
		rand.Read(master)
		k, err := newKeyFile(set.Password, master)
		if err != nil {
			return nil, err
		}
		kb := k.encode()
		if err := be.Put(ctx, "keys/"+randomID(), wrapObject(kb)); err != nil {
			return nil, fmt.Errorf("init repository %s: %w", be.Location(), err)
		}
		cacheKey(kb, set.Password, master) // the open below need not derive it again
	}
	if initFormat5 {
		cfg.Version, cfg.HashBytes = 5, 0
	}
	if err := be.Put(ctx, "config", encodeConfig(cfg)); err != nil {
		return nil, fmt.Errorf("init repository %s: %w", be.Location(), err)
	}
	if err := be.Sync(ctx); err != nil {
		return nil, fmt.Errorf("init repository %s: %w", be.Location(), err)
	}
	return openBackend(ctx, be, set)
}

// OpenWith opens the repository at location.
func OpenWith(ctx context.Context, location string, set Settings) (*Repo, error) {
	be, err := OpenBackend(location, set.Cred)
	if err != nil {
		return nil, err
	}
	return openBackend(ctx, be, set)
}

func openBackend(ctx context.Context, be Backend, set Settings) (*Repo, error) {
	where := be.Location()
	b, err := be.Get(ctx, "config", 0, -1)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("open repository %s: %w there (create one with `umbra repo init --repo %s`)", where, ErrNoRepo, where)
	}
	if err != nil {
		return nil, fmt.Errorf("open repository %s: %w", where, err)
	}
	cfg, err := decodeConfig(b)
	if err != nil {
		return nil, fmt.Errorf("open repository %s: %w", where, err)
	}
	if cfg.Version < 2 || cfg.Version > formatVersion || (cfg.Hash != "blake3" && cfg.Hash != "sha256") || !validChunkSize(cfg.ChunkSize) ||
		cfg.Compression != "zstd" || !knownLevel(cfg.Level) || (cfg.Encryption != "none" && cfg.Encryption != "aes-256-gcm") ||
		cfg.HashBytes != 0 && cfg.HashBytes != 32 && (cfg.HashBytes != 16 || cfg.Encryption == "none" || cfg.Version < 6) {
		why := "settings this Umbra does not know"
		if cfg.Version > formatVersion {
			why = "written by a newer Umbra: use that version"
		}
		return nil, fmt.Errorf("open repository %s: unsupported format %+v (this Umbra reads formats 2 to %d; %s)", where, cfg, formatVersion, why)
	}
	r := &Repo{be: be, cfg: cfg, packIdx: map[PackID]uint32{}}
	r.cacheDir = cacheDirFor(be, cfg, set.CacheDir)
	r.chunks = newChunkStore(r.hashLen(), r.cacheDir)
	r.version.Store(int32(cfg.Version))
	if cfg.Encryption == "none" && set.Password != "" {
		return nil, fmt.Errorf("open repository %s: %w", where, ErrNotEncrypted)
	}
	if cfg.Encryption != "none" {
		if set.Password == "" {
			return nil, fmt.Errorf("open repository %s: %w", where, ErrNeedPassword)
		}
		master, err := r.unlock(ctx, set.Password)
		if err != nil {
			return nil, fmt.Errorf("open repository %s: %w", where, err)
		}
		r.seal, _ = newSealer(master[:32])
		r.hashKey = master[32:]
	}
	n := runtime.GOMAXPROCS(0)
	// No frame checksum: every chunk is checked against its hash when read
	// (and a sealed object by its tag), so xxhash over each blob would only
	// cost time (1.5 % of a backup's CPU).
	r.enc = newEncoder(cfg.Level, n)
	// Blobs open to at most groupRaw bytes and records to a few MiB; the
	// bound keeps a damaged (or, unencrypted, forged) frame from asking
	// for gigabytes.
	r.dec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(n), zstd.WithDecoderMaxMemory(maxDecoded))
	if err := r.loadIndexes(ctx); err != nil {
		r.Close()
		return nil, fmt.Errorf("open repository %s: %w", where, err)
	}
	return r, nil
}

func (r *Repo) unlock(ctx context.Context, password string) ([]byte, error) {
	names, err := r.be.List(ctx, "keys/")
	if err != nil {
		return nil, err
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("%w: encrypted but no key file under keys/", ErrCorrupt)
	}
	// A key file that is damaged is told apart from one the password
	// does not open: when no key opens, the damaged ones are named, and
	// when every key is damaged that is the error, not the password.
	var damaged []error
	for _, n := range names {
		b, err := r.getWrapped(ctx, n)
		if err != nil && !errors.Is(err, ErrCorrupt) {
			return nil, err
		}
		var k keyFile
		if err == nil {
			if jerr := json.Unmarshal(b, &k); jerr != nil {
				err = corrupt(n, "not a key file: "+jerr.Error())
			}
		}
		if err != nil {
			damaged = append(damaged, err)
			continue
		}
		if m := cachedKey(b, password); m != nil {
			return m, nil
		}
		keyCache.unwraps.Add(1)
		m, err := k.unwrap(password)
		if err == nil {
			cacheKey(b, password, m)
			return m, nil
		}
		if !errors.Is(err, ErrWrongPassword) {
			damaged = append(damaged, fmt.Errorf("%s: %w", n, err))
		}
	}
	switch {
	case len(damaged) == len(names):
		return nil, fmt.Errorf("%w (the password was not tried; restore keys/ from a copy of the repository)", errors.Join(damaged...))
	case len(damaged) > 0:
		return nil, fmt.Errorf("%w; %d of the %d key files are damaged and were not tried: %w", ErrWrongPassword, len(damaged), len(names), errors.Join(damaged...))
	}
	return nil, ErrWrongPassword
}

// keyCache holds the master keys this process unwrapped, by key file
// and password, so that a repository opened again does not derive its
// key again: scrypt takes ~0.1 s of CPU and 32 MiB at every open, and
// the service closes a repository no backup used for 30 s or when
// another is opened (api/repocache.go), so an incremental of a 2 GiB
// volume (0.3 s) paid it again each time (0.1-0.6 s under load,
// measured 2026-12-07). The process holds the master key while the
// repository is open anyway; a few are kept (keyCacheMax), the oldest
// dropped. A password that opens no key is not kept.
var keyCache struct {
	sync.Mutex
	keys  map[[32]byte][]byte
	order [][32]byte // oldest first
	// unwraps counts the keys derived (tests).
	unwraps atomic.Int64
}

const keyCacheMax = 8

func keyCacheID(keyFile []byte, password string) [32]byte {
	h := sha256.New()
	h.Write(keyFile)
	h.Write([]byte{0})
	h.Write([]byte(password))
	var id [32]byte
	h.Sum(id[:0])
	return id
}

// cachedKey is the master key keyFile (its stored bytes) gave for
// password before, or nil.
func cachedKey(keyFile []byte, password string) []byte {
	id := keyCacheID(keyFile, password)
	keyCache.Lock()
	defer keyCache.Unlock()
	if m, ok := keyCache.keys[id]; ok {
		return slices.Clone(m)
	}
	return nil
}

// cacheKey keeps the master key keyFile gave for password.
func cacheKey(keyFile []byte, password string, master []byte) {
	id := keyCacheID(keyFile, password)
	keyCache.Lock()
	defer keyCache.Unlock()
	if keyCache.keys == nil {
		keyCache.keys = map[[32]byte][]byte{}
	}
	if _, ok := keyCache.keys[id]; ok {
		return
	}
	if len(keyCache.order) >= keyCacheMax {
		clear(keyCache.keys[keyCache.order[0]])
		delete(keyCache.keys, keyCache.order[0])
		keyCache.order = keyCache.order[1:]
	}
	keyCache.keys[id] = slices.Clone(master)
	keyCache.order = append(keyCache.order, id)
}

// upgradeFormat moves a repository of an older format to the current one
// before anything of the new format (a segment, a pack) is written.
func (r *Repo) upgradeFormat(ctx context.Context) error {
	target := int32(formatVersion)
	if writeLegacyObjects {
		target = envelopeFormat - 1 // as Umbra before the envelope
	}
	if r.version.Load() >= target {
		return nil
	}
	fail := func(err error) error {
		return fmt.Errorf("upgrade repository %s to format %d: %w", r.Location(), target, err)
	}
	// Every object wrapped before the config says they all are.
	if target >= envelopeFormat {
		if err := r.wrapLegacy(ctx); err != nil {
			return fail(err)
		}
	}
	cfg := r.cfg
	cfg.Version = int(target)
	if err := r.be.Put(ctx, "config", encodeConfig(cfg)); err != nil {
		return fail(err)
	}
	if err := r.be.Sync(ctx); err != nil {
		return fail(err)
	}
	r.version.Store(target)
	return nil
}

// Close deletes the locks of ended operations that could not be
// deleted before, and releases the codecs.
func (r *Repo) Close() {
	r.retryLeftLocks(context.Background())
	if r.chunks.cacheBehind() {
		r.updateCache() // the next open need not read this one's index objects
	}
	r.chunks.close()
	r.dec.Close()
	r.enc.close()
}

// Config returns the repository's settings.
func (r *Repo) Config() Config {
	c := r.cfg
	c.Version = int(r.version.Load())
	return c
}

// Location names the repository.
func (r *Repo) Location() string { return r.be.Location() }

func randomID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// hashLen is how many bytes of a chunk's hash name it: 16 or 32.
func (r *Repo) hashLen() int {
	if r.cfg.HashBytes == 16 {
		return 16
	}
	return 32
}

// hasher returns a chunk-hash function for one goroutine: the hash cut
// to hashLen bytes (the rest zero).
func (r *Repo) hasher() func([]byte) Hash {
	sum := r.fullHasher()
	if r.hashLen() == 16 {
		return func(b []byte) Hash {
			h := sum(b)
			clear(h[16:])
			return h
		}
	}
	return sum
}

func (r *Repo) fullHasher() func([]byte) Hash {
	switch {
	case r.cfg.Hash == "blake3" && r.hashKey == nil:
		return func(b []byte) Hash { return blake3.Sum256(b) }
	case r.cfg.Hash == "blake3":
		h, _ := blake3.NewKeyed(r.hashKey[:32])
		return func(b []byte) (out Hash) {
			h.Reset()
			h.Write(b)
			h.Sum(out[:0])
			return out
		}
	case r.hashKey == nil:
		return func(b []byte) Hash { return sha256.Sum256(b) }
	default:
		h := hmac.New(sha256.New, r.hashKey)
		return func(b []byte) (out Hash) { return sumInto(h, b) }
	}
}

func sumInto(h hash.Hash, b []byte) (out Hash) {
	h.Reset()
	h.Write(b)
	h.Sum(out[:0])
	return out
}

// getObject reads an object written by putObject.
func (r *Repo) getObject(ctx context.Context, name string) ([]byte, error) {
	return r.getObjectWith(ctx, name, r.dec)
}

// getObjectWith is getObject with another decoder: a zstd decoder keeps
// its last input and output until its next use, which for an index
// object is tens of megabytes held for nothing.
func (r *Repo) getObjectWith(ctx context.Context, name string, dec *zstd.Decoder) ([]byte, error) {
	b, err := r.getWrapped(ctx, name)
	if err != nil {
		return nil, err
	}
	z, err := r.seal.openInPlace(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	out, err := dec.DecodeAll(z, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %v", name, ErrCorrupt, err)
	}
	return out, nil
}

// Refresh catches up with other processes: it loads index objects
// written since the repository was opened, and reloads all of them when
// one it had loaded is gone (a prune rewrote them).
func (r *Repo) Refresh(ctx context.Context) error {
	b, err := r.be.Get(ctx, "config", 0, -1)
	if err != nil {
		return err
	}
	// Another process may have upgraded the format (the rest is fixed).
	cfg, err := decodeConfig(b)
	if err != nil {
		return fmt.Errorf("repository %s: %w", r.Location(), err)
	}
	if cfg.Version < int(r.version.Load()) || cfg.Version > formatVersion {
		return fmt.Errorf("repository %s was replaced: open it again", r.Location())
	}
	v := cfg.Version
	cfg.Version = r.cfg.Version
	if cfg != r.cfg {
		return fmt.Errorf("repository %s was replaced: open it again", r.Location())
	}
	r.version.Store(int32(v))
	names, err := r.be.List(ctx, "index/")
	if err != nil {
		return err
	}
	r.mu.Lock()
	have := map[string]bool{}
	for _, n := range r.indexes {
		have[n] = true
	}
	r.mu.Unlock()
	listed := map[string]bool{}
	var fresh []string
	for _, n := range names {
		listed[n] = true
		if !have[n] {
			fresh = append(fresh, n)
		}
	}
	for n := range have {
		if !listed[n] {
			r.resetIndex(nil)
			return r.loadIndexes(ctx)
		}
	}
	return r.loadIndexNames(ctx, fresh)
}

// resetIndex forgets every chunk and pack; indexes are the index
// objects that will be loaded next.
func (r *Repo) resetIndex(indexes []string) {
	r.chunks.close()
	r.mu.Lock()
	r.packs, r.packIdx, r.indexes, r.indexErrs = nil, map[PackID]uint32{}, indexes, nil
	r.mu.Unlock()
}

// loadIndexes reads every chunk index object into the chunk store:
// those the local index cache covers from it, the others from the
// repository, after which the cache is written again to cover them all
// when it was missing or lacks many (cacheSlack).
// A damaged index object is remembered (verify reports it; prune
// rebuilds from pack trailers).
func (r *Repo) loadIndexes(ctx context.Context) error {
	names, err := r.be.List(ctx, "index/")
	if err != nil {
		return err
	}
	if r.cacheDir == "" {
		return r.loadIndexNames(ctx, names)
	}
	// One process at a time reads or rebuilds the cache: a second one
	// opening the repository meanwhile waits and then finds it current.
	unlock := lockCacheDir(r.cacheDir)
	defer unlock()
	fresh := names
	base, why := r.openCache(names)
	if base != nil {
		covered := map[string]bool{}
		r.mu.Lock()
		r.packs = slices.Clone(base.meta.Packs)
		for i, p := range r.packs {
			r.packIdx[p] = uint32(i)
		}
		r.indexes = slices.Clone(base.meta.Covered)
		for _, n := range r.indexes {
			covered[n] = true
		}
		r.mu.Unlock()
		r.chunks.setBase(base)
		fresh = nil
		for _, n := range names {
			if !covered[n] {
				fresh = append(fresh, n)
			}
		}
		r.cacheNote = "used"
	} else {
		r.cacheNote = "rebuilt: " + why
	}
	r.cacheRead = len(fresh)
	if err := r.loadIndexNames(ctx, fresh); err != nil {
		return err
	}
	if base == nil || base.v1 || r.chunks.cacheBehind() {
		r.persistCache() // a version 1 cache is written again as version 2
	}
	return nil
}

// indexReader is what index objects are read with, kept from object to
// object: a decoder, a buffer over it, and the memory an object is read
// into. Read into new memory (a backup's object is ~4 MiB stored) with
// a new 64 KiB buffer, verify's reading of the index again left 1.1 GiB
// to collect at 16 Mi chunks (266 objects), prune's reading of its new
// index (512 objects) 0.6 GiB.
type indexReader struct {
	dec *zstd.Decoder
	br  *bufio.Reader
	buf []byte
}

func newIndexReader() (*indexReader, error) {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
	if err != nil {
		return nil, err
	}
	return &indexReader{dec: dec, br: bufio.NewReaderSize(dec, 64<<10)}, nil
}

// entries streams the opened index object z (its compressed bytes)
// through readChunkIndex.
func (ir *indexReader) entries(z []byte, hashLen int, pack func(PackID, int), entry func(blobEntry)) error {
	if err := ir.dec.Reset(bytes.NewReader(z)); err != nil {
		return err
	}
	ir.br.Reset(ir.dec)
	_, err := readChunkIndex(ir.br, hashLen, pack, entry)
	return err
}

// checkIndexObject reads index object n, opens it and decodes it whole
// without keeping its entries, and returns its opened (compressed)
// bytes for a second pass, valid until ir reads the next one.
func (r *Repo) checkIndexObject(ctx context.Context, ir *indexReader, n string) ([]byte, error) {
	b, err := r.be.GetInto(ctx, n, 0, -1, ir.buf[:cap(ir.buf)])
	if err != nil {
		return nil, err
	}
	if cap(b) > cap(ir.buf) {
		ir.buf = b[:0]
	}
	raw, err := unwrapObject(n, b, r.legacyObjects())
	if err != nil {
		return nil, err
	}
	z, err := r.seal.openInPlace(raw)
	if err != nil {
		return nil, err
	}
	if err := ir.entries(z, r.hashLen(), func(PackID, int) {}, func(blobEntry) {}); err != nil {
		return nil, err
	}
	return z, nil
}

// recheckIndexes reads again every index object the chunk index holds
// (through the local cache, they were read when the cache was written)
// and, when one no longer reads or is gone, builds the index again from
// the repository alone, so that verify reports what the repository
// holds, not what the cache remembers.
func (r *Repo) recheckIndexes(ctx context.Context) error {
	r.mu.Lock()
	names := slices.Clone(r.indexes)
	r.mu.Unlock()
	ir, err := newIndexReader()
	if err != nil {
		return err
	}
	defer ir.dec.Close()
	for _, n := range names {
		_, err := r.checkIndexObject(ctx, ir, n)
		if err == nil {
			continue
		}
		listed, lerr := r.be.List(ctx, "index/")
		if lerr != nil {
			return fmt.Errorf("index %s: %w; list index objects: %v", n, err, lerr)
		}
		r.resetIndex(nil)
		if err := r.loadIndexNames(ctx, listed); err != nil {
			return err
		}
		r.updateCache()
		return nil
	}
	return nil
}

// countingReaderAt counts the bytes read through it.
type countingReaderAt struct {
	r io.ReaderAt
	n atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

// damagedSuffix marks a local index cache found damaged after it was
// opened (its pages are checked as read), until the next open rebuilds
// it.
const damagedSuffix = ".damaged"

// cachePath is the local index cache's file.
func (r *Repo) cachePath() string { return filepath.Join(r.cacheDir, "index.run") }

// cacheKey names the repository in its cache (a copy of a repository
// has the same ID at another place).
func (r *Repo) cacheKey() string { return r.cfg.ID + " " + r.Location() }

// openCache opens the local index cache: its header, page keys and
// metadata (its pages are checked as they are read, at any later
// time); it is used only if it belongs to this repository and every
// index object it covers is still listed (a prune or repair replaces
// them). why says why it is not used.
func (r *Repo) openCache(names []string) (*run, string) {
	f, err := os.Open(r.cachePath())
	if err != nil {
		if os.Remove(r.cachePath()+damagedSuffix) == nil {
			return nil, "damaged: a page did not read back as written"
		}
		return nil, "none"
	}
	fail := func(why string) (*run, string) {
		f.Close()
		return nil, why
	}
	fi, err := f.Stat()
	if err != nil {
		return fail(err.Error())
	}
	cr := &countingReaderAt{r: f}
	base, err := openRun(cr, fi.Size(), r.hashLen(), nil)
	r.cacheOpenBytes = cr.n.Load()
	if err != nil {
		return fail(err.Error())
	}
	if base.meta.Repo != r.cacheKey() {
		return fail("another repository's")
	}
	listed := map[string]bool{}
	for _, n := range names {
		listed[n] = true
	}
	for _, n := range base.meta.Covered {
		if !listed[n] {
			return fail("stale: index object " + n + " is gone")
		}
	}
	base.f = f
	path := r.cachePath()
	base.onDamage = func() {
		// Pages are checked as they are read: a damaged one is found
		// now, not at open. The cache goes (unless another process
		// wrote a new one meanwhile), and the next open rebuilds it.
		if cur, err := os.Stat(path); err == nil && os.SameFile(cur, fi) {
			os.Rename(path, path+damagedSuffix)
		}
	}
	return base, ""
}

// updateCache writes the cache again after the index objects were
// replaced (prune, repair), under the cache's lock.
func (r *Repo) updateCache() {
	if r.cacheDir == "" {
		return
	}
	unlock := lockCacheDir(r.cacheDir)
	defer unlock()
	r.persistCache()
}

// persistCache writes the whole chunk index as the local index cache,
// covering the index objects loaded. A failure leaves the index as it
// was (the cache only saves reading the index objects next time).
func (r *Repo) persistCache() {
	r.mu.Lock()
	meta := runMeta{Repo: r.cacheKey(), Packs: slices.Clone(r.packs), Covered: slices.Clone(r.indexes)}
	r.mu.Unlock()
	if meta.Packs == nil {
		meta.Packs = []PackID{}
	}
	r.chunks.mu.Lock()
	defer r.chunks.mu.Unlock()
	if r.chunks.fold(meta, r.cachePath()) == nil {
		r.chunks.changed, r.chunks.cached = false, r.chunks.n
	}
}

func (r *Repo) loadIndexNames(ctx context.Context, names []string) error {
	ir, err := newIndexReader()
	if err != nil {
		return err
	}
	defer ir.dec.Close()
	es := make([]indexEntry, 0, 1<<14)
	for _, n := range names {
		// Streamed from the opened object into the chunk store (the
		// decompressed index is never whole in memory): once to check
		// it whole, then to add its entries, so that nothing of a
		// damaged object is taken.
		z, err := r.checkIndexObject(ctx, ir, n)
		if err == nil {
			var pack uint32
			err = ir.entries(z, r.hashLen(), func(id PackID, m int) {
				r.mu.Lock()
				pack = r.packNumber(id)
				r.mu.Unlock()
			}, func(e blobEntry) {
				es = append(es, e.entry(pack))
				if len(es) == cap(es) {
					r.chunks.addMany(es)
					es = es[:0]
				}
			})
			r.chunks.addMany(es)
			es = es[:0]
		}
		r.mu.Lock()
		if err != nil {
			r.indexErrs = append(r.indexErrs, fmt.Errorf("index %s: %w", n, err))
		} else {
			r.indexes = append(r.indexes, n)
		}
		r.mu.Unlock()
	}
	return nil
}

// addPacks records where the chunks of many packs are: many at once with
// one sort and one merge of the index (one by one merged it again every
// 16 384 chunks), a few into its map of recent ones. fresh: the caller
// looked each chunk up and did not find it (chunkStore.addFresh).
// Callers hold mu or own r.
func (r *Repo) addPacks(ps []packBlobs, fresh bool) {
	n := 0
	for _, p := range ps {
		n += len(p.Blobs)
	}
	es := make([]indexEntry, 0, n)
	for _, p := range ps {
		i := r.packNumber(p.ID)
		for _, e := range p.Blobs {
			es = append(es, e.entry(i))
		}
	}
	if fresh {
		r.chunks.addFresh(es)
		return
	}
	r.chunks.addMany(es)
}

// entry is e's chunk index entry for the pack numbered pack.
func (e blobEntry) entry(pack uint32) indexEntry {
	return indexEntry{e.Hash, loc{pack: pack, off: e.Off, len: e.Len, rawOff: e.RawOff, raw: e.Raw}}
}

// packNumber is pack id's number in r.packs, added if new. Callers hold
// mu or own r.
func (r *Repo) packNumber(id PackID) uint32 {
	i, ok := r.packIdx[id]
	if !ok {
		i = uint32(len(r.packs))
		r.packs = append(r.packs, id)
		r.packIdx[id] = i
	}
	return i
}

func (r *Repo) lookup(h Hash) (loc, PackID, bool) {
	l, ok := r.chunks.get(h)
	if !ok {
		return loc{}, PackID{}, false
	}
	return l, r.packOf(l), true
}

// packOf names the pack holding a chunk found at l.
func (r *Repo) packOf(l loc) PackID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.packs[l.pack]
}

// ErrMissingChunk: no index names a pack holding the chunk.
var ErrMissingChunk = errors.New("chunk missing from the repository")

// missing is why chunk h was not found in the index: ErrMissingChunk,
// unless a read of the index failed (a damaged page of the local index
// cache: the chunk may well be stored), which it then names.
func (r *Repo) missing(h Hash) error {
	if err := r.chunks.failed(); err != nil {
		return fmt.Errorf("chunk %s: looking it up: %w", h, err)
	}
	return fmt.Errorf("chunk %s: %w", h, ErrMissingChunk)
}

// openBlob turns a stored blob into the chunks it holds.
func (r *Repo) openBlob(blob []byte) ([]byte, error) {
	z, err := r.seal.open(nil, blob)
	if err != nil {
		return nil, err
	}
	data, err := r.decodeBlob(nil, z)
	if err != nil {
		return nil, err
	}
	return data, nil
}

// openBlobInto is openBlob for a caller that owns blob (it is decrypted
// in place) and does not keep the result: it is decompressed into dst's
// memory when it fits, to spare the garbage collector a blob a call.
func (r *Repo) openBlobInto(dst, blob []byte) ([]byte, error) {
	z, err := r.seal.openInPlace(blob)
	if err != nil {
		return nil, err
	}
	return r.decodeBlob(dst, z)
}

// decodeBlob decodes the zstd frame z into dst's room: with the C library
// when it takes it, else with the Go decoder, whose error names a damaged
// frame.
func (r *Repo) decodeBlob(dst, z []byte) ([]byte, error) {
	if data, ok := cDecode(dst, z, maxDecoded); ok {
		return data, nil
	}
	data, err := r.dec.DecodeAll(z, dst[:0])
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return data, nil
}

// chunkIn takes chunk h out of an opened blob, checking its hash.
func chunkIn(h Hash, l loc, group []byte, sum func([]byte) Hash) ([]byte, error) {
	if uint64(l.rawOff)+uint64(l.raw) > uint64(len(group)) {
		return nil, fmt.Errorf("chunk %s: %w: lies outside its blob", h, ErrCorrupt)
	}
	data := group[l.rawOff : l.rawOff+l.raw]
	if sum(data) != h {
		return nil, fmt.Errorf("chunk %s: %w: content does not match its hash", h, ErrCorrupt)
	}
	return data, nil
}

// getChunk reads one chunk.
func (r *Repo) getChunk(ctx context.Context, h Hash, sum func([]byte) Hash) ([]byte, error) {
	l, pid, ok := r.lookup(h)
	if !ok {
		return nil, r.missing(h)
	}
	blob, err := r.be.Get(ctx, pid.name(), int64(l.off), int64(l.len))
	if err != nil {
		return nil, fmt.Errorf("chunk %s in pack %s: %w", h, pid, err)
	}
	group, err := r.openBlob(blob)
	if err != nil {
		return nil, fmt.Errorf("chunk %s in pack %s: %w", h, pid, err)
	}
	return chunkIn(h, l, group, sum)
}

func imageName(id string) string { return "images/" + id }
func listName(id string) string  { return "lists/" + id }

// validImageID keeps image IDs usable as object names.
func validImageID(id string) bool {
	if id == "" || len(id) > 200 || strings.HasPrefix(id, ".") {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}
