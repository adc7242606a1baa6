package backup_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"umbra/backup"
	"umbra/provider"
)

// usersOf returns the images (of ids) whose chunk lists hold any of hs.
func usersOf(t *testing.T, repo *backup.Repo, ids []string, hs []backup.Hash) []string {
	t.Helper()
	var out []string
	for _, id := range ids {
		x, err := repo.Image(id)
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range x.Chunks {
			if slices.Contains(hs, h) {
				out = append(out, id)
				break
			}
		}
	}
	slices.Sort(out)
	return out
}

// verifyBatched verifies repo twice, checking the packs a few at a time
// and all together, and checks that both say the same.
func verifyBatched(t *testing.T, repo *backup.Repo) backup.VerifyReport {
	t.Helper()
	restore := backup.SetVerifyBatch(1)
	small := repo.Verify()
	restore()
	rep := repo.Verify()
	if !reflect.DeepEqual(small, rep) {
		t.Fatalf("verify a pack at a time: %+v; all packs together: %+v", small, rep)
	}
	return rep
}

// checkCorruption damages a local repository in three ways — one bit of
// one blob, a truncated chunk list, a deleted pack — and checks that
// verify names exactly the images each breaks, that restore through the
// damage fails with ErrCorrupt or ErrNotExist, and that an unaffected
// image still restores. ids are the repository's images, oldest first.
func checkCorruption(t *testing.T, repo *backup.Repo, root string, ids []string) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.img")
	first, _ := repo.Image(ids[0])
	last, _ := repo.Image(ids[len(ids)-1])
	var victim backup.Hash
	for _, h := range last.Chunks {
		if h != (backup.Hash{}) && !slices.Contains(first.Chunks, h) {
			victim = h
			break
		}
	}
	if victim == (backup.Hash{}) {
		t.Fatal("no chunk in the newest image that the oldest lacks")
	}
	pack, off, n := backup.BlobLocation(repo, victim)
	path := filepath.Join(root, filepath.FromSlash(pack))
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	orig := slices.Clone(b)
	b[off+n/2] ^= 0x10
	os.WriteFile(path, b, 0o600)
	rep := verifyBatched(t, repo)
	// The blob holds several chunks compressed together. Sealed, it no
	// longer opens and all of them are lost; plain (no frame checksum),
	// the chunks whose bytes the flip changed no longer match their
	// hashes. Either way the bad chunks are of that blob, and exactly the
	// images that use any of them are broken.
	inBlob := backup.BlobChunks(repo, victim)
	var bad []backup.Hash
	for _, s := range rep.BadChunks {
		i := slices.IndexFunc(inBlob, func(h backup.Hash) bool { return h.String() == s })
		if i < 0 {
			t.Fatalf("verify after a bit flip in the blob of %s names chunk %s of another blob", victim, s)
		}
		bad = append(bad, inBlob[i])
	}
	want := usersOf(t, repo, ids, bad)
	if len(bad) == 0 || len(want) == 0 || !slices.Equal(rep.BadImages, want) {
		t.Fatalf("verify after a bit flip: %+v, want bad chunks among %v and the images using them, %v", rep, inBlob, want)
	}
	broken := want[len(want)-1]
	if err := repo.Restore(broken, out, nil); !errors.Is(err, backup.ErrCorrupt) || !strings.Contains(err.Error(), "was removed") {
		t.Fatalf("restore through a damaged chunk: %v, want ErrCorrupt and the partial file removed", err)
	}
	if _, err := os.Stat(out); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a failed restore left the file it created: %v", err)
	}
	if err := repo.Restore(ids[0], out, nil); err != nil {
		t.Fatalf("an unaffected image does not restore: %v", err)
	}
	// Into a file that was there, a failed restore says what is left.
	if err := repo.Restore(broken, out, nil); !errors.Is(err, backup.ErrCorrupt) || !strings.Contains(err.Error(), "holds part of the image") {
		t.Fatalf("restore over a file through a damaged chunk: %v", err)
	}
	os.WriteFile(path, orig, 0o600)

	// A truncated chunk-list segment breaks exactly the images that share
	// it.
	seg := backup.SegmentObject(repo, ids[1], 0)
	var sharing []string
	for _, id := range ids {
		if slices.Contains(backup.SegmentObjects(repo, id), seg) {
			sharing = append(sharing, id)
		}
	}
	slices.Sort(sharing)
	lp := filepath.Join(root, filepath.FromSlash(seg))
	lb, _ := os.ReadFile(lp)
	os.WriteFile(lp, lb[:len(lb)/2], 0o600)
	rep = verifyBatched(t, repo)
	if !slices.Equal(rep.BadImages, sharing) || len(rep.BadChunks) != 0 {
		t.Fatalf("verify after truncating %s's chunk list segment %s: %+v, want %v broken", ids[1], seg, rep, sharing)
	}
	if err := repo.Restore(ids[1], out, nil); !errors.Is(err, backup.ErrCorrupt) {
		t.Fatalf("restore of an image with a truncated chunk list: %v, want ErrCorrupt", err)
	}
	os.WriteFile(lp, lb, 0o600)

	// A deleted pack breaks exactly the images that use a chunk in it.
	inPack := backup.PackChunks(repo, pack)
	want = usersOf(t, repo, ids, inPack)
	os.Rename(path, path+".away")
	rep = verifyBatched(t, repo)
	if !slices.Equal(rep.BadImages, want) || len(rep.BadChunks) == 0 {
		t.Fatalf("verify after deleting pack %s: bad images %v, want %v", pack, rep.BadImages, want)
	}
	for _, id := range ids {
		if !slices.Contains(want, id) {
			if err := repo.Restore(id, out, nil); err != nil {
				t.Fatalf("image %s does not use the deleted pack but does not restore: %v", id, err)
			}
			break
		}
	}
	os.Rename(path+".away", path)
	if rep := verifyBatched(t, repo); len(rep.BadImages)+len(rep.BadChunks)+len(rep.BadIndexes) > 0 {
		t.Fatalf("verify after undoing the damage: %+v", rep)
	}
}

