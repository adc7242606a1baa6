package backup

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/zeebo/blake3"
	"golang.org/x/sys/unix"
)

// BlobLocation says where chunk h's blob is (for tests that damage it).
func BlobLocation(r *Repo, h Hash) (pack string, off, n int64) {
	l, pid, ok := r.lookup(h)
	if !ok {
		return "", 0, 0
	}
	return pid.name(), int64(l.off), int64(l.len)
}

// PackChunks lists the chunks pack (an object name) holds per the index.
func PackChunks(r *Repo, pack string) []Hash {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Hash
	r.chunks.each(func(h Hash, l loc) {
		if r.packs[l.pack].name() == pack {
			out = append(out, h)
		}
	})
	return out
}

// ObjectNames lists a repository's objects under prefix.
func ObjectNames(r *Repo, prefix string) []string {
	n, _ := r.be.List(context.Background(), prefix)
	return n
}

// SetSegmentChunks sets the chunks per chunk-list segment (tests make
// many small segments) and returns the old value.
func SetSegmentChunks(n int64) int64 { old := segmentChunks; segmentChunks = n; return old }

// SetSmallPacks makes packs of about n bytes and an index object every k
// packs during a backup. Like the Set functions below it returns a
// function restoring the defaults.
func SetSmallPacks(n, k int) func() {
	oldN, oldK := packTarget, indexEvery
	packTarget, indexEvery = n, k
	return func() { packTarget, indexEvery = oldN, oldK }
}

// set sets *p to v and returns a function restoring the old value.
func set[T any](p *T, v T) func() {
	old := *p
	*p = v
	return func() { *p = old }
}

// SetGroupRaw sets the most chunk bytes one blob holds.
func SetGroupRaw(n int) func() { return set(&groupRaw, n) }

// SetVerifyBatch sets how many needed chunks' packs verify checks
// together.
func SetVerifyBatch(n int) func() { return set(&verifyBatch, n) }

// SetReaderCache sets the bytes of opened blobs an ImageReader keeps.
func SetReaderCache(n int64) func() { return set(&readerCache, n) }

// SetRestoreCache sets the bytes of chunks a restore keeps for later
// batches.
func SetRestoreCache(n int64) func() { return set(&restoreCache, n) }

// SetRestoreNextCache sets the bytes of chunks a restore keeps for the
// next segment out of blobs opened for the current one.
func SetRestoreNextCache(n int64) func() { return set(&restoreNextCache, n) }

// SetBlobOpened calls fn with each blob (its pack's number and offset)
// a restore's or stream's worker opens.
func SetBlobOpened(fn func(pack, off uint32)) func() { return set(&blobOpened, fn) }

// SetPlanned calls planned with a segment's first chunk whenever a
// restore or stream has planned that segment, and starting before it
// restores it.
func SetPlanned(plannedFn, startingFn func(first int64)) func() {
	a, b := set(&planned, plannedFn), set(&starting, startingFn)
	return func() { a(); b() }
}

// SetTrailerV1 makes packs carry version 1 trailers, as earlier Umbra
// wrote them.
func SetTrailerV1() func() { return set(&writeTrailerV1, true) }

// SetPackEntries sets the most chunks a pack lists.
func SetPackEntries(n int) func() { return set(&maxPackEntries, n) }

// PackTrailerEntries reads the trailer of pack (an object name) and
// returns how many chunks it lists.
func PackTrailerEntries(r *Repo, pack string) (int, error) {
	ents, err := r.readTrailer(context.Background(), pack)
	return len(ents), err
}

// SegmentObject is the object holding segment k of image id's chunk list.
func SegmentObject(r *Repo, id string, k int) string {
	x, err := r.image(context.Background(), id)
	if err != nil {
		panic(err)
	}
	if x.Shared {
		return sharedSegmentName(x.Segments[k])
	}
	if x.Segments == nil {
		return listName(id)
	}
	return segmentName(id, k)
}

// SegmentObjects lists, sorted and once each, the objects holding the
// chunk lists of images ids: segments and their patches.
func SegmentObjects(r *Repo, ids ...string) []string {
	set := map[string]bool{}
	for _, id := range ids {
		x, err := r.image(context.Background(), id)
		if err != nil {
			panic(err)
		}
		for k := range x.numSegments() {
			set[SegmentObject(r, id, k)] = true
			if h, ok := x.patched(k); ok {
				set[patchName(h)] = true
			}
		}
	}
	return slices.Sorted(maps.Keys(set))
}

