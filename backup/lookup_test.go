package backup_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"umbra/backup"
)

// TestRestoreLooksUpOnce: a restore looks each chunk up in the index
// once (the segment's count of uses finds where it is; reading it does
// not look again): with the index on disk, a lookup is a page read.
func TestRestoreLooksUpOnce(t *testing.T) {
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(5, 6))
	src := make(memSource, 8<<20) // 2048 distinct chunks
	for i := range src {
		src[i] = byte(r.Uint32())
	}
	x, _, err := repo.Backup(context.Background(), src, backup.Options{Volume: "v"})
	if err != nil {
		t.Fatal(err)
	}
	before := backup.IndexLookups(repo)
	out := filepath.Join(t.TempDir(), "out.img")
	if err := repo.Restore(x.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	if n, chunks := backup.IndexLookups(repo)-before, int64(len(src)/4096); n > chunks {
		t.Fatalf("restore of %d chunks made %d index lookups, want at most one a chunk", chunks, n)
	}
	if b, _ := os.ReadFile(out); !bytes.Equal(b, src) {
		t.Fatal("the restore differs from the volume")
	}
}
