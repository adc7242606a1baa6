package backup_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"umbra/backup"
	"umbra/internal/testutil"
)

// TestConcurrentBackups runs three backup chains at once into one
// repository (a local directory; an encrypted one on a real S3 server),
// each through its own handle (as three processes would):
// two volumes with much content in common and a third copy of the first,
// so the same chunks, packs and chunk-list segments are written by
// several backups at the same moment. Afterwards every image restores
// byte-identical, verify is clean, and after a prune that keeps the
// newest image of each volume those still restore and verify.
func TestConcurrentBackups(t *testing.T) {
	t.Run("local", func(t *testing.T) {
		_, dir := newRepo(t)
		concurrentBackups(t, func() (*backup.Repo, error) { return backup.Open(dir) })
	})
	t.Run("s3", func(t *testing.T) {
		ctx := context.Background()
		v := testutil.StartS3(t)
		set := s3Settings
		set.Password = "s3 secret"
		repo, err := backup.InitWith(ctx, v.Location("concurrent"), set)
		if err != nil {
			t.Fatal(err)
		}
		repo.Close()
		concurrentBackups(t, func() (*backup.Repo, error) { return backup.OpenWith(ctx, v.Location("concurrent"), set) })
	})
}

func concurrentBackups(t *testing.T, open func() (*backup.Repo, error)) {
	ctx := context.Background()
	const size = 2 << 20
	common := volumeData(rand.New(rand.NewPCG(1, 2)), size)
	type chain struct {
		volume string
		src    memSource
		images map[string]memSource
	}
	chains := []*chain{
		{volume: "a", src: common},
		{volume: "b", src: append(memSource(nil), common...)},
		{volume: "a-copy", src: append(memSource(nil), common...)},
	}
	// b differs from a in its second half.
	copy(chains[1].src[size/2:], volumeData(rand.New(rand.NewPCG(3, 4)), size/2))
	var wg sync.WaitGroup
	errs := make(chan error, len(chains))
	for i, c := range chains {
		c.images = map[string]memSource{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			repo, err := open()
			if err != nil {
				errs <- err
				return
			}
			defer repo.Close()
			r := rand.New(rand.NewPCG(uint64(i), 7))
			var parent *backup.Image
			src := c.src
			for n := range 5 {
				opts := backup.Options{Volume: c.volume}
				if n > 0 {
					var blks []int
					for range 20 {
						blks = append(blks, r.IntN(size/4096))
					}
					next, changed := rewrite(r, src, blks...)
					src, opts.Parent, opts.Changed = next, parent, changed
				}
				x, _, err := repo.Backup(ctx, src, opts)
				if err != nil {
					errs <- fmt.Errorf("volume %s backup %d: %w", c.volume, n, err)
					return
				}
				c.images[x.ID] = src
				parent = x
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	repo, err := open()
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	restoreAll := func(want map[string]memSource) {
		t.Helper()
		list, errs := repo.Images()
		if len(errs) > 0 {
			t.Fatalf("images: %v", errs)
		}
		if len(list) != len(want) {
			t.Fatalf("%d images listed, want %d", len(list), len(want))
		}
		for id, data := range want {
			out := filepath.Join(t.TempDir(), "out.img")
			if err := repo.Restore(id, out, nil); err != nil {
				t.Fatalf("restore %s: %v", id, err)
			}
			got, _ := os.ReadFile(out)
			if !bytes.Equal(got, data) {
				t.Fatalf("image %s does not restore byte-identical", id)
			}
		}
		if rep := repo.Verify(); len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes)+len(rep.Unreadable) > 0 || rep.GoodImages != len(want) {
			t.Fatalf("verify: %+v", rep)
		}
	}
	all := map[string]memSource{}
	for _, c := range chains {
		for id, data := range c.images {
			all[id] = data
		}
	}
	restoreAll(all)
	rep, err := repo.Prune(ctx, backup.Policy{Last: 1}, false)
	if err != nil {
		t.Fatal(err)
	}
	kept := map[string]memSource{}
	for _, id := range rep.Kept {
		kept[id] = all[id]
	}
	if len(kept) != len(chains) {
		t.Fatalf("prune kept %v, want the newest image of each of %d volumes", rep.Kept, len(chains))
	}
	restoreAll(kept)
}
