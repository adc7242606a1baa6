package backup_test

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"umbra/backup"
)

// TestIndexEveryChunks: a backup whose chunks compress so well that few
// packs hold many of them still writes an index object for every
// indexEveryChunks chunks stored, so that what it holds until then (the
// packs' entries, the chunks stored but not yet findable) does not grow
// with the volume; every chunk is then indexed once and the image
// restores.
func TestIndexEveryChunks(t *testing.T) {
	defer backup.SetIndexEveryChunks(256)()
	defer backup.SetSmallPacks(1<<20, 64)() // 64 packs would be the whole backup
	defer backup.SetPackEntries(128)()      // packs of 128 chunks (+ a group's rest)
	ctx := context.Background()
	repo, _ := newRepo(t)
	const chunks = 32 * 1024
	src := &patternSource{size: chunks * 4096, data: chunks * 4096} // unique chunks
	data := make(memSource, src.size)
	src.ReadAt(data, 0)
	x := backupAndRestore(t, repo, data, backup.Options{Volume: "v"})
	// Packs end at a whole group (1024 chunks here): 32 packs. Before,
	// no index object was due until the end, which wrote all 32 packs'
	// entries as two objects. Packs finish on other goroutines, so which
	// batch sees them done is up to the scheduler; but the pipeline
	// holds a few packs at most, so most of the 32 are done while
	// batches remain and each flush after that writes an object.
	if n := len(backup.ObjectNames(repo, "index/")); n < 3 {
		t.Fatalf("%d index objects for 32 packs of 1024 chunks, an object due every 256 chunks: want at least 3", n)
	}
	if st := repo.Stats(ctx); st.Chunks != chunks {
		t.Fatalf("%d chunks indexed, want %d", st.Chunks, chunks)
	}
	if x.Stats.Stored != chunks*4096 {
		t.Fatalf("stored %d bytes, want %d", x.Stats.Stored, chunks*4096)
	}
}

// TestVerifyPacksInPieces: verify of a local repository reads a pack
// in pieces (hashed a piece at a time; its trailer and needed blobs as
// ranges) into memory it reuses, never whole, so that what it holds
// does not grow with the size of packs: it allocates under half the
// packs' bytes here (every pack read whole into new memory was more
// than all of them; two workers held two packs, 15 MiB each at 4 Mi
// chunks, and the collector's goal twice that: verify's peak RSS was 70
// MiB at 1 Mi chunks, 91 at 4 Mi, measured 2026-12-07).
func TestVerifyPacksInPieces(t *testing.T) {
	defer backup.SetSmallPacks(1<<20, 4)()
	defer backup.SetGroupRaw(256 << 10)()
	repo, dir := newRepo(t)
	const size = 32 << 20
	src := &patternSource{size: size, data: size}
	data := make(memSource, size)
	src.ReadAt(data, 0)
	for i := 0; i < len(data); i += 4096 { // incompressible, so packs fill
		binary.LittleEndian.PutUint64(data[i+8:], uint64(i)*0x9e3779b97f4a7c15)
		for j := i + 16; j < i+4096; j += 8 {
			binary.LittleEndian.PutUint64(data[j:], binary.LittleEndian.Uint64(data[j-8:])*0x9e3779b97f4a7c15+1)
		}
	}
	backupAndRestore(t, repo, data, backup.Options{Volume: "v"})
	repo.Close()
	packs := backup.ObjectNames(repo, "packs/")
	var packBytes int64
	for _, n := range packs {
		fi, err := os.Stat(filepath.Join(dir, n))
		if err != nil {
			t.Fatal(err)
		}
		packBytes += fi.Size()
	}
	_, alloc := verifyAllocated(t, dir)
	t.Logf("verify of %d packs, %d bytes: allocated %d bytes", len(packs), packBytes, alloc)
	if len(packs) < 16 {
		t.Fatalf("%d packs: want many", len(packs))
	}
	if alloc > uint64(packBytes)/2 {
		t.Fatalf("verify of %d packs (%d bytes) allocated %d bytes: want under half: packs read in pieces", len(packs), packBytes, alloc)
	}
}

// TestVerifyWorkReused: verify's workers check pack after pack with
// memory each keeps (the pack's chunks and verdicts, a piece of the
// pack, a blob as stored and opened), so that what it allocates is the
// index and lists it reads and each pack's trailer, not a map of every
// pack's chunks and two copies of their entries (~170 bytes a chunk)
// nor buffers a pool shared by the three uses grew again and again
// (measured 2026-12-07: 673 bytes a chunk before, 473 after, most of
// it the trailers and the index read again). Two workers, as on the
// benchmark machine: each keeps its own buffers.
func TestVerifyWorkReused(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	defer backup.SetSmallPacks(1<<20, 4)()
	defer backup.SetGroupRaw(256 << 10)()
	const chunks = 32 << 10
	dir := patternRepo(t, chunks)
	r, alloc := verifyAllocated(t, dir)
	packs := len(backup.ObjectNames(r, "packs/"))
	t.Logf("verify of %d chunks in %d packs: allocated %d bytes, %d a chunk", chunks, packs, alloc, alloc/chunks)
	if packs < 8 {
		t.Fatalf("%d packs: want many", packs)
	}
	if alloc > 560*chunks {
		t.Fatalf("verify of %d chunks in %d packs allocated %d bytes, %d a chunk: want under 560 (the pack's chunks and buffers reused from pack to pack)", chunks, packs, alloc, alloc/chunks)
	}
}