// countingBackend counts the Gets of objects under a prefix.
type countingBackend struct {
	Backend
	prefix string
	gets   atomic.Int64
}

func (c *countingBackend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	return c.GetInto(ctx, name, off, length, nil)
}

func (c *countingBackend) GetInto(ctx context.Context, name string, off, length int64, buf []byte) ([]byte, error) {
	if strings.HasPrefix(name, c.prefix) {
		c.gets.Add(1)
	}
	return c.Backend.GetInto(ctx, name, off, length, buf)
}

// CountGets makes r count the reads of objects under prefix from now on
// and returns how many there were so far.
func CountGets(r *Repo, prefix string) func() int64 {
	c := &countingBackend{Backend: r.be, prefix: prefix}
	r.be = c
	return c.gets.Load
}

// SetScryptN makes key derivation cheap in tests.
func SetScryptN(n int) { scryptN = n }

// BlobChunks lists the chunks compressed into the same blob as h.
func BlobChunks(r *Repo, h Hash) []Hash {
	r.mu.Lock()
	defer r.mu.Unlock()
	l, _ := r.chunks.get(h)
	var out []Hash
	r.chunks.each(func(c Hash, m loc) {
		if m.pack == l.pack && m.off == l.off {
			out = append(out, c)
		}
	})
	return out
}

func init() {
	if v := os.Getenv("UMBRA_GROUP_KIB"); v != "" {
		n, _ := strconv.Atoi(v)
		groupRaw = n << 10
	}
	// UMBRA_ZSTD_GO=1: the pure-Go encoder in a cgo build (benchmarks).
	forceGoEncoder = os.Getenv("UMBRA_ZSTD_GO") != ""
}

// DowngradeToV2 rewrites image id as format 2 wrote it (one chunk list
// object, lists/ID) and marks the repository version 2, as a repository
// written by an older Umbra is.
func DowngradeToV2(r *Repo, id string) error {
	ctx := context.Background()
	x, err := r.Image(id)
	if err != nil {
		return err
	}
	segs := x.Segments
	x.Segments, x.SegmentChunks, x.First, x.format = nil, 0, 0, 2
	for k := range segs {
		r.be.Delete(ctx, segmentName(x.ID, k))
	}
	list := r.seal.seal(nil, x.EncodeChunkList())
	x.ListHash = blake3.Sum256(list)
	if err := r.be.Put(ctx, listName(x.ID), list); err != nil {
		return err
	}
	rec, _ := json.Marshal(x)
	if err := r.putObject(ctx, imageName(x.ID), rec); err != nil {
		return err
	}
	cfg := r.cfg
	cfg.Version = 2
	b, _ := json.Marshal(cfg)
	return r.be.Put(ctx, "config", b)
}

// EditRecord rewrites image id's record (the JSON inside its sealing)
// through fn, as a bad writer or bit rot in an unencrypted repository
// could.
func EditRecord(r *Repo, id string, fn func([]byte) []byte) error {
	ctx := context.Background()
	b, err := r.getObject(ctx, imageName(id))
	if err != nil {
		return err
	}
	return r.putObject(ctx, imageName(id), fn(b))
}

// SetGoEncoder makes repositories opened from now on compress with the
// pure-Go encoder even in a cgo build.
func SetGoEncoder(on bool) func() { return set(&forceGoEncoder, on) }

// SetFormerFastest makes repositories opened from now on compress at the
// "fastest" level with the C parameters it had until 2026-12-07 (a 2^16
// hash table), as the blobs of repositories written then are.
func SetFormerFastest() func() {
	l := levels["fastest"]
	old := l
	l.c = cParams{level: 1, windowLog: 22, hashLog: 16, minMatch: 6}
	levels["fastest"] = l
	return func() { levels["fastest"] = old }
}

// CZstd says whether this build compresses with C zstd.
const CZstd = cZstd

// InitFormat5 creates a repository as Umbra before format 6 did: an
// encrypted one names chunks by 32-byte hashes.
func InitFormat5(ctx context.Context, location string, set Settings) (*Repo, error) {
	initFormat5 = true
	defer func() { initFormat5 = false }()
	return InitWith(ctx, location, set)
}

