package backup_test

import (
	"context"
	"math/rand/v2"
	"testing"

	"umbra/backup"
)

// TestMixedEncoders: a repository is one format whichever encoder wrote
// it. Images written by the pure-Go encoder and by C zstd (in a cgo
// build) in the same repository, in either order, deduplicate against
// each other, restore byte-identical through either decoder, verify, and survive a prune that
// recompresses the live chunks of partly dead blobs.
func TestMixedEncoders(t *testing.T) {
	if !backup.CZstd {
		t.Skip("built without cgo (CGO_ENABLED=0 or no C compiler): only the Go encoder exists; TestEncoders covers it")
	}
	ctx := context.Background()
	r := rand.New(rand.NewPCG(11, 12))
	src := volumeData(r, 8<<20)
	_, dir := newRepo(t)
	for i, goEnc := range []bool{true, false, true, false} {
		restore := backup.SetGoEncoder(goEnc)
		restoreDec := backup.SetGoDecoder(i%2 == 0) // each decoder reads blobs of both encoders
		repo, next, x := scatteredImage(t, r, dir, src)
		if i > 0 && x.Stats.Dedup == 0 {
			t.Fatalf("image %d (Go encoder %v) deduplicated nothing against the last", i, goEnc)
		}
		src = next
		if i == 2 {
			// Forget the first two images: their blobs are partly dead now.
			if _, err := repo.Prune(ctx, backup.Policy{Last: 1}, false); err != nil {
				t.Fatal(err)
			}
		}
		if rep := repo.Verify(); len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes) > 0 || rep.GoodImages == 0 {
			t.Fatalf("verify after image %d: %+v", i, rep)
		}
		repo.Close()
		restore()
		restoreDec()
	}
}

// TestFormerFastest: repositories whose blobs the "fastest" level wrote
// with its former parameters (a larger hash table) read as before, and
// take images with the current ones: images of either, taking turns in
// one repository, deduplicate against each other, restore byte-identical
// through either decoder and verify.
func TestFormerFastest(t *testing.T) {
	r := rand.New(rand.NewPCG(13, 14))
	src := volumeData(r, 8<<20)
	_, dir := newRepo(t)
	for i, former := range []bool{true, false, true, false} {
		undo := func() {}
		if former {
			undo = backup.SetFormerFastest()
		}
		restoreDec := backup.SetGoDecoder(i%2 == 1)
		repo, next, x := scatteredImage(t, r, dir, src)
		if i > 0 && x.Stats.Dedup == 0 {
			t.Fatalf("image %d (former parameters %v) deduplicated nothing against the last", i, former)
		}
		src = next
		if rep := repo.Verify(); len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes) > 0 || rep.GoodImages != i+1 {
			t.Fatalf("verify after image %d: %+v", i, rep)
		}
		repo.Close()
		restoreDec()
		undo()
	}
}

// scatteredImage opens the repository at dir and takes (and restores
// byte-identical) a full image of src with 64 blocks rewritten at random
// places: the repository, the new volume and its image.
func scatteredImage(t *testing.T, r *rand.Rand, dir string, src memSource) (*backup.Repo, memSource, *backup.Image) {
	t.Helper()
	repo, err := backup.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	blks := make([]int, 64)
	for j := range blks {
		blks[j] = r.IntN(len(src) / 4096)
	}
	next, _ := rewrite(r, src, blks...)
	return repo, next, backupAndRestore(t, repo, next, backup.Options{Volume: "v"})
}
