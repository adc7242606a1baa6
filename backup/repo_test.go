package backup_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"umbra/backup"
	"umbra/provider"
)

func init() { backup.SetScryptN(1 << 10) }

// memSource is a volume in memory.
type memSource []byte

func (m memSource) ReadAt(p []byte, off int64) (int, error) { return copy(p, m[off:]), nil }
func (m memSource) Size() int64                             { return int64(len(m)) }

// volumeData makes a volume image with text-like (compressible), random
// and zero regions, so compression, dedup and zero detection all matter.
func volumeData(r *rand.Rand, size int) memSource {
	b := make([]byte, size)
	words := []string{"umbra ", "shadow ", "copy ", "volume ", "snapshot ", "block "}
	for off := 0; off+4096 <= size; off += 4096 {
		switch r.IntN(4) {
		case 0: // zero
		case 1:
			for i := off; i < off+4096; i++ {
				b[i] = byte(r.Uint32())
			}
		default:
			var s strings.Builder
			for s.Len() < 4096 {
				s.WriteString(words[r.IntN(len(words))])
			}
			copy(b[off:off+4096], s.String())
		}
	}
	return b
}

// newRepo makes an unencrypted repository in a new directory, closed at
// the end of the test.
// rewrite returns a copy of src with the 4 KiB blocks blks filled with
// random bytes, and the change bitmap that marks them.
func rewrite(r *rand.Rand, src memSource, blks ...int) (memSource, *provider.Bitmap) {
	next := slices.Clone(src)
	bm := &provider.Bitmap{Granule: 4096, Size: int64(len(src))}
	bm.Bits = make([]uint64, (len(src)/4096+63)/64)
	for _, blk := range blks {
		for j := blk * 4096; j < blk*4096+4096; j++ {
			next[j] = byte(r.Uint32())
		}
		bm.Bits[blk/64] |= 1 << (blk % 64)
	}
	return next, bm
}

func newRepo(t *testing.T) (*backup.Repo, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "repo")
	repo, err := backup.Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { repo.Close() })
	return repo, dir
}

func backupAndRestore(t *testing.T, repo *backup.Repo, src memSource, opts backup.Options) *backup.Image {
	t.Helper()
	x, _, err := repo.Backup(context.Background(), src, opts)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "out.img")
	if err := repo.Restore(x.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, src) {
		t.Fatalf("image %s does not restore byte-identical", x.ID)
	}
	return x
}

func TestEncryptedRepository(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "repo")
	repo, err := backup.InitWith(ctx, dir, backup.Settings{Password: "correct horse"})
	if err != nil {
		t.Fatal(err)
	}
	src := volumeData(rand.New(rand.NewPCG(3, 4)), 4<<20)
	backupAndRestore(t, repo, src, backup.Options{Volume: "secret-vol"})
	repo.Close()

	// Nothing readable leaks: not the text, not the volume's name, not
	// the plain hash of a chunk.
	plainHash := sha256.Sum256(src[:4096])
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if fi == nil || fi.IsDir() || strings.HasSuffix(p, "config") || strings.Contains(p, "keys") {
			return nil
		}
		b, _ := os.ReadFile(p)
		if bytes.Contains(b, []byte("snapshot shadow")) || bytes.Contains(b, []byte("shadow copy")) || bytes.Contains(b, []byte("secret-vol")) || bytes.Contains(b, plainHash[:8]) {
			t.Errorf("%s holds plaintext", p)
		}
		return nil
	})
	if _, err := backup.OpenWith(ctx, dir, backup.Settings{Password: "wrong"}); !errors.Is(err, backup.ErrWrongPassword) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("open with a wrong password: %v", err)
	}
	if _, err := backup.Open(dir); !errors.Is(err, backup.ErrNeedPassword) {
		t.Fatalf("open without a password: %v", err)
	}
	repo, err = backup.OpenWith(ctx, dir, backup.Settings{Password: "correct horse"})
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	if rep := repo.Verify(); rep.GoodImages != 1 || len(rep.BadChunks) > 0 {
		t.Fatalf("verify: %+v", rep)
	}
}

