package backup_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"umbra/backup"
	"umbra/internal/testutil"
)

// copyImages is a source repository with three images of volume v (a
// full one, an incremental whose list is patched, a full one of the
// same data, which has the incremental's content) and one of volume w,
// and the data of each.
func copyImages(t *testing.T, src *backup.Repo) (ids []string, data map[string][]byte) {
	t.Helper()
	r := rand.New(rand.NewPCG(41, 42))
	vol := volumeData(r, 8*64*4096) // 8 segments of 64 chunks
	data = map[string][]byte{}
	full := backupAndRestore(t, src, vol, backup.Options{Volume: "v"})
	next, bm := rewrite(r, vol, 2*64+5, 2*64+40, 5*64+1)
	incr := backupAndRestore(t, src, next, backup.Options{Volume: "v", Parent: full, Changed: bm})
	again := backupAndRestore(t, src, next, backup.Options{Volume: "v"})
	w := backupAndRestore(t, src, volumeData(r, 3*64*4096+4096+100), backup.Options{Volume: "w"}) // a short last chunk
	data[full.ID], data[incr.ID], data[again.ID] = vol, next, next
	wd, _ := os.ReadFile(restoreTo(t, src, w.ID))
	data[w.ID] = wd
	return []string{full.ID, incr.ID, again.ID, w.ID}, data
}

func restoreTo(t *testing.T, repo *backup.Repo, id string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.img")
	if err := repo.Restore(id, out, nil); err != nil {
		t.Fatalf("restore %s from %s: %v", id, repo.Location(), err)
	}
	return out
}

// checkCopied: every image of ids restores from dst as data says, and
// dst verifies.
func checkCopied(t *testing.T, dst *backup.Repo, ids []string, data map[string][]byte) {
	t.Helper()
	for _, id := range ids {
		got, _ := os.ReadFile(restoreTo(t, dst, id))
		if !bytes.Equal(got, data[id]) {
			t.Fatalf("image %s restores from the target %s different from the source", id, dst.Location())
		}
	}
	if rep := dst.Verify(); len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes)+len(rep.BadPacks) > 0 {
		t.Fatalf("verify of the target: %+v", rep)
	}
}

func results(st backup.CopyStats) []string {
	var out []string
	for _, ci := range st.Images {
		out = append(out, ci.Result)
	}
	return out
}

