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

// TestIncrementalReadsChangesOnly: an incremental with few changes in a
// segment reads none of its parent's chunk-list segments (only the
// parent's patch there, when it has one) and stores a patch; when the
// parent's patch and the changes together are too many for a patch, it
// reads the parent's segment and stores the segment whole. Every image
// restores to its volume.
func TestIncrementalReadsChangesOnly(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(1024)) // one 4 MiB batch
	ctx := context.Background()
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(41, 42))
	const chunks = 4 * 1024 // 4 segments
	src := volumeData(r, chunks*4096)
	full := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	incremental := func(parent *backup.Image, cur memSource, blks []int) (*backup.Image, memSource, []string) {
		t.Helper()
		next, bm := rewrite(r, cur, blks...)
		done := backup.RecordGets(repo, "segments/")
		x, st, err := repo.Backup(ctx, next, backup.Options{Volume: "v", Parent: parent, Changed: bm})
		read := done()
		if err != nil {
			t.Fatal(err)
		}
		if !st.Incremental || st.Read != int64(len(blks))*4096 {
			t.Fatalf("incremental %v, %d bytes read for %d changed chunks", st.Incremental, st.Read, len(blks))
		}
		backupAndRestoreCheck(t, repo, x.ID, next)
		return x, next, read
	}
	// 40 changes in segment 1 and 3 in segment 2: under the 64 (1/16 of
	// 1024) a patch may hold.
	var blks []int
	for i := range 40 {
		blks = append(blks, 1024+i*20)
	}
	blks = append(blks, 2048+5, 2048+500, 2048+1000)
	// Segment 0 is read as the check that the parent is still there.
	x1, cur, read := incremental(full, src, blks)
	if want := []string{backup.SegmentObject(repo, full.ID, 0)}; !slices.Equal(read, want) {
		t.Fatalf("an incremental of a full image read the chunk-list objects %v, want only its check's %v", read, want)
	}
	if p := backup.PatchObjects(repo, x1.ID); len(p) != 2 || x1.Segments[1] != full.Segments[1] || x1.Segments[2] != full.Segments[2] {
		t.Fatalf("%d patches, segments 1 and 2 on their old bases: %v %v, want 2 and both", len(p), x1.Segments[1] == full.Segments[1], x1.Segments[2] == full.Segments[2])
	}
	// 30 more in segment 1 (70 with its patch's: segment 1 is written
	// whole, from the parent's), one more in segment 2 (a patch of 4).
	blks = blks[:0]
	for i := range 30 {
		blks = append(blks, 1024+i*20+7)
	}
	blks = append(blks, 2048+700)
	x2, _, read := incremental(x1, cur, blks)
	slices.Sort(read)
	want := []string{backup.SegmentObject(repo, full.ID, 0), backup.SegmentObject(repo, full.ID, 1)}
	for _, k := range []int{1, 2} {
		want = append(want, "segments/"+x1.Patches[k].String()[:2]+"/"+x1.Patches[k].String())
	}
	slices.Sort(want)
	if !slices.Equal(read, want) {
		t.Fatalf("the second incremental read %v, want segments 0 (its check) and 1 of the full image and the first incremental's two patches %v", read, want)
	}
	if x2.Segments[1] == full.Segments[1] || x2.Patches[1] != (backup.Hash{}) || x2.Segments[2] != full.Segments[2] || x2.Patches[2] == (backup.Hash{}) {
		t.Fatalf("segment 1 new base %v, segment 2 patched %v", x2.Segments[1] != full.Segments[1], x2.Patches[2] != backup.Hash{})
	}
	verifyClean(t, repo, 3)
}