func TestLocks(t *testing.T) {
	ctx := context.Background()
	repo, dir := newRepo(t)
	other, _ := backup.Open(dir)
	defer other.Close()
	src := volumeData(rand.New(rand.NewPCG(5, 6)), 1<<20)

	unlock, err := other.Lock(ctx, "prune", true)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = repo.Backup(ctx, src, backup.Options{Volume: "v"})
	if !errors.Is(err, backup.ErrLocked) || !strings.Contains(err.Error(), `"prune"`) || !strings.Contains(err.Error(), "umbra repo unlock") {
		t.Fatalf("backup into a repository locked by prune: %v", err)
	}
	unlock()

	// Shared locks coexist; an exclusive one waits for them.
	u1, err := other.Lock(ctx, "backup a", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"}); err != nil {
		t.Fatalf("two backups at once: %v", err)
	}
	if _, err := repo.Prune(ctx, backup.Policy{Last: 1}, false); !errors.Is(err, backup.ErrLocked) {
		t.Fatalf("prune during a backup: %v", err)
	}
	u1()

	// A lock whose process is gone (kill -9) is stale and removed.
	os.WriteFile(filepath.Join(dir, "locks", "deadbeef"), []byte(`{"host":"`+hostname()+`","pid":999999999,"op":"backup x","exclusive":true,"created":"2026-01-01T00:00:00Z","refreshed":"`+time.Now().UTC().Format(time.RFC3339)+`"}`), 0o600)
	if _, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"}); err != nil {
		t.Fatalf("backup after a dead process's lock: %v", err)
	}
	if n := backup.ObjectNames(repo, "locks/"); len(n) != 0 {
		t.Fatalf("locks left behind: %v", n)
	}
}

func hostname() string { h, _ := os.Hostname(); return h }

func TestPolicySelect(t *testing.T) {
	base := time.Date(2026, 3, 1, 0, 0, 0, 0, time.Local)
	var imgs []*backup.Image
	// One image every 6 hours for 60 days.
	for i := 0; i < 240; i++ {
		imgs = append(imgs, &backup.Image{ID: "v-" + time.Duration(i).String(), Volume: "v", Created: base.Add(time.Duration(i) * 6 * time.Hour)})
	}
	imgs = append(imgs, &backup.Image{ID: "w-1", Volume: "w", Created: base})
	for _, tc := range []struct {
		p    backup.Policy
		want int
	}{
		{backup.Policy{Last: 3}, 3 + 1},
		{backup.Policy{Daily: 7}, 7 + 1},
		{backup.Policy{Weekly: 4}, 4 + 1},
		{backup.Policy{Monthly: 12}, 2 + 1},        // March and April
		{backup.Policy{Last: 2, Daily: 3}, 4 + 1},  // the newest 2 share a day
		{backup.Policy{Hourly: 5, Last: 1}, 5 + 1}, // every image is its own hour
		{backup.Policy{Daily: 1000}, 60 + 1},       // cannot keep more than exist
	} {
		keep, remove := tc.p.Select(imgs)
		if len(keep) != tc.want || len(keep)+len(remove) != len(imgs) {
			t.Errorf("%+v: kept %d, want %d", tc.p, len(keep), tc.want)
		}
		if !slices.Contains(keep, imgs[len(imgs)-2]) || !slices.Contains(keep, imgs[len(imgs)-1]) {
			t.Errorf("%+v: the newest image of a volume was not kept", tc.p)
		}
	}
}

// TestPrune: images under a changing volume, prune keeps the last few;
// the kept ones restore, verify is clean, space shrinks, and what was
// removed is gone; a second prune finds nothing to do. With 16 KiB
// groups some blobs stay wholly live (copied as they are) and the live
// chunks of partly dead ones fill several new blobs; the default 1 MiB
// groups make fewer, larger blobs.
func TestPrune(t *testing.T) {
	for _, group := range []int{16 << 10, 0} {
		t.Run(fmt.Sprintf("group=%dK", group>>10), func(t *testing.T) {
			if group > 0 {
				defer backup.SetGroupRaw(group)()
			}
			testPrune(t)
		})
	}
}