// TestCopyLocal copies between two unencrypted repositories that name
// chunks alike: only missing chunks are read, an image with the content
// of one copied before is skipped as such, and a second copy moves
// nothing.
func TestCopyLocal(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(64))
	ctx := context.Background()
	src, _ := newRepo(t)
	ids, data := copyImages(t, src)
	dst, _ := newRepo(t)
	// One image first: the rest then needs only what it lacks.
	st, err := backup.Copy(ctx, src, dst, backup.CopyOptions{Images: ids[:1]})
	if err != nil {
		t.Fatal(err)
	}
	if st.Rehashed || !slices.Equal(results(st), []string{"copied"}) || st.ChunksPresent != 0 || st.BytesRead != st.BytesCopied {
		t.Fatalf("first copy: %+v", st)
	}
	st, err = backup.Copy(ctx, src, dst, backup.CopyOptions{All: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := results(st); !slices.Equal(got, []string{"present", "copied", "same-content", "copied"}) || st.Images[2].SameAs != ids[1] {
		t.Fatalf("results %v, %+v", got, st.Images)
	}
	// The incremental changed three chunks: all else was there.
	if inc := st.Images[1]; inc.ChunksCopied != 3 || inc.BytesCopied != 3*4096 || inc.ChunksPresent == 0 {
		t.Fatalf("the incremental moved %d chunks (%d bytes), found %d there; want 3", inc.ChunksCopied, inc.BytesCopied, inc.ChunksPresent)
	}
	if st.BytesRead != st.BytesCopied {
		t.Fatalf("read %d bytes from the source to store %d", st.BytesRead, st.BytesCopied)
	}
	checkCopied(t, dst, []string{ids[0], ids[1], ids[3]}, data)
	list, _ := dst.Images()
	for _, y := range list {
		x, _ := src.Image(y.ID)
		if y.Volume != x.Volume || !y.Created.Equal(x.Created) || y.Snapshot != x.Snapshot || y.Size != x.Size {
			t.Fatalf("the copy of %s is recorded as %+v", x.ID, y)
		}
	}
	st, err = backup.Copy(ctx, src, dst, backup.CopyOptions{Volumes: []string{"v"}})
	if err != nil || st.ChunksCopied != 0 || st.BytesRead != 0 || !slices.Equal(results(st), []string{"present", "present", "same-content"}) {
		t.Fatalf("copy again: %+v %v", st, err)
	}
	// The patched incremental after the full image of the same data:
	// its list is made again as the target would write it, and matches.
	other, _ := newRepo(t)
	if _, err := backup.Copy(ctx, src, other, backup.CopyOptions{Images: ids[2:3]}); err != nil {
		t.Fatal(err)
	}
	st, err = backup.Copy(ctx, src, other, backup.CopyOptions{Images: ids[1:2]})
	if err != nil || !slices.Equal(results(st), []string{"same-content"}) || st.Images[0].SameAs != ids[2] || st.BytesRead != 0 {
		t.Fatalf("copy of an incremental whose content is there: %+v %v", st, err)
	}
	// A damaged record of the same ID in the target is not taken for
	// the image: the copy says how to go on.
	if err := backup.EditRecord(other, ids[2], func(b []byte) []byte { return []byte("{") }); err != nil {
		t.Fatal(err)
	}
	st, err = backup.Copy(ctx, src, other, backup.CopyOptions{Images: ids[2:3]})
	if err == nil || !strings.Contains(err.Error(), "umbra images delete") || !slices.Equal(results(st), []string{"failed"}) {
		t.Fatalf("copy over a damaged record: %+v %v", st, err)
	}
	// Bad input changes nothing.
	if _, err := backup.Copy(ctx, src, dst, backup.CopyOptions{Images: []string{ids[3], "nope"}}); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("copy of a missing image: %v", err)
	}
	if _, err := backup.Copy(ctx, src, dst, backup.CopyOptions{Volumes: []string{"x"}}); err == nil {
		t.Fatal("copy of a volume without images succeeded")
	}
	if _, err := backup.Copy(ctx, src, src, backup.CopyOptions{All: true}); err == nil {
		t.Fatal("copy into the same repository succeeded")
	}
	big, _ := backup.InitWith(ctx, filepath.Join(t.TempDir(), "big"), backup.Settings{ChunkSize: 16384})
	defer big.Close()
	if _, err := backup.Copy(ctx, src, big, backup.CopyOptions{All: true}); err == nil || !strings.Contains(err.Error(), "--chunk-size 4096") {
		t.Fatalf("copy between chunk sizes: %v", err)
	}
	// A prune holding the target makes a copy wait its turn.
	unlock, err := dst.Lock(ctx, "prune", true)
	if err != nil {
		t.Fatal(err)
	}
	_, err = backup.Copy(ctx, src, dst, backup.CopyOptions{All: true})
	unlock()
	if !errors.Is(err, backup.ErrLocked) {
		t.Fatalf("copy into a repository under prune: %v", err)
	}
}

