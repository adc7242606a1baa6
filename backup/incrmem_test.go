package backup_test

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
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

// TestIncrementalMemorySizedToChange: an incremental that patches its
// parent's segments with a few scattered changed chunks each reads and
// compresses them in batches and blobs sized to them, not in a full
// batch's 4 MiB buffers (three read ahead, three blobs, the list
// writer's segment: ~33 MiB live, which the collector let grow to twice
// that over a long run: 41.5 MiB peak at 1 Mi chunks, 69.8 at 16 Mi,
// measured 2026-12-07). 128 chunks changed here (512 KiB): the
// incremental allocated 25 MiB before.
func TestIncrementalMemorySizedToChange(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(4096))
	ctx := context.Background()
	repo, _ := newRepo(t)
	const chunks = 16 * 1024 // 4 segments
	src := &patternSource{size: chunks * 4096, data: chunks * 4096}
	full, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v", Allocated: src.allocated})
	if err != nil {
		t.Fatal(err)
	}
	src.changed, src.salt = roaring.New(), 0x5a5a5a5a5a5a5a5a
	bm := &provider.Bitmap{Granule: 4096, Size: src.size, Marks: roaring.New()}
	for c := uint32(0); c < chunks; c += 128 { // 32 a segment: patches
		src.changed.Add(c)
		bm.Marks.Add(c)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	x, st, err := repo.Backup(ctx, src, backup.Options{Volume: "v", Parent: full, Changed: bm, Allocated: src.allocated})
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Incremental || st.Read != 128*4096 || st.Stored != 128*4096 {
		t.Fatalf("incremental %v read %d, stored %d bytes: want 128 chunks", st.Incremental, st.Read, st.Stored)
	}
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("incremental of 128 changed chunks in 4 segments: allocated %d bytes", alloc)
	if alloc > 4<<20 {
		t.Fatalf("incremental of 128 changed chunks allocated %d bytes: want under 4 MiB (buffers sized to the change)", alloc)
	}
	checkPattern(t, repo, x, src)
}

// checkPattern streams image x and checks every chunk against src.
func checkPattern(t *testing.T, repo *backup.Repo, x *backup.Image, src *patternSource) {
	t.Helper()
	ctx := context.Background()
	ir, err := repo.OpenImage(ctx, x.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4096)
	var got int64
	err = ir.Stream(ctx, nil, func(sb backup.StreamBatch) error {
		for j := range sb.Zero {
			c := sb.First + int64(j)
			src.ReadAt(want, c*4096)
			var d []byte
			if sb.Data != nil {
				d = sb.Data[j*4096 : (j+1)*4096]
			} else {
				d = make([]byte, 4096)
			}
			if !bytes.Equal(d, want) {
				return fmt.Errorf("chunk %d differs from the source", c)
			}
			got++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if got != src.size/4096 {
		t.Fatalf("streamed %d chunks of %d", got, src.size/4096)
	}
}