func testPrune(t *testing.T) {
	ctx := context.Background()
	repo, dir := newRepo(t)
	r := rand.New(rand.NewPCG(7, 8))
	src := volumeData(r, 4<<20)
	var wants []memSource
	var ids []string
	for k := 0; k < 6; k++ {
		// Rewrite a quarter of the volume with new random data each time.
		for i := 0; i < 256; i++ {
			off := r.IntN(len(src)/4096) * 4096
			for j := off; j < off+4096; j++ {
				src[j] = byte(r.Uint32())
			}
		}
		x, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, x.ID)
		wants = append(wants, slices.Clone(src))
	}
	before := repo.Stats(ctx)
	if _, err := repo.Prune(ctx, backup.Policy{}, false); !errors.Is(err, backup.ErrNoPolicy) {
		t.Fatalf("prune without a policy: %v", err)
	}
	rep, err := repo.Prune(ctx, backup.Policy{Last: 2}, true)
	if err != nil || len(rep.Removed) != 4 || len(backup.ObjectNames(repo, "images/")) != 6 {
		t.Fatalf("dry run: %+v %v", rep, err)
	}
	rep, err = repo.Prune(ctx, backup.Policy{Last: 2}, false)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.Kept, ids[4:]) || rep.PacksDeleted == 0 {
		t.Fatalf("prune: %+v", rep)
	}
	after := repo.Stats(ctx)
	if after.StoredBytes >= before.StoredBytes || after.Images != 2 {
		t.Fatalf("prune freed nothing: before %+v after %+v", before, after)
	}
	for _, reopen := range []bool{false, true} {
		if reopen {
			repo.Close()
			if repo, err = backup.Open(dir); err != nil {
				t.Fatal(err)
			}
		}
		for k := 4; k < 6; k++ {
			out := filepath.Join(t.TempDir(), "out.img")
			if err := repo.Restore(ids[k], out, nil); err != nil {
				t.Fatal(err)
			}
			got, _ := os.ReadFile(out)
			if !bytes.Equal(got, wants[k]) {
				t.Fatalf("kept image %d changed by prune", k)
			}
		}
		if v := repo.Verify(); v.GoodImages != 2 || len(v.BadChunks)+len(v.BadImages)+len(v.BadIndexes) > 0 {
			t.Fatalf("verify after prune: %+v", v)
		}
	}
	if _, err := repo.Image(ids[0]); err == nil {
		t.Fatal("a removed image is still readable")
	}
	if n := backup.ObjectNames(repo, "index/"); len(n) != 1 {
		t.Fatalf("prune left %d index objects, want 1", len(n))
	}
	rep, err = repo.Prune(ctx, backup.Policy{Last: 2}, false)
	if err != nil || len(rep.Removed) != 0 || rep.PacksDeleted != 0 || rep.PacksRepacked != 0 {
		t.Fatalf("second prune: %+v %v", rep, err)
	}
	// A new backup dedups against what prune kept.
	_, st, err := repo.Backup(ctx, src, backup.Options{Volume: "v"})
	if err != nil || st.Stored != 0 {
		t.Fatalf("backup of unchanged data after prune stored %d bytes (%v)", st.Stored, err)
	}
}

