package backup_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
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

// TestStreamZeroRuns: Stream hands a run of zero chunks at least a
// batch long over as one batch without data, and the rest with their
// bytes; what need declines is marked skipped.
func TestStreamZeroRuns(t *testing.T) {
	ctx := context.Background()
	repo, err := backup.Init(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	// 1 MiB of data, 12 MiB of zeros, 1 MiB of data, 8 KiB of zeros
	// (too short for a run of its own), 1 MiB of data.
	src := make(memSource, 15<<20+8<<10)
	r := rand.New(rand.NewPCG(33, 34))
	for _, part := range [][2]int{{0, 1 << 20}, {13 << 20, 14 << 20}, {14<<20 + 8<<10, len(src)}} {
		for i := part[0]; i < part[1]; i++ {
			src[i] = byte(r.Uint32())
		}
	}
	x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	ir, err := repo.OpenImage(ctx, x.ID)
	if err != nil {
		t.Fatal(err)
	}
	const cs = 4096
	zs, ze := int64(1<<20/cs), int64(13<<20/cs)
	got := make([]byte, len(src))
	seen := make([]bool, len(src)/cs)
	var runs int
	err = ir.Stream(ctx, func(i int64) bool { return i != zs+1 }, func(b backup.StreamBatch) error {
		if len(b.Zero) != len(b.Skip) {
			return fmt.Errorf("batch at chunk %d: %d zero marks, %d skip marks", b.First, len(b.Zero), len(b.Skip))
		}
		if b.Data == nil {
			runs++
			if b.First != zs || b.First+int64(len(b.Zero)) != ze {
				return fmt.Errorf("a batch without data holds chunks %d-%d, want the zero run %d-%d", b.First, b.First+int64(len(b.Zero)), zs, ze)
			}
		}
		for j := range b.Zero {
			c := b.First + int64(j)
			if seen[c] {
				return fmt.Errorf("chunk %d handed over twice", c)
			}
			seen[c] = true
			if b.Skip[j] != (c == zs+1) {
				return fmt.Errorf("chunk %d: skipped %v", c, b.Skip[j])
			}
			if b.Zero[j] != bytes.Equal(src[c*cs:(c+1)*cs], make([]byte, cs)) {
				return fmt.Errorf("chunk %d: zero %v", c, b.Zero[j])
			}
			if b.Data != nil {
				copy(got[c*cs:(c+1)*cs], b.Data[j*cs:(j+1)*cs])
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if runs != 1 {
		t.Fatalf("%d batches without data, want 1 (the 12 MiB zero run)", runs)
	}
	if slices.Contains(seen, false) {
		t.Fatal("a chunk was never handed over")
	}
	if !bytes.Equal(got, []byte(src)) {
		t.Fatal("the streamed chunks are not the image")
	}
}