// SetGoDecoder sends every blob to the Go decoder (cgo builds too).
func SetGoDecoder(on bool) func() { return set(&forceGoDecoder, on) }

// CheckObject reads object name as the repository's readers of its kind
// do (a key file with password) and returns what they find wrong.
func CheckObject(r *Repo, name, password string) error {
	ctx := context.Background()
	switch kind, rest, _ := strings.Cut(name, "/"); kind {
	case "config":
		b, err := r.be.Get(ctx, name, 0, -1)
		if err != nil {
			return err
		}
		_, err = decodeConfig(b)
		return err
	case "keys":
		_, err := r.unlock(ctx, password)
		return err
	case "images":
		_, err := r.imageRecord(ctx, rest)
		return err
	case "index":
		fresh := &Repo{be: r.be, cfg: r.cfg, seal: r.seal, hashKey: r.hashKey, packIdx: map[PackID]uint32{}}
		fresh.chunks = newChunkStore(fresh.hashLen(), "")
		defer fresh.chunks.close()
		fresh.version.Store(r.version.Load())
		if err := fresh.loadIndexNames(ctx, []string{name}); err != nil {
			return err
		}
		return errors.Join(fresh.indexErrs...)
	case "locks":
		_, err := r.readLock(ctx, name)
		return err
	case "segments":
		list, errs := r.images(ctx)
		if len(errs) > 0 {
			return errors.Join(errs...)
		}
		for _, x := range list {
			if err := r.eachSegment(ctx, x, func(int64, []Hash) error { return nil }); err != nil {
				return err
			}
		}
		return nil
	case "packs":
		pid, _ := parsePackName(name)
		b, err := r.be.Get(ctx, name, 0, -1)
		if err != nil {
			return err
		}
		return r.checkPackBytes(pid, b)
	}
	return fmt.Errorf("no reader for %s", name)
}

// SetLegacyObjects makes writers store metadata objects without the
// envelope, as Umbra before format 7 did.
func SetLegacyObjects() func() { return set(&writeLegacyObjects, true) }

// overlayBackend serves one object from memory.
type overlayBackend struct {
	Backend
	name string
	data []byte
}

func (o *overlayBackend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	return o.GetInto(ctx, name, off, length, nil)
}

func (o *overlayBackend) GetInto(ctx context.Context, name string, off, length int64, buf []byte) ([]byte, error) {
	if name != o.name {
		return o.Backend.GetInto(ctx, name, off, length, buf)
	}
	if length < 0 {
		length = int64(len(o.data)) - off
	}
	return append(buf[:0], o.data[off:off+length]...), nil
}

// Overlay makes r read data as object name (without storing it), until
// the returned function is called.
func Overlay(r *Repo, name string, data []byte) func() {
	old := r.be
	r.be = &overlayBackend{Backend: old, name: name, data: data}
	return func() { r.be = old }
}

// PatchObjects lists, sorted and once each, the segment patches images
// ids name.
func PatchObjects(r *Repo, ids ...string) []string {
	set := map[string]bool{}
	for _, id := range ids {
		x, err := r.image(context.Background(), id)
		if err != nil {
			panic(err)
		}
		for k := range x.Patches {
			if h, ok := x.patched(k); ok {
				set[patchName(h)] = true
			}
		}
	}
	return slices.Sorted(maps.Keys(set))
}

// SetIndexEveryChunks makes a backup write an index object once the
// packs waiting for one hold n chunks.
func SetIndexEveryChunks(n int) func() { return set(&indexEveryChunks, n) }

// countingGets counts the Gets of names under prefix.
type countingGets struct {
	Backend
	prefix string
	mu     sync.Mutex
	names  []string
}

func (c *countingGets) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	return c.GetInto(ctx, name, off, length, nil)
}

func (c *countingGets) GetInto(ctx context.Context, name string, off, length int64, buf []byte) ([]byte, error) {
	if strings.HasPrefix(name, c.prefix) {
		c.mu.Lock()
		c.names = append(c.names, name)
		c.mu.Unlock()
	}
	return c.Backend.GetInto(ctx, name, off, length, buf)
}