// TestHoles: a sparse file's holes are neither read nor stored.
func TestHoles(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	repo, err := backup.Init(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	p := filepath.Join(dir, "sparse.img")
	f, _ := os.Create(p)
	defer f.Close()
	f.Truncate(64 << 20)
	data := bytes.Repeat([]byte("data"), 1024*64) // 256 KiB
	f.WriteAt(data, 10<<20)
	f.WriteAt(data[:100], 40<<20+17)
	fi := fileSource{f}
	alloc, calls := backup.FileAllocation(f), 0
	counted := func(off, n int64) ([]backup.Range, error) { calls++; return alloc(off, n) }
	x, st, err := repo.Backup(ctx, fi, backup.Options{Volume: "sparse", Allocated: counted})
	if err != nil {
		t.Fatal(err)
	}
	if st.Read > 1<<20 || st.Unallocated < 62<<20 {
		t.Fatalf("read %d bytes of a 64 MiB file with 256 KiB of data (unallocated %d)", st.Read, st.Unallocated)
	}
	// One question about the whole 64 MiB, not one per 4 MiB batch
	// (SEEK_HOLE walks a run of data to its end each time).
	if calls != 1 {
		t.Fatalf("the allocation of a 64 MiB volume was asked for %d times, want once", calls)
	}
	out := filepath.Join(dir, "out.img")
	if err := repo.Restore(x.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(p)
	b, _ := os.ReadFile(out)
	if !bytes.Equal(a, b) {
		t.Fatal("sparse image does not restore byte-identical")
	}
}

// TestRestoreChunkCache: a full image whose second half repeats chunks of
// the first (deduplicated: their blobs are opened for the first half and
// the chunks kept for the second) and an incremental whose changed chunks
// share blobs across the whole volume restore byte-identical with the
// chunk cache at its default size, with room for a few chunks only (the
// rest: blobs opened again) and with none.
func TestRestoreChunkCache(t *testing.T) {
	r := rand.New(rand.NewPCG(13, 14))
	src := volumeData(r, 16<<20)
	for off := 8 << 20; off < len(src); off += 4096 {
		k := r.IntN(8<<20/4096) * 4096
		copy(src[off:off+4096], src[k:k+4096])
	}
	var blks []int
	for range 300 {
		blks = append(blks, r.IntN(len(src)/4096))
	}
	changed, bm := rewrite(r, src, blks...)
	for _, cache := range []int64{0, 3 * 4096, 64 << 20} {
		t.Run(fmt.Sprintf("cache=%d", cache), func(t *testing.T) {
			if cache != 64<<20 {
				defer backup.SetRestoreCache(cache)()
			}
			repo, _ := newRepo(t)
			full := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
			backupAndRestore(t, repo, changed, backup.Options{Volume: "v", Parent: full, Changed: bm})
		})
	}
}

// TestSharedSegments: an incremental whose changes fall in one segment of
// the chunk list stores a patch of that segment only and names the
// parent's segments; deleting the parent keeps what the incremental
// still uses and drops the rest; an identical volume backed up under
// another name stores only the segment the incremental holds as a patch.
func TestSharedSegments(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(64))
	ctx := context.Background()
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(17, 18))
	src := volumeData(r, 8*64*4096) // 8 segments
	full := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	next, bm := rewrite(r, src, 2*64+5, 2*64+40) // both in segment 2
	incr := backupAndRestore(t, repo, next, backup.Options{Volume: "v", Parent: full, Changed: bm})
	fs, is := backup.SegmentObjects(repo, full.ID), backup.SegmentObjects(repo, incr.ID)
	var shared int
	for _, n := range is {
		if slices.Contains(fs, n) {
			shared++
		}
	}
	if len(is) != 9 || shared != 8 || len(backup.PatchObjects(repo, incr.ID)) != 1 || len(backup.ObjectNames(repo, "segments/")) != 9 {
		t.Fatalf("incremental has %d list objects (%d patches), %d shared with its parent, %d stored; want 9 (1), 8, 9", len(is), len(backup.PatchObjects(repo, incr.ID)), shared, len(backup.ObjectNames(repo, "segments/")))
	}
	if incr.Stats.Index > full.Stats.Index/2 {
		t.Fatalf("the incremental stored %d bytes of list and index, the full %d", incr.Stats.Index, full.Stats.Index)
	}
	other := backupAndRestore(t, repo, next, backup.Options{Volume: "w"})
	if other.Stats.Stored != 0 || len(backup.ObjectNames(repo, "segments/")) != 10 {
		t.Fatalf("an identical volume stored %d new bytes, %d list objects in all", other.Stats.Stored, len(backup.ObjectNames(repo, "segments/")))
	}
	if st := repo.Stats(ctx); st.ListSegments != 24 || st.ListObjects != 10 || st.Format != 8 {
		t.Fatalf("stats: %d list segments in %d objects, format %d; want 24 in 10, format 8", st.ListSegments, st.ListObjects, st.Format)
	}
	if _, err := repo.Delete(ctx, []string{full.ID}); err != nil {
		t.Fatal(err)
	}
	if got, want := backup.ObjectNames(repo, "segments/"), backup.SegmentObjects(repo, incr.ID, other.ID); !slices.Equal(got, want) || len(got) != 10 {
		t.Fatalf("after deleting the full image, segments %v, want the remaining images' %v (10)", got, want)
	}
	out := filepath.Join(t.TempDir(), "out.img")
	if err := repo.Restore(incr.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); !bytes.Equal(b, next) {
		t.Fatal("the incremental restores wrong after its parent was deleted")
	}
	if v := repo.Verify(); v.GoodImages != 2 || len(v.BadImages) > 0 {
		t.Fatalf("verify: %+v", v)
	}
}

