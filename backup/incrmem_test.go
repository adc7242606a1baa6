package backup_test

import (
	"context"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"

	"umbra/backup"
	"umbra/provider"
)

// TestIncrementalIndexesOften: an incremental writes an index object
// for every incrementalIndexEveryChunks chunks it stored, far fewer
// than a full backup waits for, so that what it holds for chunks stored
// but not yet indexed does not grow with its change (1 % of a volume);
// every chunk is indexed once and the image restores.
func TestIncrementalIndexesOften(t *testing.T) {
	defer backup.SetIncrementalIndexEveryChunks(256)()
	defer backup.SetSmallPacks(1<<20, 64)()
	defer backup.SetPackEntries(128)()
	ctx := context.Background()
	repo, _ := newRepo(t)
	const chunks = 8 * 1024
	src := &patternSource{size: chunks * 4096, data: chunks * 4096}
	data := make(memSource, src.size)
	src.ReadAt(data, 0)
	full := backupAndRestore(t, repo, data, backup.Options{Volume: "v"})
	before := len(backup.ObjectNames(repo, "index/"))
	// 4096 chunks rewritten (every other one): 4 packs of 1024 chunks.
	src.changed, src.salt = roaring.New(), 0x5a5a5a5a5a5a5a5a
	bm := &provider.Bitmap{Granule: 4096, Size: src.size, Marks: roaring.New()}
	for c := uint32(0); c < chunks; c += 2 {
		src.changed.Add(c)
		bm.Marks.Add(c)
	}
	next := make(memSource, src.size)
	src.ReadAt(next, 0)
	x := backupAndRestore(t, repo, next, backup.Options{Volume: "v", Parent: full, Changed: bm})
	if x.Stats == nil || !x.Stats.Incremental {
		t.Fatal("not an incremental")
	}
	// Packs finish on other goroutines, so which batch sees them done
	// is up to the scheduler; but the pipeline holds a few packs at
	// most, so most are done while batches remain, each flush after
	// that writing an object. A full backup's limit (indexEveryChunks,
	// 128 Ki chunks) would have written them all at the end, as two.
	if n := len(backup.ObjectNames(repo, "index/")) - before; n < 4 {
		t.Fatalf("%d index objects for 4096 new chunks, one due every 256: want at least 4", n)
	}
	if st := repo.Stats(ctx); st.Chunks != chunks+chunks/2 {
		t.Fatalf("%d chunks indexed, want %d", st.Chunks, chunks+chunks/2)
	}
}
