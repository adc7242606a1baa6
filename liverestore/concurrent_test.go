package liverestore

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
)

// TestConcurrent: the background restore runs while writers (each in a
// region of its own) and readers (elsewhere) go at the target; every
// read sees the image or the region's writes, and at the end the target
// file is the image plus the writes. Run with -race.
func TestConcurrent(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	size := 12<<20 + 4096 // three batches of the background restore and a bit
	img, ir, id := testImage(t, r, size)
	fsys := &memFS{files: map[string]*crashFile{}}
	tf, _ := fsys.OpenFile("/t", os.O_RDWR|os.O_CREATE, 0)
	tf.Truncate(int64(size))
	tg, err := Create(fsys, tf, "/t.map", ir, id, Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(img)
	const writers, region = 4, 1 << 20
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := tg.Run(ctx); err != nil {
			errs <- fmt.Errorf("background restore: %w", err)
		}
	}()
	for w := range writers {
		base := int64(w) * 3 * region // regions 0, 3, 6, 9 MiB
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 11))
			for range 200 {
				off := base + r.Int64N(region-9000)
				n := 1 + r.Int64N(9000)
				b := make([]byte, n)
				for i := range b {
					b[i] = byte(r.Uint32())
				}
				if _, err := tg.WriteAt(b, off); err != nil {
					errs <- err
					return
				}
				copy(want[off:], b) // this region is this goroutine's alone
				got := make([]byte, region)
				if _, err := tg.ReadAt(got, base); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, want[base:base+region]) {
					errs <- fmt.Errorf("writer %d: its region reads otherwise than it wrote", w)
					return
				}
			}
		}()
	}
	for k := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(k), 12))
			for range 300 {
				// Outside the writers' regions: MiB 1-2, 4-5, 7-8, 10-12.
				m := []int64{1, 4, 7, 10}[r.IntN(4)]
				off := m<<20 + r.Int64N(2<<20-20000)
				n := 1 + r.Int64N(20000)
				got := make([]byte, n)
				if _, err := tg.ReadAt(got, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, img[off:off+n]) {
					errs <- fmt.Errorf("read %d+%d: not the image", off, n)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if !tg.Complete() {
		t.Fatal("the background restore returned without completing")
	}
	if got := fsys.files["/t"].cur; !bytes.Equal(got[:size], want) {
		t.Fatal("the target file is not the image plus the writes")
	}
}
