package backup_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/zeebo/blake3"

	"umbra/backup"
)

// TestChunkNamesAreBLAKE3: a plain BLAKE3 repository names every 4 KiB
// chunk (hashed in groups by backup/internal/blake3pair) by the BLAKE3
// of its bytes as github.com/zeebo/blake3 computes it one at a time,
// so repositories written before and after a change of kernel name
// their chunks alike and stay readable.
func TestChunkNamesAreBLAKE3(t *testing.T) {
	ctx := context.Background()
	repo, err := backup.InitWith(ctx, filepath.Join(t.TempDir(), "repo"), backup.Settings{Hash: "blake3"})
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	src := volumeData(rand.New(rand.NewPCG(61, 62)), 2<<20+3*4096) // groups of four and a rest
	backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	zero := make([]byte, 4096)
	named := 0
	for off := 0; off < len(src); off += 4096 {
		block := src[off : off+4096]
		if bytes.Equal(block, zero) {
			continue
		}
		if pack, _, _ := backup.BlobLocation(repo, backup.Hash(blake3.Sum256(block))); pack == "" {
			t.Fatalf("the block at %d is not in the index under its BLAKE3", off)
		}
		named++
	}
	if named < 100 {
		t.Fatalf("only %d non-zero blocks: the volume does not test the kernels", named)
	}
}
