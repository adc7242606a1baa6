package backup_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"

	"umbra/backup"
)

// TestImageReaderSharesOpening: concurrent reads of chunks of one blob
// fetch and open it once, and the blob then serves every later read.
func TestImageReaderSharesOpening(t *testing.T) {
	ctx := context.Background()
	repo, err := backup.Init(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	src := make(memSource, 1<<20) // random: one blob of 256 chunks
	r := rand.New(rand.NewPCG(31, 32))
	for i := range src {
		src[i] = byte(r.Uint32())
	}
	x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	ir, err := repo.OpenImage(ctx, x.ID)
	if err != nil {
		t.Fatal(err)
	}
	gets := backup.CountGets(repo, "packs/")
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, 32)
	for g := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			off := int64(g) * 8 * 4096
			got := make([]byte, 4096)
			if _, err := ir.ReadAt(got, off); err != nil {
				errs <- err
			} else if !bytes.Equal(got, src[off:off+4096]) {
				t.Errorf("chunk at %d reads wrong", off)
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := gets(); n != 1 {
		t.Fatalf("32 concurrent reads of one blob fetched it %d times, want 1", n)
	}
}

// TestImageReaderCached: Cached says which chunks read without a fetch
// (zero ones, and those of opened blobs), and the opened blobs stay
// within the reader's cache bound.
func TestImageReaderCached(t *testing.T) {
	defer backup.SetGroupRaw(64 << 10)()     // blobs of 16 chunks
	defer backup.SetReaderCache(200 << 10)() // three of them
	ctx := context.Background()
	repo, err := backup.Init(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	src := make(memSource, 1<<20)
	r := rand.New(rand.NewPCG(33, 34))
	for i := 4096; i < len(src); i++ { // chunk 0 is zero, the rest random
		src[i] = byte(r.Uint32())
	}
	x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	ir, err := repo.OpenImage(ctx, x.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !ir.Cached(0) || ir.Cached(1) {
		t.Fatalf("before any read: Cached(0) %v (a zero chunk), Cached(1) %v", ir.Cached(0), ir.Cached(1))
	}
	if _, err := ir.ReadAt(make([]byte, 4096), 1*4096); err != nil {
		t.Fatal(err)
	}
	if !ir.Cached(2) || !ir.Cached(16) || ir.Cached(17) {
		t.Fatalf("after reading chunk 1 (blob of chunks 1-16): Cached(2) %v, Cached(16) %v, Cached(17) %v", ir.Cached(2), ir.Cached(16), ir.Cached(17))
	}
	for i := int64(1); i < 256; i += 16 {
		if _, err := ir.ReadAt(make([]byte, 4096), i*4096); err != nil {
			t.Fatal(err)
		}
		if n := backup.ReaderCached(ir); n > 200<<10 {
			t.Fatalf("the reader keeps %d bytes of opened blobs, bound %d", n, 200<<10)
		}
	}
	if ir.Cached(2) {
		t.Fatal("chunk 2's blob is still opened after 15 others were read")
	}
}
