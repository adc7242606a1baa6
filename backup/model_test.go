package backup_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"umbra/backup"
	"umbra/internal/testutil"
	"umbra/provider"
)

// TestRepoModel: random sequences of writes to a volume (in one place or
// scattered), full and incremental backups (with change bitmaps that may
// say more than changed), image deletes, prunes and reopens, against a
// model of what each listed image holds. After every step the listed
// images are exactly the model's; at checkpoints every one restores to
// its content, verify is clean, and the stored chunk-list segments are
// exactly those the images name (shared ones once).
func TestRepoModel(t *testing.T) {
	seeds, steps := 6, 60
	if os.Getenv("UMBRA_LONG") != "" {
		seeds, steps = 60, 120
	}
	base, seeds := testutil.Seeds(t, seeds)
	defer backup.SetGroupRaw(32 << 10)()
	// 16 segments of 16 chunks (many segments, none a whole batch), and 4
	// segments of 1024 chunks (one 4 MiB batch each: unchanged ones pass
	// through an incremental unread).
	for _, shape := range []struct{ segChunks, segs, seeds int }{{16, 16, seeds}, {1024, 4, max(1, seeds/3)}} {
		defer backup.SetSegmentChunks(backup.SetSegmentChunks(int64(shape.segChunks)))
		for i := range shape.seeds {
			seed := base + uint64(i)
			name := fmt.Sprintf("segment=%d/seed=%d", shape.segChunks, seed)
			if !t.Run(name, func(t *testing.T) { repoModel(t, seed, steps, shape.segChunks, shape.segs) }) {
				t.Fatalf("replay with UMBRA_SEED=%d", seed)
			}
		}
	}
}

func repoModel(t *testing.T, seed uint64, steps, segChunks, segs int) {
	ctx := context.Background()
	r := rand.New(rand.NewPCG(seed, 99))
	const chunk = 4096
	chunks := segChunks * segs
	repo, dir := newRepo(t)
	defer func() { repo.Close() }()
	vol := volumeData(r, chunks*chunk)
	images := map[string][]byte{} // listed image -> its content
	var order []string            // listed images, oldest first
	var parent *backup.Image      // the newest image taken
	dirty := map[int]bool{}       // chunks written since parent
	write := func(c int) {
		for j := c * chunk; j < (c+1)*chunk; j++ {
			vol[j] = byte(r.Uint32())
		}
		if r.IntN(5) == 0 {
			clear(vol[c*chunk : (c+1)*chunk])
		}
		dirty[c] = true
	}
	check := func(full bool) {
		t.Helper()
		list, errs := repo.Images()
		if len(errs) > 0 {
			t.Fatalf("images: %v", errs)
		}
		var ids []string
		for _, x := range list {
			ids = append(ids, x.ID)
		}
		want := slices.Clone(order)
		slices.Sort(want)
		slices.Sort(ids)
		if !slices.Equal(ids, want) {
			t.Fatalf("listed %v, want %v", ids, want)
		}
		if !full {
			return
		}
		for _, id := range order {
			out := filepath.Join(t.TempDir(), "out.img")
			if err := repo.Restore(id, out, nil); err != nil {
				t.Fatal(err)
			}
			if b, _ := os.ReadFile(out); !bytes.Equal(b, images[id]) {
				t.Fatalf("image %s restores wrong", id)
			}
		}
		if v := repo.Verify(); v.GoodImages != len(order) || len(v.BadImages)+len(v.BadChunks)+len(v.BadIndexes) > 0 {
			t.Fatalf("verify: %+v", v)
		}
		if got, want := backup.ObjectNames(repo, "segments/"), backup.SegmentObjects(repo, order...); len(order) > 0 && !slices.Equal(got, want) {
			t.Fatalf("stored segments %v, the images name %v", got, want)
		}
	}
	forget := func(ids ...string) {
		for _, id := range ids {
			delete(images, id)
			order = slices.DeleteFunc(order, func(o string) bool { return o == id })
			if parent != nil && parent.ID == id {
				parent = nil
			}
		}
	}
	for step := range steps {
		switch k := r.IntN(100); {
		case k < 25: // a few chunks in one segment
			seg := r.IntN(segs)
			for range 1 + r.IntN(4) {
				write(seg*segChunks + r.IntN(segChunks))
			}
		case k < 35: // scattered
			for range 1 + r.IntN(20) {
				write(r.IntN(chunks))
			}
		case k < 65: // backup: incremental when there is a parent
			opts := backup.Options{Volume: "v"}
			if parent != nil && r.IntN(4) != 0 {
				bm := &provider.Bitmap{Granule: chunk, Size: int64(len(vol))}
				bm.Bits = make([]uint64, (chunks+63)/64)
				for c := range dirty {
					bm.Bits[c/64] |= 1 << (c % 64)
				}
				for range r.IntN(3) { // "may differ": more is allowed
					c := r.IntN(chunks)
					bm.Bits[c/64] |= 1 << (c % 64)
				}
				opts.Parent, opts.Changed = parent, bm
			}
			x, _, err := repo.Backup(ctx, slices.Clone(vol), opts)
			if err != nil {
				t.Fatalf("step %d: backup: %v", step, err)
			}
			images[x.ID] = slices.Clone(vol)
			order = append(order, x.ID)
			parent, dirty = x, map[int]bool{}
		case k < 75 && len(order) > 0: // delete one image
			id := order[r.IntN(len(order))]
			if _, err := repo.Delete(ctx, []string{id}); err != nil {
				t.Fatalf("step %d: delete %s: %v", step, id, err)
			}
			forget(id)
		case k < 85 && len(order) > 0: // prune to the newest few
			rep, err := repo.Prune(ctx, backup.Policy{Last: 1 + r.IntN(3)}, false)
			if err != nil {
				t.Fatalf("step %d: prune: %v", step, err)
			}
			forget(rep.Removed...)
		case k < 92: // reopen
			repo.Close()
			var err error
			if repo, err = backup.Open(dir); err != nil {
				t.Fatalf("step %d: reopen: %v", step, err)
			}
		default:
			check(true)
			continue
		}
		check(false)
	}
	check(true)
}