// TestCopyKeys copies between repositories that name chunks
// differently: encrypted to plain, plain to encrypted, key A to key B.
// Every chunk is read and hashed again; the target stores each once.
func TestCopyKeys(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(64))
	ctx := context.Background()
	dir := t.TempDir()
	a, err := backup.InitWith(ctx, filepath.Join(dir, "a"), backup.Settings{Password: "key A"})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ids, data := copyImages(t, a)
	plain, _ := newRepo(t)
	b, err := backup.InitWith(ctx, filepath.Join(dir, "b"), backup.Settings{Password: "key B"})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for _, c := range []struct {
		name     string
		src, dst *backup.Repo
	}{{"encrypted to plain", a, plain}, {"key A to key B", a, b}} {
		st, err := backup.Copy(ctx, c.src, c.dst, backup.CopyOptions{All: true})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		// Chunk names differ: no image is known to be the same content.
		if !st.Rehashed || !slices.Equal(results(st), []string{"copied", "copied", "copied", "copied"}) || st.BytesRead <= st.BytesCopied {
			t.Fatalf("%s: %+v", c.name, st)
		}
		// The third image has the second's content: all there.
		if st.Images[2].ChunksCopied != 0 {
			t.Fatalf("%s: an image whose chunks were all there moved %d", c.name, st.Images[2].ChunksCopied)
		}
		checkCopied(t, c.dst, ids, data)
	}
	// And back from plain into a new encrypted one.
	c, err := backup.InitWith(ctx, filepath.Join(dir, "c"), backup.Settings{Password: "key C"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := backup.Copy(ctx, plain, c, backup.CopyOptions{Images: ids[1:2]}); err != nil {
		t.Fatal(err)
	}
	checkCopied(t, c, ids[1:2], data)
}

// TestCopyS3 copies a local repository into S3 (versitygw) and back.
func TestCopyS3(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(64))
	ctx := context.Background()
	v := testutil.StartS3(t)
	src, _ := newRepo(t)
	ids, data := copyImages(t, src)
	remote, err := backup.InitWith(ctx, v.Location("copy"), s3Settings)
	if err != nil {
		t.Fatal(err)
	}
	defer remote.Close()
	st, err := backup.Copy(ctx, src, remote, backup.CopyOptions{All: true})
	if err != nil || st.Rehashed || st.ChunksCopied == 0 {
		t.Fatalf("copy into S3: %+v %v", st, err)
	}
	checkCopied(t, remote, []string{ids[0], ids[1], ids[3]}, data)
	back, _ := newRepo(t)
	if _, err := backup.Copy(ctx, remote, back, backup.CopyOptions{Volumes: []string{"w"}}); err != nil {
		t.Fatal(err)
	}
	checkCopied(t, back, ids[3:], data)
}

// TestCopyResume: a copy interrupted half-way leaves no image in the
// target; the next moves only the chunks whose packs were not indexed
// yet, and the image restores.
func TestCopyResume(t *testing.T) {
	defer backup.SetSmallPacks(64<<10, 1)()
	defer backup.SetGroupRaw(16 << 10)()
	defer backup.SetCopyIndexEvery(1)()
	for _, enc := range []bool{false, true} {
		ctx := context.Background()
		src, _ := newRepo(t)
		r := rand.New(rand.NewPCG(43, 44))
		vol := volumeData(r, 16<<20)
		x := backupAndRestore(t, src, vol, backup.Options{Volume: "v"})
		set := backup.Settings{}
		if enc {
			set.Password = "target"
		}
		dst, err := backup.InitWith(ctx, filepath.Join(t.TempDir(), "dst"), set)
		if err != nil {
			t.Fatal(err)
		}
		cctx, cancel := context.WithCancel(ctx)
		first, err := backup.Copy(cctx, src, dst, backup.CopyOptions{All: true, Progress: func(_ string, done, total int64) {
			if done >= total/2 {
				cancel()
			}
		}})
		cancel()
		if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "run the copy again") {
			t.Fatalf("interrupted copy: %v", err)
		}
		if list, _ := dst.Images(); len(list) != 0 || len(backup.ObjectNames(dst, "images/")) != 0 {
			t.Fatalf("an interrupted copy left images %v", backup.ObjectNames(dst, "images/"))
		}
		if first.ChunksCopied == 0 {
			t.Fatalf("the interrupted copy moved nothing: %+v", first)
		}
		// From a fresh open, as a rerun of the command would.
		again, err := backup.OpenWith(ctx, dst.Location(), set)
		if err != nil {
			t.Fatal(err)
		}
		defer again.Close()
		second, err := backup.Copy(ctx, src, again, backup.CopyOptions{All: true})
		if err != nil {
			t.Fatal(err)
		}
		full, _ := newRepo(t)
		whole, err := backup.Copy(ctx, src, full, backup.CopyOptions{All: true})
		if err != nil {
			t.Fatal(err)
		}
		// The rerun found what the first had indexed (all but the packs
		// in flight) and moved only the rest.
		if second.ChunksPresent == 0 || second.ChunksCopied+second.ChunksPresent != whole.ChunksCopied || second.BytesCopied >= whole.BytesCopied ||
			first.ChunksCopied < second.ChunksPresent {
			t.Fatalf("encrypted %v: interrupted copy moved %d chunks, the rerun found %d and moved %d (%d bytes); a whole copy moves %d (%d bytes)",
				enc, first.ChunksCopied, second.ChunksPresent, second.ChunksCopied, second.BytesCopied, whole.ChunksCopied, whole.BytesCopied)
		}
		t.Logf("encrypted %v: interrupted at half: %d of %d chunks moved, the rerun moved %d", enc, first.ChunksCopied, whole.ChunksCopied, second.ChunksCopied)
		checkCopied(t, again, []string{x.ID}, map[string][]byte{x.ID: vol})
	}
}