// RecordGets records the objects under prefix that r reads until the
// returned function is called, which returns their names in the order
// read.
func RecordGets(r *Repo, prefix string) func() []string {
	old := r.be
	c := &countingGets{Backend: old, prefix: prefix}
	r.be = c
	return func() []string {
		r.be = old
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.names
	}
}

// failingDeletes fails every Delete of a name under prefix.
type failingDeletes struct {
	Backend
	prefix string
}

func (f *failingDeletes) Delete(ctx context.Context, name string) error {
	if strings.HasPrefix(name, f.prefix) {
		return fmt.Errorf("delete %s: %w", name, errors.New("storage unavailable"))
	}
	return f.Backend.Delete(ctx, name)
}

// FailDeletes makes r's deletes of objects under prefix fail until the
// returned function is called.
func FailDeletes(r *Repo, prefix string) func() {
	old := r.be
	r.be = &failingDeletes{Backend: old, prefix: prefix}
	return func() { r.be = old }
}

// SetCopyIndexEvery sets how many packs a copy stores between index
// objects.
func SetCopyIndexEvery(n int) func() { return set(&copyIndexEvery, n) }

// CacheNote says how Open found the local index cache: "used", or
// "rebuilt: " and why.
func CacheNote(r *Repo) string { return r.cacheNote }

// CacheRead is how many index objects Open read beyond the cache.
func CacheRead(r *Repo) int { return r.cacheRead }

// CachePath is the local index cache's file ("" without one).
func CachePath(r *Repo) string {
	if r.cacheDir == "" {
		return ""
	}
	return r.cachePath()
}

// WriteFakeIndex writes index objects naming n random chunks in packs
// that do not exist, chunksPer an object: a large index without the
// data (tests of the index's memory).
func WriteFakeIndex(r *Repo, n, chunksPer int, seed uint64) error {
	rnd := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16)})
	for done := 0; done < n; {
		var ps []packBlobs
		k := min(chunksPer, n-done)
		for k > 0 {
			var p packBlobs
			rnd.Read(p.ID[:])
			m := min(k, 4096)
			for i := range m {
				var e blobEntry
				rnd.Read(e.Hash[:r.hashLen()])
				e.Off, e.Len, e.RawOff, e.Raw = uint32(i/64)*2000, 2000, uint32(i%64)*4096, 4096
				p.Blobs = append(p.Blobs, e)
			}
			ps = append(ps, p)
			k -= m
			done += m
		}
		b := wrapObject(r.seal.seal(nil, r.enc.encode(nil, encodeChunkIndex(ps, r.hashLen()))))
		if err := r.be.Put(context.Background(), "index/"+randomID(), b); err != nil {
			return err
		}
	}
	return nil
}

// SetSlotWait makes fn be called whenever a backup's next group of new
// chunks waits for the groups before it to be packed.
func SetSlotWait(fn func()) func() { return set(&slotWait, fn) }

// SetBackend replaces r's backend with wrap(r's backend).
func SetBackend(r *Repo, wrap func(Backend) Backend) func() {
	old := r.be
	r.be = wrap(old)
	return func() { r.be = old }
}

// CreateObject starts an object under dir written piece by piece, on
// r's backend (a local directory): the writer, its commit (naming it)
// and its abort.
func CreateObject(r *Repo, dir string) (io.Writer, func(name string) error, func(), error) {
	sb, ok := r.be.(streamingBackend)
	if !ok {
		return nil, nil, nil, fmt.Errorf("%T writes objects whole", r.be)
	}
	w, err := sb.Create(context.Background(), dir)
	if err != nil {
		return nil, nil, nil, err
	}
	return w, w.Commit, w.Abort, nil
}

// SetNoUnnamedFiles makes a local repository write objects piece by
// piece into named temporary files, as where O_TMPFILE is not there.
func SetNoUnnamedFiles() func() { return set(&procFDs, func() bool { return false }) }

// IndexLookups counts the lookups of chunks in r's index so far.
func IndexLookups(r *Repo) int64 { return r.chunks.lookups.Load() }

// FilterBuilds counts the chunk index filters r built; FilterBytes is
// the size of the one it holds now (0: none).
func FilterBuilds(r *Repo) int64 { return r.chunks.filterBuilds.Load() }

