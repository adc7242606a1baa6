package backup_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"umbra/backup"
)

// TestCopyPassThrough copies between repositories that name chunks
// alike and both compress with zstd, the source at level better and
// the target at fastest: every copied chunk lies in the target in a
// blob byte for byte the source's (not compressed again), and the
// images restore and verify.
func TestCopyPassThrough(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(64))
	ctx := context.Background()
	srcDir := filepath.Join(t.TempDir(), "src")
	src, err := backup.InitWith(ctx, srcDir, backup.Settings{Level: "better"})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	ids, data := copyImages(t, src)
	dstDir := filepath.Join(t.TempDir(), "dst")
	dst, err := backup.InitWith(ctx, dstDir, backup.Settings{Level: "fastest"})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if !backup.SameChunkNames(src, dst) {
		t.Fatal("the repositories name chunks differently")
	}
	st, err := backup.Copy(ctx, src, dst, backup.CopyOptions{All: true})
	if err != nil {
		t.Fatal(err)
	}
	ids = []string{ids[0], ids[1], ids[3]} // ids[2] has ids[1]'s content: not copied again
	checkCopied(t, dst, ids, data)
	blob := func(r *backup.Repo, dir string, h backup.Hash) []byte {
		t.Helper()
		pack, off, n := backup.BlobLocation(r, h)
		b, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(pack)))
		if err != nil || off+n > int64(len(b)) {
			t.Fatalf("chunk %s: pack %q: %v", h, pack, err)
		}
		return b[off : off+n]
	}
	chunks := 0
	for _, id := range ids {
		x, err := src.Image(id)
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range x.Chunks {
			if h == (backup.Hash{}) {
				continue
			}
			if !bytes.Equal(blob(src, srcDir, h), blob(dst, dstDir, h)) {
				t.Fatalf("image %s: chunk %s lies in the target in a blob that is not the source's: compressed again", id, h)
			}
			chunks++
		}
	}
	var stored int64
	for _, ci := range st.Images {
		stored += ci.BytesWritten
	}
	if chunks == 0 || stored != st.BytesWritten || st.ChunksCopied == 0 {
		t.Fatalf("%d chunks compared; stats %+v", chunks, st)
	}
}

// TestCopyReseal copies from an encrypted repository (zstd level
// better) into one under another key and into an unencrypted one (both
// at level fastest): they name chunks differently, so every chunk is
// read and hashed again, but each blob keeps the source's compressed
// bytes, sealed for the target (its size is the source's, less the seal
// when the target is not encrypted), and the images restore and verify.
func TestCopyReseal(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(64))
	ctx := context.Background()
	src, err := backup.InitWith(ctx, filepath.Join(t.TempDir(), "src"), backup.Settings{Password: "one", Level: "better"})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	ids, data := copyImages(t, src)
	for _, tc := range []struct {
		name     string
		password string
		less     int64 // the seal's bytes the target's blobs lack
	}{{"another key", "two", 0}, {"not encrypted", "", 28}} {
		t.Run(tc.name, func(t *testing.T) {
			dst, err := backup.InitWith(ctx, filepath.Join(t.TempDir(), "dst"), backup.Settings{Password: tc.password, Level: "fastest"})
			if err != nil {
				t.Fatal(err)
			}
			defer dst.Close()
			st, err := backup.Copy(ctx, src, dst, backup.CopyOptions{All: true})
			if err != nil {
				t.Fatal(err)
			}
			if !st.Rehashed || st.ChunksCopied == 0 {
				t.Fatalf("stats %+v", st)
			}
			checkCopied(t, dst, ids, data)
			for _, id := range ids {
				x, _ := src.Image(id)
				y, err := dst.Image(id)
				if err != nil {
					t.Fatal(err)
				}
				for i, h := range x.Chunks {
					if h == (backup.Hash{}) {
						continue
					}
					_, _, n := backup.BlobLocation(src, h)
					_, _, m := backup.BlobLocation(dst, y.Chunks[i])
					if m != n-tc.less {
						t.Fatalf("image %s, chunk %d: its blob is %d bytes in the source, %d in the target: compressed again", id, i, n, m)
					}
				}
			}
		})
	}
}