// TestCopyDamagedSource: a damaged chunk in the source fails the copy of
// the image that holds it, naming the image and the chunk; the target
// lists no such image, and the other images are copied.
func TestCopyDamagedSource(t *testing.T) {
	ctx := context.Background()
	src, root := newRepo(t)
	r := rand.New(rand.NewPCG(45, 46))
	good := backupAndRestore(t, src, volumeData(r, 1<<20), backup.Options{Volume: "good"})
	vol := volumeData(r, 2<<20)
	bad := backupAndRestore(t, src, vol, backup.Options{Volume: "bad"})
	x, _ := src.Image(bad.ID)
	var victim backup.Hash
	for _, h := range x.Chunks[len(x.Chunks)/2:] {
		if h != (backup.Hash{}) {
			victim = h
			break
		}
	}
	pack, off, n := backup.BlobLocation(src, victim)
	path := filepath.Join(root, filepath.FromSlash(pack))
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// A byte of the victim chunk's bytes in its blob (plain zstd: the
	// chunks decompress, the changed one no longer matches its hash, or
	// the frame does not decode).
	b[off+n/2] ^= 0x10
	os.WriteFile(path, b, 0o600)
	dst, _ := newRepo(t)
	st, err := backup.Copy(ctx, src, dst, backup.CopyOptions{All: true})
	if err == nil || !strings.Contains(err.Error(), bad.ID) || !strings.Contains(err.Error(), "chunk ") || !strings.Contains(err.Error(), "umbra verify") {
		t.Fatalf("copy of a damaged image: %v", err)
	}
	t.Log(err)
	if !slices.Equal(results(st), []string{"copied", "failed"}) {
		t.Fatalf("results %v", results(st))
	}
	if names := backup.ObjectNames(dst, "images/"); len(names) != 1 || names[0] != "images/"+good.ID {
		t.Fatalf("the target lists %v", names)
	}
}

// TestCopyOldFormats copies from a repository an older Umbra wrote
// (format 5: 32-byte keyed hashes; one image's list as format 2 wrote
// it, one object) into a current one, which it leaves as it was.
func TestCopyOldFormats(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "old")
	set := backup.Settings{Password: "old"}
	old, err := backup.InitFormat5(ctx, dir, set)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(47, 48))
	a, b := volumeData(r, 1<<20), volumeData(r, 1<<20+8192)
	xa := backupAndRestore(t, old, a, backup.Options{Volume: "a"})
	xb := backupAndRestore(t, old, b, backup.Options{Volume: "b"})
	if err := backup.DowngradeToV2(old, xa.ID); err != nil {
		t.Fatal(err)
	}
	old.Close()
	src, err := backup.OpenWith(ctx, dir, set)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, _ := newRepo(t)
	if _, err := backup.Copy(ctx, src, dst, backup.CopyOptions{All: true}); err != nil {
		t.Fatal(err)
	}
	checkCopied(t, dst, []string{xa.ID, xb.ID}, map[string][]byte{xa.ID: a, xb.ID: b})
	if v := src.Config().Version; v != 2 {
		t.Fatalf("the source is format %d after a copy from it, was 2", v)
	}
}