// patternRepo makes a repository holding one full image of a volume of
// chunks unique 4 KiB chunks (the scale benchmark's pattern), closed,
// and gives its directory.
func patternRepo(t *testing.T, chunks int64) string {
	t.Helper()
	repo, dir := newRepo(t)
	src := &patternSource{size: chunks * 4096, data: chunks * 4096}
	if _, _, err := repo.Backup(context.Background(), src, backup.Options{Volume: "v", Allocated: src.allocated}); err != nil {
		t.Fatal(err)
	}
	repo.Close()
	return dir
}

// verifyAllocated opens the repository at dir (closed at the test's
// end), verifies it clean with one worker and gives the bytes the
// verify allocated.
func verifyAllocated(t *testing.T, dir string) (*backup.Repo, uint64) {
	t.Helper()
	r, err := backup.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	verifyClean(t, r, 1)
	runtime.ReadMemStats(&after)
	return r, after.TotalAlloc - before.TotalAlloc
}

// TestVerifyBatchesReuseWork: verify checks the packs a batch of needed
// chunks at a time (the batches grow in number with the repository: 16
// at 16 Mi chunks), each worker with buffers it keeps from batch to
// batch, and the positions of a batch's chunks and the index's read
// buffer are reused too: many batches allocate about what one does.
// Made again for each batch, they were ~10 MiB let go of 16 times at
// 16 Mi chunks, and the collector's freed spans 12 MiB more of
// verify's peak RSS than at 1 Mi (measured 2026-12-07).
func TestVerifyBatchesReuseWork(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	defer backup.SetSmallPacks(1<<20, 4)()
	defer backup.SetGroupRaw(256 << 10)()
	const chunks = 32 << 10
	dir := patternRepo(t, chunks)
	_, one := verifyAllocated(t, dir)
	restore := backup.SetVerifyBatch(chunks / 16)
	_, many := verifyAllocated(t, dir)
	restore()
	t.Logf("verify of %d chunks: allocated %d bytes in one batch, %d in 16", chunks, one, many)
	if many > one+64*chunks {
		t.Fatalf("verify of %d chunks in 16 batches allocated %d bytes, in one %d: want at most %d more (buffers kept from batch to batch)", chunks, many, one, 64*chunks)
	}
}

// TestVerifyReadsSharedSegmentsOnce: an incremental's unchanged chunk-list
// segments are its parent's; verify reads each of them (and looks up
// its chunks) once, not once for each image naming it: a segment read
// again is only the base of a patched one.
func TestVerifyReadsSharedSegmentsOnce(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(1024))
	ctx := context.Background()
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(45, 46))
	src := volumeData(r, 8*1024*4096) // 8 segments
	full := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	next, bm := rewrite(r, src, 3*1024+5) // one chunk of segment 3: a patch
	if _, _, err := repo.Backup(ctx, next, backup.Options{Volume: "v", Parent: full, Changed: bm}); err != nil {
		t.Fatal(err)
	}
	gets := backup.CountGets(repo, "segments/")
	verifyClean(t, repo, 2)
	// 8 segments, the patched one's base again and its patch.
	if n := gets(); n > 8+2 {
		t.Fatalf("verify of a full image and an incremental of 8 segments (one patched) read %d segment objects: want at most 10", n)
	}
}

// TestPruneReadsSegmentsOnce: prune reads each shared chunk-list segment
// of the images it keeps once, not once for each image naming it: an
// incremental's unchanged segments are its parent's, and two volumes
// with the same data have the same segments. Each read was a segment
// decoded into new memory (2 MiB of hashes for 65536 chunks).
func TestPruneReadsSegmentsOnce(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(1024))
	ctx := context.Background()
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(47, 48))
	const segs = 8
	src := volumeData(r, segs*1024*4096)
	full := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	backupAndRestore(t, repo, src, backup.Options{Volume: "w"}) // the same segments
	next, bm := rewrite(r, src, 3*1024+5)                       // one chunk of segment 3: a patch
	if _, _, err := repo.Backup(ctx, next, backup.Options{Volume: "v", Parent: full, Changed: bm}); err != nil {
		t.Fatal(err)
	}
	gets := backup.CountGets(repo, "segments/")
	if _, err := repo.Delete(ctx, []string{full.ID}); err != nil {
		t.Fatal(err)
	}
	// 8 segments, the patched one's base again and its patch.
	if n := gets(); n > segs+2 {
		t.Fatalf("prune keeping two images of %d segments, all but one of them the same, read %d segment objects: want at most %d", segs, n, segs+2)
	}
	verifyClean(t, repo, 2)
}

