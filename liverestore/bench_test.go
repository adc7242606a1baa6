package liverestore

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"umbra/backup"
	"umbra/cow"
)

// BenchmarkRandomRead: random 4 KiB reads of unrestored data by 16
// goroutines, from a local repository (the target on the test's disk).
func BenchmarkRandomRead(b *testing.B) {
	dir := b.TempDir()
	size := 256 << 20
	img := make(memImage, size)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range img {
		img[i] = byte(r.Uint32())
	}
	repo, err := backup.Init(filepath.Join(dir, "repo"))
	if err != nil {
		b.Fatal(err)
	}
	defer repo.Close()
	x, _, err := repo.Backup(context.Background(), img, backup.Options{Volume: "v"})
	if err != nil {
		b.Fatal(err)
	}
	ir, err := repo.OpenImage(context.Background(), x.ID)
	if err != nil {
		b.Fatal(err)
	}
	f, _ := os.Create(filepath.Join(dir, "t"))
	f.Truncate(int64(size))
	tg, err := Create(cow.OSFS{}, OSFile(f), filepath.Join(dir, "t.map"), ir, x.ID, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer tg.Close()
	b.ResetTimer()
	var wg sync.WaitGroup
	per := b.N/16 + 1
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 3))
			buf := make([]byte, 4096)
			for range per {
				if _, err := tg.ReadAt(buf, r.Int64N(int64(size)/4096)*4096); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}
