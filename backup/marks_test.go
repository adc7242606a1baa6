package backup_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"

	"umbra/backup"
	"umbra/provider"
)

// TestIncrementalFromCompressedMap: an incremental given its changes as
// a compressed map (provider.Bitmap.Marks, as the COW engine hands them
// over) reads the same chunks and writes the same chunk list as one
// given a bit a chunk, through the segments' patches and through the
// chunk-by-chunk path of a segment changed too much for one, and the
// image restores to the volume.
func TestIncrementalFromCompressedMap(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(1024))
	ctx := context.Background()
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(51, 52))
	const chunks = 4 * 1024
	src := volumeData(r, chunks*4096)
	full := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	blks := []int{3, 700, 1024 + 5, 3000}
	for i := range 300 { // segment 2: too many for a patch
		blks = append(blks, 2048+i*3)
	}
	next, dense := rewrite(r, src, blks...)
	marks := roaring.New()
	for _, b := range blks {
		marks.Add(uint32(b))
	}
	sparse := &provider.Bitmap{Granule: dense.Granule, Size: dense.Size, Marks: marks}
	var imgs []*backup.Image
	var reads []int64
	for _, bm := range []*provider.Bitmap{dense, sparse} {
		x, st, err := repo.Backup(ctx, next, backup.Options{Volume: "v", Parent: full, Changed: bm})
		if err != nil || !st.Incremental {
			t.Fatalf("incremental: %v (%s)", err, st.WhyFull)
		}
		backupAndRestoreCheck(t, repo, x.ID, next)
		imgs, reads = append(imgs, x), append(reads, st.Read)
	}
	if reads[0] != reads[1] || reads[1] != int64(len(blks))*4096 {
		t.Fatalf("read %d bytes from the bit map, %d from the compressed one, want %d", reads[0], reads[1], len(blks)*4096)
	}
	if !slices.Equal(imgs[0].Segments, imgs[1].Segments) || !slices.Equal(imgs[0].Patches, imgs[1].Patches) {
		t.Fatal("the compressed map's image names other segments or patches than the bit map's")
	}
}
