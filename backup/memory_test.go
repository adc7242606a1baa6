package backup_test

import (
	"context"
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