// TestUnchangedSegmentsPassThrough: with segments a whole number of
// batches, an incremental names its parent's unchanged segments without
// reading them (nor the volume there): only the changed segment of the
// parent is read, and the image restores.
func TestUnchangedSegmentsPassThrough(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(1024)) // one 4 MiB batch
	ctx := context.Background()
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(19, 20))
	src := volumeData(r, 4*1024*4096) // 4 segments
	full := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	// 100 chunks of segment 2: more than a patch built from the changes
	// alone may hold (1/16 of the segment), so the parent's segment 2 is
	// read (TestIncrementalReadsChangesOnly has the lightly changed case).
	var blks []int
	for i := range 100 {
		blks = append(blks, 2*1024+7+i*9)
	}
	next, bm := rewrite(r, src, blks...)
	gets := backup.CountGets(repo, "segments/")
	incr, st, err := repo.Backup(ctx, next, backup.Options{Volume: "v", Parent: full, Changed: bm})
	if err != nil {
		t.Fatal(err)
	}
	// Segment 0 once (the parent is checked readable), segment 2 once.
	if n := gets(); n != 2 || st.Read != 100*4096 || st.Reused != int64(len(src))-100*4096 {
		t.Fatalf("incremental read %d parent segments, %d bytes, reused %d", n, st.Read, st.Reused)
	}
	fs, is := backup.SegmentObjects(repo, full.ID), backup.SegmentObjects(repo, incr.ID)
	if shared := len(is) - len(slices.DeleteFunc(slices.Clone(is), func(n string) bool { return slices.Contains(fs, n) })); shared != 3 || len(is) != 4 {
		t.Fatalf("%d of %d list objects shared with the parent, want 3 of 4 (the heavily changed segment written whole)", shared, len(is))
	}
	out := filepath.Join(t.TempDir(), "out.img")
	if err := repo.Restore(incr.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); !bytes.Equal(b, next) {
		t.Fatal("the incremental restores wrong")
	}
}

type fileSource struct{ *os.File }

func (f fileSource) Size() int64 { fi, _ := f.Stat(); return fi.Size() }

// TestImageReader reads an image in place at odd offsets: with chunk
// lists of one segment and of many, and with 16 KiB blobs of which the
// reader keeps at most two opened (so it evicts and reopens them).
func TestImageReader(t *testing.T) {
	for _, seg := range []int64{0, 3} {
		t.Run(fmt.Sprint("segment=", seg), func(t *testing.T) {
			if seg > 0 {
				defer backup.SetSegmentChunks(backup.SetSegmentChunks(seg))
			}
			imageReader(t)
		})
	}
	t.Run("evicting", func(t *testing.T) {
		defer backup.SetGroupRaw(16 << 10)()
		defer backup.SetReaderCache(40 << 10)()
		imageReader(t)
	})
}

func imageReader(t *testing.T) {
	ctx := context.Background()
	repo, err := backup.Init(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	src := volumeData(rand.New(rand.NewPCG(9, 10)), 1<<20+1234)
	x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	ir, err := repo.OpenImage(ctx, x.ID)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 1))
	for i := 0; i < 200; i++ {
		off := r.Int64N(int64(len(src)))
		n := min(r.Int64N(20000), int64(len(src))-off)
		got := make([]byte, n)
		if _, err := ir.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, src[off:off+n]) {
			t.Fatalf("ReadAt(%d, %d) differs", off, n)
		}
	}
}