// FilterBuilt is the size of the last filter r built.
func FilterBuilt(r *Repo) int64 { return r.chunks.filterBuilt.Load() }
func FilterBytes(r *Repo) int {
	r.chunks.mu.RLock()
	defer r.chunks.mu.RUnlock()
	if r.chunks.filt == nil {
		return 0
	}
	return r.chunks.filt.bytes()
}

// CacheOpenBytes is how many bytes of the local index cache opening r
// read.
func CacheOpenBytes(r *Repo) int64 { return r.cacheOpenBytes }

// CacheVersion is the run version of r's local index cache file.
func CacheVersion(r *Repo) (int, error) {
	b, err := os.ReadFile(r.cachePath())
	if err != nil || len(b) < 12 {
		return 0, fmt.Errorf("cache %s: %v (%d bytes)", r.cachePath(), err, len(b))
	}
	return int(binary.LittleEndian.Uint32(b[8:])), nil
}

// RewriteCacheV1 writes r's local index cache again as a version 1 run
// (no page keys; a shorter header), as an older Umbra wrote it.
func RewriteCacheV1(r *Repo) error {
	b, err := os.ReadFile(r.cachePath())
	if err != nil {
		return err
	}
	pages := int64(binary.LittleEndian.Uint64(b[24:]))
	metaLen := int64(binary.LittleEndian.Uint64(b[32:]))
	body := b[runPage : runPage+pages*runPage]
	meta := b[int64(len(b))-metaLen:]
	h := make([]byte, 0, runPage)
	h = append(h, b[:8]...)
	h = binary.LittleEndian.AppendUint32(h, 1)
	h = append(h, b[12:40]...)
	ms := sha256.Sum256(meta)
	h = append(h, ms[:]...)
	hs := sha256.Sum256(h)
	h = append(h, hs[:]...)
	out := append(append(h[:runPage], body...), meta...)
	return os.WriteFile(r.cachePath(), out, 0o600)
}

// SetFilterAfter sets after how many missed lookups (entries/div, at
// least least) a writer's filter is built.
func SetFilterAfter(div, least int64) func() {
	a, b := set(&filterAfter, div), set(&minFilterAfter, least)
	return func() { b(); a() }
}

func SetIncrementalIndexEveryChunks(n int) func() { return set(&incrementalIndexEveryChunks, n) }

// SetReadWorkers sets how many readers read an incremental's changed
// chunks of segments at once (0: one per core up to maxReaders), and
// readAheadFn, when set, is told how many batch buffers are out each
// time one is taken.
func SetReadWorkers(n int, readAheadFn func(n int)) func() {
	a, b := set(&readWorkers, n), set(&readAhead, readAheadFn)
	return func() { a(); b() }
}

// RecheckIndexesTimes reads every index object again, as verify does
// first, the whole list the given number of times over.
func RecheckIndexesTimes(r *Repo, times int) error {
	r.mu.Lock()
	saved := r.indexes
	r.indexes = slices.Repeat(saved, times)
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.indexes = saved
		r.mu.Unlock()
	}()
	return r.recheckIndexes(context.Background())
}

// TraceSyncs calls fn with the Sync (counted from 1 in the process)
// and the path of each file or directory a local repository's Sync
// fsyncs, or "" for a syncfs of its filesystem, before the call, which
// fails with fn's error instead when there is one; fn may be called
// from several goroutines at once.
func TraceSyncs(fn func(round int64, path string) error) func() {
	a := set(&fsync, func(f *os.File) error {
		if err := fn(syncRounds.Load(), f.Name()); err != nil {
			return err
		}
		return f.Sync()
	})
	b := set(&syncfs, func(fd int) error {
		if err := fn(syncRounds.Load(), ""); err != nil {
			return err
		}
		return unix.Syncfs(fd)
	})
	return func() { a(); b() }
}

// SetSyncFilesMax sets how many changed files and directories a local
// repository's Sync fsyncs one by one before it takes a syncfs instead.
func SetSyncFilesMax(n int) func() { return set(&syncFilesMax, n) }

// SyncRepo makes everything r's backend was given durable.
func SyncRepo(r *Repo) error { return r.be.Sync(context.Background()) }

// KeyDerivations counts the key files' keys derived from a password
// (scrypt) at opens so far, in the process.
func KeyDerivations() int64 { return keyCache.unwraps.Load() }