// TestDamagedIndexRebuilt: a truncated chunk index leaves its chunks
// unlocatable — verify names the index and every image that needs them —
// and prune rebuilds the locations from the packs' own trailers: version
// 2 trailers (places only: the blobs are opened and hashed, with the
// repository's keyed hash when it is encrypted) and the version 1
// trailers earlier Umbra wrote (every chunk with its hash).
func TestDamagedIndexRebuilt(t *testing.T) {
	for _, c := range []struct {
		name     string
		password string
		v1       bool
	}{{"v2", "", false}, {"v2-encrypted", "pw", false}, {"v1", "", true}} {
		t.Run(c.name, func(t *testing.T) {
			if c.v1 {
				defer backup.SetTrailerV1()()
			}
			damagedIndexRebuilt(t, backup.Settings{Password: c.password})
		})
	}
}

func damagedIndexRebuilt(t *testing.T, set backup.Settings) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "repo")
	repo, err := backup.InitWith(ctx, dir, set)
	if err != nil {
		t.Fatal(err)
	}
	src := volumeData(rand.New(rand.NewPCG(51, 52)), 2<<20)
	var ids []string
	for k := 0; k < 3; k++ {
		x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
		ids = append(ids, x.ID)
		copy(src[k*4096:], bytes.Repeat([]byte{byte(k + 9)}, 4096))
	}
	repo.Close()
	idx := backup.ObjectNames(repo, "index/")
	p := filepath.Join(dir, filepath.FromSlash(idx[0]))
	b, _ := os.ReadFile(p)
	os.WriteFile(p, b[:len(b)/2], 0o600)

	repo, err = backup.OpenWith(ctx, dir, set)
	if err != nil {
		t.Fatalf("open with a damaged index: %v", err)
	}
	defer repo.Close()
	rep := repo.Verify()
	if len(rep.BadIndexes) == 0 || !strings.Contains(rep.BadIndexes[0], idx[0]) || len(rep.BadImages) == 0 {
		t.Fatalf("verify with a truncated index: %+v", rep)
	}
	pr, err := repo.Prune(ctx, backup.Policy{Last: 10}, false)
	if err != nil || pr.Recovered == 0 || len(pr.Removed) != 0 {
		t.Fatalf("prune did not re-index: %+v %v", pr, err)
	}
	if rep := repo.Verify(); rep.GoodImages != 3 || len(rep.BadIndexes)+len(rep.BadImages)+len(rep.BadChunks) > 0 {
		t.Fatalf("verify after prune rebuilt the index: %+v", rep)
	}
	for _, id := range ids {
		if err := repo.Restore(id, filepath.Join(t.TempDir(), "out.img"), nil); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDamagedImageRecord: an image record that decodes but makes no sense
// (or does not decode) is reported as that image's damage — by Images,
// Verify, Restore and Prune, never a panic — while the other image still
// restores; `umbra images delete` removes it, lists and all, and frees
// the space only it used.
func TestDamagedImageRecord(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(64))
	edit := func(f func(m map[string]any)) func([]byte) []byte {
		return func(b []byte) []byte {
			var m map[string]any
			if err := json.Unmarshal(b, &m); err != nil {
				t.Fatal(err)
			}
			f(m)
			b, _ = json.Marshal(m)
			return b
		}
	}
	for name, damage := range map[string]func([]byte) []byte{
		"chunk size 0":       edit(func(m map[string]any) { m["chunk_size"] = 0 }),
		"other chunk size":   edit(func(m map[string]any) { m["chunk_size"] = 8192 }),
		"negative size":      edit(func(m map[string]any) { m["size"] = -4096 }),
		"size past 4 EiB":    edit(func(m map[string]any) { m["size"] = int64(1)<<62 + 1 }),
		"0 chunks a segment": edit(func(m map[string]any) { m["segment_chunks"] = 0 }),
		"too few segments":   edit(func(m map[string]any) { m["segments"] = m["segments"].([]any)[:1] }),
		"segments swapped":   edit(func(m map[string]any) { s := m["segments"].([]any); s[0], s[1] = s[1], s[0] }),
		"not JSON":           func(b []byte) []byte { return b[:len(b)/2] },
	} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			repo, _ := newRepo(t)
			rng := rand.New(rand.NewPCG(61, 62))
			good := backupAndRestore(t, repo, volumeData(rng, 2<<20), backup.Options{Volume: "a"})
			bad := backupAndRestore(t, repo, volumeData(rng, 2<<20), backup.Options{Volume: "b"})
			before := backup.ObjectNames(repo, "packs/")
			if err := backup.EditRecord(repo, bad.ID, damage); err != nil {
				t.Fatal(err)
			}

			// A record that cannot be read is reported by Images; one
			// that reads but names the wrong segments shows when its list
			// is read.
			list, errs := repo.Images()
			var re *backup.RecordError
			if name == "segments swapped" {
				if len(list) != 2 || len(errs) != 0 {
					t.Fatalf("Images: %d listed, errors %v; want both listed", len(list), errs)
				}
			} else if len(list) != 1 || list[0].ID != good.ID || len(errs) != 1 || !errors.As(errs[0], &re) || re.ID != bad.ID {
				t.Fatalf("Images: %d listed, errors %v; want %s listed and %s reported", len(list), errs, good.ID, bad.ID)
			}
			rep := repo.Verify()
			if !slices.Equal(rep.BadImages, []string{bad.ID}) || rep.GoodImages != 1 || len(rep.BadChunks) > 0 {
				t.Fatalf("verify: %+v, want exactly %s bad", rep, bad.ID)
			}
			if err := repo.Restore(bad.ID, filepath.Join(t.TempDir(), "out.img"), nil); !errors.Is(err, backup.ErrCorrupt) || !strings.Contains(err.Error(), bad.ID) {
				t.Fatalf("restore of the damaged image: %v, want ErrCorrupt naming it", err)
			}
			if err := repo.Restore(good.ID, filepath.Join(t.TempDir(), "out.img"), nil); err != nil {
				t.Fatalf("restore of the intact image: %v", err)
			}
			if _, err := repo.Prune(ctx, backup.Policy{Last: 5}, false); err == nil || !strings.Contains(err.Error(), "umbra images delete "+bad.ID) {
				t.Fatalf("prune over a damaged record: %v, want a refusal saying how to delete it", err)
			}
			if _, err := repo.Delete(ctx, []string{bad.ID, "v-19700101T000000Z"}); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("delete with an unknown image: %v, want ErrNotExist", err)
			}
			if !slices.Contains(backup.ObjectNames(repo, "images/"), "images/"+bad.ID) {
				t.Fatal("a refused delete removed the damaged record")
			}
			dr, err := repo.Delete(ctx, []string{bad.ID})
			if err != nil || !slices.Equal(dr.Removed, []string{bad.ID}) || !slices.Equal(dr.Kept, []string{good.ID}) || dr.BytesFreed == 0 {
				t.Fatalf("delete: %+v %v", dr, err)
			}
			if left := backup.ObjectNames(repo, "lists/"); slices.ContainsFunc(left, func(n string) bool { return strings.Contains(n, bad.ID) }) {
				t.Fatalf("the deleted image's chunk list is still there: %v", left)
			}
			if after := backup.ObjectNames(repo, "packs/"); len(after) >= len(before) {
				t.Fatalf("no pack freed: %d before, %d after", len(before), len(after))
			}
			if rep := repo.Verify(); rep.GoodImages != 1 || len(rep.BadImages)+len(rep.BadIndexes)+len(rep.BadChunks) > 0 {
				t.Fatalf("verify after delete: %+v", rep)
			}
			if err := repo.Restore(good.ID, filepath.Join(t.TempDir(), "out.img"), nil); err != nil {
				t.Fatalf("restore after delete: %v", err)
			}
		})
	}
}

