package backup_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"umbra/backup"
)

// listBytes is the stored size of the repository's chunk-list objects.
func listBytes(dir string) int64 { return dirBytes(filepath.Join(dir, "segments"), "") }

// TestSegmentPatches: incrementals after scattered changes store patches
// of their parent's segments, in bytes proportional to the change, not
// the volume; a patch is against the base (a chain of incrementals never
// stacks patches); a segment changed in more than 1/16 of its chunks is
// stored whole again; each image restores on its own, also once the
// images before it are deleted; a damaged patch is named by verify and
// refused by restore.
func TestSegmentPatches(t *testing.T) {
	for _, pw := range []string{"", "secret"} {
		t.Run("encrypted="+map[string]string{"": "no", "secret": "yes"}[pw], func(t *testing.T) {
			defer backup.SetSegmentChunks(backup.SetSegmentChunks(1024))
			ctx := context.Background()
			dir := filepath.Join(t.TempDir(), "repo")
			repo, err := backup.InitWith(ctx, dir, backup.Settings{Password: pw})
			if err != nil {
				t.Fatal(err)
			}
			defer func() { repo.Close() }()
			r := rand.New(rand.NewPCG(31, 32))
			const chunks = 8 * 1024 // 8 segments
			src := volumeData(r, chunks*4096)
			full := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
			fullList := listBytes(dir)

			// 1 % of the chunks, scattered: every segment changes.
			scattered := func() []int {
				var blks []int
				for range chunks / 100 {
					blks = append(blks, r.IntN(chunks))
				}
				return blks
			}
			ids := []string{full.ID}
			parent, cur := full, src
			var patches []string
			for round := range 3 {
				before := listBytes(dir)
				next, bm := rewrite(r, cur, scattered()...)
				x := backupAndRestore(t, repo, next, backup.Options{Volume: "v", Parent: parent, Changed: bm})
				ids = append(ids, x.ID)
				p := backup.PatchObjects(repo, x.ID)
				if len(p) != 8 {
					t.Fatalf("round %d: %d segment patches, want 8 (every segment changed a little)", round, len(p))
				}
				patches = append(patches, p...)
				// ~82 changed chunks a round, 20-36 bytes each, and patches
				// grow with the rounds (cumulative against the base).
				if added, limit := listBytes(dir)-before, int64(82*(round+1)*40+8*200); added > limit || added > fullList/8 {
					t.Fatalf("round %d: %d bytes of chunk list for ~82 changed chunks (the full image's: %d), want at most %d", round, added, fullList, limit)
				}
				if st := x.Stats; st.Index > full.Stats.Index/4 {
					t.Fatalf("round %d: %d bytes of list and index, the full image %d", round, st.Index, full.Stats.Index)
				}
				parent, cur = x, next
			}
			// A segment changed in many chunks is stored whole: no patch there.
			var many []int
			for i := range 200 {
				many = append(many, 3*1024+i*5)
			}
			next, bm := rewrite(r, cur, many...)
			x := backupAndRestore(t, repo, next, backup.Options{Volume: "v", Parent: parent, Changed: bm})
			ids = append(ids, x.ID)
			if p := backup.PatchObjects(repo, x.ID); len(p) != 7 || slices.Contains(backup.SegmentObjects(repo, x.ID), backup.SegmentObject(repo, full.ID, 3)) {
				t.Fatalf("a segment changed in 200 of 1024 chunks: %d patches, its old base still named", len(p))
			}
			// Every image on its own, its parents gone.
			if _, err := repo.Delete(ctx, ids[:len(ids)-2]); err != nil {
				t.Fatal(err)
			}
			for _, im := range []struct {
				id   string
				want memSource
			}{{ids[len(ids)-2], cur}, {x.ID, next}} {
				out := filepath.Join(t.TempDir(), "out.img")
				if err := repo.Restore(im.id, out, nil); err != nil {
					t.Fatal(err)
				}
				if b, _ := os.ReadFile(out); !slices.Equal(b, im.want) {
					t.Fatalf("image %s restores wrong once its parents are deleted", im.id)
				}
			}
			if got, want := backup.ObjectNames(repo, "segments/"), backup.SegmentObjects(repo, ids[len(ids)-2:]...); !slices.Equal(got, want) {
				t.Fatalf("after deleting the parents: %d list objects, the images name %d", len(got), len(want))
			}
			// A damaged patch: verify names the images using it, restore refuses.
			victim := backup.PatchObjects(repo, x.ID)[0]
			path := filepath.Join(dir, filepath.FromSlash(victim))
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			b[len(b)/2] ^= 0x04
			os.WriteFile(path, b, 0o600)
			rep := repo.Verify()
			if !slices.Contains(rep.BadImages, x.ID) {
				t.Fatalf("verify after a flipped bit in a patch: %+v", rep)
			}
			if err := repo.Restore(x.ID, filepath.Join(t.TempDir(), "bad.img"), nil); !errors.Is(err, backup.ErrCorrupt) {
				t.Fatalf("restore through a damaged patch: %v", err)
			}
		})
	}
}