func TestChunkSizes(t *testing.T) {
	ctx := context.Background()
	src := volumeData(rand.New(rand.NewPCG(11, 12)), 3<<20+4096)
	for _, cs := range []int{4096, 16384, 65536, 262144} {
		repo, err := backup.InitWith(ctx, filepath.Join(t.TempDir(), "repo"), backup.Settings{ChunkSize: cs, Hash: "sha256"})
		if err != nil {
			t.Fatal(err)
		}
		backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
		repo.Close()
	}
	if _, err := backup.InitWith(ctx, filepath.Join(t.TempDir(), "r"), backup.Settings{ChunkSize: 5000}); err == nil || !strings.Contains(err.Error(), "chunk size 5000") {
		t.Fatalf("a bad chunk size: %v", err)
	}
}

// TestFormat2Repository: a repository written by format 2 (one chunk
// list object per image) still lists, restores, mounts and verifies; an
// incremental image on top of a format-2 parent is written in segments
// and moves the repository to format 3.
func TestFormat2Repository(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(5))
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "repo")
	repo, err := backup.Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	src := volumeData(rand.New(rand.NewPCG(3, 4)), 200<<10+100)
	old := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	if err := backup.DowngradeToV2(repo, old.ID); err != nil {
		t.Fatal(err)
	}
	repo.Close()
	repo, err = backup.Open(dir)
	if err != nil {
		t.Fatalf("open a format-2 repository: %v", err)
	}
	defer repo.Close()
	if v := repo.Config().Version; v != 2 {
		t.Fatalf("version %d after the downgrade", v)
	}
	parent, err := repo.Image(old.ID)
	if err != nil || parent.Segments != nil {
		t.Fatalf("format-2 image: %v (segments %d)", err, len(parent.Segments))
	}
	ir, err := repo.OpenImage(ctx, old.ID)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(src))
	if _, err := ir.ReadAt(got, 0); err != nil || !bytes.Equal(got, src) {
		t.Fatalf("format-2 image reads wrong: %v", err)
	}
	// Change chunks 3 and 30, then an incremental image on the old parent.
	next := append(memSource(nil), src...)
	next[3*4096] ^= 1
	next[30*4096+7] ^= 1
	changed := &provider.Bitmap{Granule: 4096, Size: int64(len(src)), Bits: make([]uint64, 1)}
	changed.Bits[0] = 1<<3 | 1<<30
	x := backupAndRestore(t, repo, next, backup.Options{Volume: "v", Parent: parent, Changed: changed})
	if x.Parent != old.ID || len(x.Segments) != (len(src)/4096+1+4)/5 {
		t.Fatalf("incremental on a format-2 parent: parent %q, %d segments", x.Parent, len(x.Segments))
	}
	if v := repo.Config().Version; v != 8 {
		t.Fatalf("repository still version %d after a segmented image", v)
	}
	if rep := repo.Verify(); rep.GoodImages != 2 || len(rep.BadImages) > 0 {
		t.Fatalf("verify a mixed repository: %+v", rep)
	}
	out := filepath.Join(t.TempDir(), "old.img")
	if err := repo.Restore(old.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); !bytes.Equal(b, src) {
		t.Fatal("format-2 image restores wrong")
	}
	// Prune the old image: its list object goes, the new image stays whole.
	if _, err := repo.Prune(ctx, backup.Policy{Last: 1}, false); err != nil {
		t.Fatal(err)
	}
	if names := backup.ObjectNames(repo, "lists/"); len(names) != 0 || !slices.Equal(backup.ObjectNames(repo, "segments/"), backup.SegmentObjects(repo, x.ID)) {
		t.Fatalf("after pruning the format-2 image, lists/ holds %v", names)
	}
	if err := repo.Restore(x.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); !bytes.Equal(b, next) {
		t.Fatal("incremental image restores wrong after the prune")
	}
}

