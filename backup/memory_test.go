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
	src := &patternSource{size: 4096 * 4096, data: 4096 * 4096} // 4096 unique chunks
	data := make(memSource, src.size)
	src.ReadAt(data, 0)
	x := backupAndRestore(t, repo, data, backup.Options{Volume: "v"})
	// Packs end at a whole group (1024 chunks here): four packs, one
	// index object for all of them before.
	if n := len(backup.ObjectNames(repo, "index/")); n < 2 {
		t.Fatalf("%d index objects for 4 packs of 1024 chunks, an object due every 256 chunks: want at least 2", n)
	}
	if st := repo.Stats(ctx); st.Chunks != 4096 {
		t.Fatalf("%d chunks indexed, want 4096", st.Chunks)
	}
	if x.Stats.Stored != 4096*4096 {
		t.Fatalf("stored %d bytes, want %d", x.Stats.Stored, 4096*4096)
	}
}