// TestParentGone: an incremental backup whose parent image was deleted
// (or damaged) after it was chosen reads everything instead, says why,
// and the image restores byte-identical.
func TestParentGone(t *testing.T) {
	ctx := context.Background()
	repo, _ := newRepo(t)
	src := volumeData(rand.New(rand.NewPCG(81, 82)), 1<<20)
	parent := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	if _, err := repo.Delete(ctx, []string{parent.ID}); err != nil {
		t.Fatal(err)
	}
	next := append(memSource(nil), src...)
	next[5*4096] ^= 1
	changed := &provider.Bitmap{Granule: 4096, Size: int64(len(src)), Bits: make([]uint64, 4)}
	changed.Bits[0] = 1 << 5
	x, st, err := repo.Backup(ctx, next, backup.Options{Volume: "v", Parent: parent, Changed: changed})
	if err != nil {
		t.Fatalf("backup on a deleted parent: %v", err)
	}
	if st.Incremental || x.Parent != "" || !strings.Contains(st.WhyFull, parent.ID) {
		t.Fatalf("backup on a deleted parent: incremental %v, parent %q, why %q", st.Incremental, x.Parent, st.WhyFull)
	}
	out := filepath.Join(t.TempDir(), "out.img")
	if err := repo.Restore(x.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, next) {
		t.Fatal("the image taken without its parent restores wrong")
	}
}

// TestUnfetchableRecord: a record that cannot be fetched (here a
// symlink to a directory where the object should be; on S3 a server
// that does not answer) is not offered for deletion: prune says to try
// again.
func TestUnfetchableRecord(t *testing.T) {
	repo, dir := newRepo(t)
	backupAndRestore(t, repo, volumeData(rand.New(rand.NewPCG(91, 92)), 1<<20), backup.Options{Volume: "v"})
	if err := os.Symlink(t.TempDir(), filepath.Join(dir, "images", "v-19700101T000000Z")); err != nil {
		t.Fatal(err)
	}
	_, err := repo.Prune(context.Background(), backup.Policy{Last: 5}, false)
	if err == nil || !strings.Contains(err.Error(), "try again") || strings.Contains(err.Error(), "images delete") {
		t.Fatalf("prune over a record that cannot be fetched: %v", err)
	}
	// Verify says so apart from damage.
	if rep := repo.Verify(); !slices.Equal(rep.Unreadable, []string{"v-19700101T000000Z"}) || len(rep.BadImages) > 0 || rep.GoodImages != 1 {
		t.Fatalf("verify over a record that cannot be fetched: %+v", rep)
	}
}
