package backup_test

import (
	"context"
	"path/filepath"
	"runtime"
	"testing"

	"umbra/backup"
)

// TestRestoreWorkReused: a restore's workers keep their read buffers
// (the bytes read from a pack, an opened blob) and hashers from segment
// to segment, not only from batch to batch: made again for each
// segment, the buffers grew again to the largest read and blob every
// time (two workers, as on the benchmark machine; measured 2026-12-07:
// 2 440 bytes allocated a chunk before, 390 after).
func TestRestoreWorkReused(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(1024))
	ctx := context.Background()
	repo, _ := newRepo(t)
	const chunks = 64 << 10
	src := &patternSource{size: chunks * 4096, data: chunks * 4096}
	x, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v", Allocated: src.allocated})
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "out.img")
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if err := repo.Restore(x.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("restore of %d chunks in %d segments: allocated %d bytes, %d a chunk", chunks, chunks/1024, alloc, alloc/chunks)
	if alloc > 2000*chunks {
		t.Fatalf("restore of %d chunks in %d segments allocated %d bytes, %d a chunk: want under 2000 (read buffers kept from segment to segment)", chunks, chunks/1024, alloc, alloc/chunks)
	}
}