// TestIndexAsItGoes: a backup writes index objects as its packs are
// stored, not one at the end, and forgets the chunks it indexed; a chunk
// seen again later in the same backup is then found in the repository's
// index and stored once.
func TestIndexAsItGoes(t *testing.T) {
	defer backup.SetSmallPacks(256<<10, 2)()
	defer backup.SetGroupRaw(64 << 10)() // blobs well under a pack
	repo, err := backup.Init(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	half := volumeData(rand.New(rand.NewPCG(7, 8)), 20<<20)
	for i := range half {
		half[i] ^= byte(i * 131) // incompressible enough to fill many packs
	}
	src := append(append(memSource(nil), half...), half...) // the second half repeats the first
	x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	if n := len(backup.ObjectNames(repo, "index/")); n < 3 {
		t.Fatalf("%d index objects for %d MiB of new data in 256 KiB packs", n, len(half)>>20)
	}
	if x.Stats.Stored > int64(len(half))+1<<20 || x.Stats.Dedup < int64(len(half))-1<<20 {
		t.Fatalf("the repeated half was not found again: stored %d, deduplicated %d of %d", x.Stats.Stored, x.Stats.Dedup, len(src))
	}
	if rep := repo.Verify(); rep.GoodImages != 1 || len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes) > 0 {
		t.Fatalf("verify: %+v", rep)
	}
}

// TestChunkHashLengths: a new encrypted repository names chunks by 16
// bytes of their keyed hash — segments named by 32 hex digits, about
// half the list and index bytes of a format-5 encrypted repository (32
// bytes) for the same images — and both kinds back up, restore, verify
// and prune; the format-5 one is upgraded to format 8 and keeps its
// 32-byte names.
func TestChunkHashLengths(t *testing.T) {
	ctx := context.Background()
	r := rand.New(rand.NewPCG(21, 22))
	src := volumeData(r, 3<<20)
	next := append(memSource(nil), src...)
	for _, at := range []int{5, 300, 700} {
		next[at*4096+9] ^= 0xff
	}
	set := backup.Settings{Password: "pw"}
	var index [2]int64
	for i, init := range []func(context.Context, string, backup.Settings) (*backup.Repo, error){backup.InitWith, backup.InitFormat5} {
		dir := filepath.Join(t.TempDir(), "repo")
		repo, err := init(ctx, dir, set)
		if err != nil {
			t.Fatal(err)
		}
		want, wantLen := 16, 32 // bytes a hash, hex digits a segment name
		if i == 1 {
			want, wantLen = 0, 64
		}
		full := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
		index[i] = full.Stats.Index
		changed := &provider.Bitmap{Granule: 4096, Size: int64(len(src)), Bits: make([]uint64, (len(src)/4096+63)/64)}
		for _, at := range []int{5, 300, 700} {
			changed.Bits[at/64] |= 1 << (at % 64)
		}
		incr := backupAndRestore(t, repo, next, backup.Options{Volume: "v", Parent: full, Changed: changed})
		if c := repo.Config(); c.HashBytes != want || c.Version != 8 {
			t.Fatalf("repository %d: hash_bytes %d, format %d; want %d, 8", i, c.HashBytes, c.Version, want)
		}
		for _, n := range backup.ObjectNames(repo, "segments/") {
			if l := len(n[strings.LastIndex(n, "/")+1:]); l != wantLen {
				t.Fatalf("repository %d: segment %s named by %d hex digits, want %d", i, n, l, wantLen)
			}
		}
		repo.Close()
		repo, err = backup.OpenWith(ctx, dir, set)
		if err != nil {
			t.Fatal(err)
		}
		if rep := repo.Verify(); rep.GoodImages != 2 || len(rep.BadChunks) > 0 || len(rep.BadImages) > 0 {
			t.Fatalf("repository %d: verify: %+v", i, rep)
		}
		if _, err := repo.Prune(ctx, backup.Policy{Last: 1}, false); err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(t.TempDir(), "out.img")
		if err := repo.Restore(incr.ID, out, nil); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(out); !bytes.Equal(b, next) {
			t.Fatalf("repository %d: the incremental restores wrong after prune", i)
		}
		if rep := repo.Verify(); rep.GoodImages != 1 || len(rep.BadChunks) > 0 {
			t.Fatalf("repository %d: verify after prune: %+v", i, rep)
		}
		repo.Close()
	}
	if index[0] > index[1]*6/10 {
		t.Fatalf("list and index of a full image: %d bytes with 16-byte hashes, %d with 32", index[0], index[1])
	}
}