// TestSegmentPassesReuseMemory: a pass over the segments of chunk lists
// (verify's, prune's) reads each into memory kept from segment to
// segment, so what it allocates for them is about one segment's, not
// one for each: a list in 16 segments costs less than the same in one.
// Each read in new memory (the stored segment and its hashes decoded,
// 4 MiB for 65536 chunks) left ~2 GiB to collect at 16 Mi chunks.
func TestSegmentPassesReuseMemory(t *testing.T) {
	const chunks = 16 << 10
	alloc := func(segChunks int64) uint64 {
		defer backup.SetSegmentChunks(backup.SetSegmentChunks(segChunks))
		_, n := verifyAllocated(t, patternRepo(t, chunks))
		return n
	}
	one, many := alloc(chunks), alloc(chunks/16)
	t.Logf("verify of %d chunks allocated %d bytes with the list in one segment, %d in 16", chunks, one, many)
	// One segment's stored form and hashes: 32 bytes a chunk each.
	if many+32*chunks > one {
		t.Fatalf("verify of %d chunks allocated %d bytes with the list in 16 segments, %d in one: want at least %d less (one segment's memory, not 16)", chunks, many, one, 32*chunks)
	}
}

// TestVerifyRereadsIndexInPlace: verify reads every index object again
// (recheckIndexes) into memory kept from object to object, and through
// one buffer, so that what that allocates does not grow with the number
// of objects: each was read into new memory through a new 64 KiB
// buffer (a backup's object is ~4 MiB stored: 1.1 GiB to collect at
// 16 Mi chunks, 266 objects, 70 MiB at 1 Mi). The same objects are read
// once and then three times over in one pass, so that both passes see
// objects of the same sizes in the same order (the decoder's buffers
// grow with what it has seen: two repositories of different layouts
// differ by more than the bound).
func TestVerifyRereadsIndexInPlace(t *testing.T) {
	const chunks = 16 << 10
	defer backup.SetPackEntries(1024)()      // packs of 1024 chunks
	defer backup.SetIndexEveryChunks(1024)() // ~16 index objects
	r, err := backup.Open(patternRepo(t, chunks))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	objs := len(backup.ObjectNames(r, "index/"))
	if objs < 8 {
		t.Fatalf("%d index objects, want 8 at least", objs)
	}
	alloc := func(times int) uint64 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		if err := backup.RecheckIndexesTimes(r, times); err != nil {
			t.Fatal(err)
		}
		runtime.ReadMemStats(&after)
		return after.TotalAlloc - before.TotalAlloc
	}
	once, thrice := alloc(1), alloc(3)
	t.Logf("reading %d index objects again allocated %d bytes, reading them three times over %d", objs, once, thrice)
	if limit := once + uint64(2*objs)*(16<<10); thrice > limit {
		t.Fatalf("reading %d index objects again allocated %d bytes, reading them three times over %d: want at most 16 KiB more for each object read more (%d)", objs, once, thrice, limit)
	}
}

// TestIndexLoadReusesRunBuffers: loading an index of many objects (an
// open without a current local cache, prune reading back the index it
// wrote) makes a run of each object's entries and merges the runs as
// they come; the runs are written and merged through buffers shared
// from run to run, so what that allocates does not grow with the
// number of objects: three new 256 KiB buffers for each merge were
// ~0.75 GiB to collect at 16 Mi chunks (512 objects after a prune).
func TestIndexLoadReusesRunBuffers(t *testing.T) {
	const chunks = 64 << 10
	defer backup.SetPackEntries(4096)()
	alloc := func(every int) (uint64, int) {
		defer backup.SetIndexEveryChunks(every)()
		dir := patternRepo(t, chunks)
		if err := os.RemoveAll(filepath.Join(dir, "cache")); err != nil {
			t.Fatal(err)
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		r, err := backup.Open(dir)
		runtime.ReadMemStats(&after)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		if st := r.Stats(context.Background()); st.Chunks != chunks {
			t.Fatalf("%d chunks indexed, want %d", st.Chunks, chunks)
		}
		return after.TotalAlloc - before.TotalAlloc, len(backup.ObjectNames(r, "index/"))
	}
	one, few := alloc(chunks)
	many, objs := alloc(chunks / 16)
	t.Logf("an open loading the index of %d chunks allocated %d bytes from %d objects, %d from %d", chunks, one, few, many, objs)
	if objs < few+8 {
		t.Fatalf("%d index objects, then %d: want 8 more at least", few, objs)
	}
	if limit := one + uint64(objs-few)*(64<<10); many > limit {
		t.Fatalf("an open loading the index of %d chunks allocated %d bytes from %d objects, %d from %d: want at most 64 KiB more for each object more (%d)", chunks, many, objs, one, few, limit)
	}
}
