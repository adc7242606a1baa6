package backup_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"umbra/backup"
)

func openNote(t *testing.T, dir string) (*backup.Repo, string) {
	t.Helper()
	r, err := backup.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r, backup.CacheNote(r)
}

func verifyClean(t *testing.T, r *backup.Repo, images int) {
	t.Helper()
	if rep := r.Verify(); len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes)+len(rep.BadPacks)+len(rep.Unreadable) > 0 || rep.GoodImages != images {
		t.Fatalf("verify: %+v", rep)
	}
}

// TestIndexCache: the local index cache is used when it covers the
// index objects listed (those written since are added to it), and
// rebuilt from the repository when it is damaged, stale (an index
// object it covers is gone: a prune replaced them) or another
// repository's; the images restore and verify in every case.
func TestIndexCache(t *testing.T) {
	ctx := context.Background()
	repo, dir := newRepo(t)
	rnd := rand.New(rand.NewPCG(11, 12))
	a, b := volumeData(rnd, 2<<20), volumeData(rnd, 2<<20)
	xa := backupAndRestore(t, repo, a, backup.Options{Volume: "a"})
	xb := backupAndRestore(t, repo, b, backup.Options{Volume: "b"})
	path := backup.CachePath(repo)
	if path == "" || !strings.HasPrefix(path, filepath.Join(dir, "cache")+"/") {
		t.Fatalf("cache at %q, want under the repository's cache/", path)
	}
	for _, n := range backup.ObjectNames(repo, "") {
		if strings.HasPrefix(n, "cache") {
			t.Fatalf("the cache is listed as a repository object: %s", n)
		}
	}
	// Opened during the backups' repository is open: the cache
	// (written at Init) covers no index object yet; the backups' are
	// read and added to it.
	r2, note := openNote(t, dir)
	if note != "used" || backup.CacheRead(r2) == 0 {
		t.Fatalf("second open: cache %q, %d index objects read, want used and some", note, backup.CacheRead(r2))
	}
	// A repository closed after a backup writes the cache again: the
	// next open reads no index object.
	x2 := backupAndRestore(t, r2, volumeData(rnd, 1<<20), backup.Options{Volume: "c"})
	r2.Close()
	if r, note := openNote(t, dir); note != "used" || backup.CacheRead(r) != 0 {
		t.Fatalf("open after a backup's close: cache %q, %d index objects read, want none", note, backup.CacheRead(r))
	}
	r2, _ = openNote(t, dir)
	if _, err := r2.Delete(ctx, []string{x2.ID}); err != nil {
		t.Fatal(err)
	}
	backupAndRestoreCheck(t, r2, xa.ID, a)
	if _, note := openNote(t, dir); note != "used" {
		t.Fatalf("third open: cache %q", note)
	}

	// Damage: one byte of an entry page. An open reads no page (each
	// is checked when read): the damage is found by the first read of
	// that page, here verify's of all of them, which says so, reports
	// no chunk missing for it, and leaves the cache to be rebuilt by
	// the next open.
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{0xff, 0x00, 0xff}, 4096+17)
	f.Close()
	rd, note := openNote(t, dir)
	if note != "used" {
		t.Fatalf("open with a damaged page: cache %q, want used (pages are checked as read)", note)
	}
	rep := rd.Verify()
	if len(rep.BadIndexes) == 0 || !strings.Contains(strings.Join(rep.BadIndexes, "; "), "local index cache is damaged") || len(rep.BadChunks) > 0 || len(rep.BadPacks) > 0 {
		t.Fatalf("verify with a damaged cache page: %+v, want the cache named and no chunk or pack bad", rep)
	}
	rd.Close()
	r3, note := openNote(t, dir)
	if !strings.HasPrefix(note, "rebuilt: damaged") {
		t.Fatalf("open after a damaged page was read: %q, want rebuilt", note)
	}
	backupAndRestoreCheck(t, r3, xb.ID, b)
	verifyClean(t, r3, 2)
	if _, note := openNote(t, dir); note != "used" {
		t.Fatalf("open after the rebuild: cache %q", note)
	}

	// Stale: the cache of before a delete, whose index objects the
	// delete replaced.
	old, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r3.Delete(ctx, []string{xa.ID}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, old, 0o600); err != nil {
		t.Fatal(err)
	}
	r4, note := openNote(t, dir)
	if !strings.HasPrefix(note, "rebuilt: stale") {
		t.Fatalf("open with a stale cache: %q", note)
	}
	backupAndRestoreCheck(t, r4, xb.ID, b)
	verifyClean(t, r4, 1)
	if st := r4.Stats(ctx); st.Chunks == 0 {
		t.Fatalf("stats: %+v", st)
	}

	// Another repository's cache.
	other, otherDir := newRepo(t)
	backupAndRestore(t, other, volumeData(rnd, 1<<20), backup.Options{Volume: "o"})
	if _, note := openNote(t, otherDir); note != "used" {
		t.Fatal(note)
	}
	theirs, err := os.ReadFile(backup.CachePath(other))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(path, theirs, 0o600)
	r5, note := openNote(t, dir)
	if note != "rebuilt: another repository's" {
		t.Fatalf("open with another repository's cache: %q", note)
	}
	verifyClean(t, r5, 1)
}

// TestIndexCacheSlack: a repository that added few entries to a large
// index leaves the local index cache as it was when it closes (the next
// open reads the index objects written since, which are few and small)
// rather than writing all of it again; once the entries the cache lacks
// reach 1/8 of those it holds, a close writes it again.
func TestIndexCacheSlack(t *testing.T) {
	repo, dir := newRepo(t)
	rnd := rand.New(rand.NewPCG(21, 22))
	a := volumeData(rnd, 4<<20) // 1024 chunks
	backupAndRestore(t, repo, a, backup.Options{Volume: "a"})
	repo.Close()
	path := backup.CachePath(repo)
	r, note := openNote(t, dir)
	if note != "used" || backup.CacheRead(r) != 0 {
		t.Fatalf("open after the full backup: cache %q, %d index objects read", note, backup.CacheRead(r))
	}
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// A dozen new chunks: under 1/8 of the ~770 the cache holds (a
	// quarter of volumeData's chunks are zero).
	smallData := volumeData(rnd, 64<<10)
	small := backupAndRestore(t, r, smallData, backup.Options{Volume: "small"})
	r.Close()
	if after, err := os.ReadFile(path); err != nil || !bytes.Equal(after, before) {
		t.Fatalf("the cache was written again for a dozen chunks (%v)", err)
	}
	r, note = openNote(t, dir)
	if note != "used" || backup.CacheRead(r) != 1 {
		t.Fatalf("open after a small backup: cache %q, %d index objects read, want used and its one", note, backup.CacheRead(r))
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, before) {
		t.Fatal("the cache was written again at open for a dozen chunks")
	}
	backupAndRestoreCheck(t, r, small.ID, smallData)
	verifyClean(t, r, 2)
	// ~190 more: the cache now lacks over 1/8 of what it holds.
	backupAndRestore(t, r, volumeData(rnd, 1<<20), backup.Options{Volume: "big"})
	r.Close()
	if r, note := openNote(t, dir); note != "used" || backup.CacheRead(r) != 0 {
		t.Fatalf("open after enough backups: cache %q, %d index objects read, want none", note, backup.CacheRead(r))
	}
}

// TestIndexCacheTwoProcesses: two processes open one repository at the
// same time, each finding the cache behind (a backup since) and each
// backing up its own volume; the cache's lock lets one rebuild while
// the other waits, and the files each reads stay whole while the other
// replaces the cache. Afterwards every image restores and verifies.
func TestIndexCacheTwoProcesses(t *testing.T) {
	if dir := os.Getenv("UMBRA_CACHE_CHILD"); dir != "" {
		seed := uint64(len(os.Getenv("UMBRA_CACHE_SEED")))
		r, err := backup.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		src := volumeData(rand.New(rand.NewPCG(seed, 99)), 2<<20)
		x, _, err := r.Backup(context.Background(), src, backup.Options{Volume: fmt.Sprint("v", seed)})
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(os.Getenv("UMBRA_CACHE_OUT"), x.ID), nil, 0o600)
		return
	}
	repo, dir := newRepo(t)
	backupAndRestore(t, repo, volumeData(rand.New(rand.NewPCG(5, 99)), 2<<20), backup.Options{Volume: "first"})
	out := t.TempDir()
	var cmds []*exec.Cmd
	for _, seed := range []string{"x", "xx"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestIndexCacheTwoProcesses$", "-test.count=1")
		cmd.Env = append(os.Environ(), "UMBRA_CACHE_CHILD="+dir, "UMBRA_CACHE_SEED="+seed, "UMBRA_CACHE_OUT="+out)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
	}
	for _, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("child: %v", err)
		}
	}
	r, _ := openNote(t, dir)
	ids, _ := os.ReadDir(out)
	if len(ids) != 2 {
		t.Fatalf("%d images from the children, want 2", len(ids))
	}
	for _, e := range ids {
		x, err := r.Image(e.Name())
		if err != nil {
			t.Fatal(err)
		}
		seed := uint64(len("x"))
		if x.Volume == "v2" {
			seed = 2
		}
		backupAndRestoreCheck(t, r, x.ID, volumeData(rand.New(rand.NewPCG(seed, 99)), 2<<20))
	}
	verifyClean(t, r, 3)
	if _, note := openNote(t, dir); note != "used" {
		t.Fatalf("cache after both: %q", note)
	}
}

// TestIndexMemoryBounded: the heap a repository holds once its index is
// loaded does not grow with its chunks: with 256 Ki and 1 Mi chunks
// indexed it stays under 16 MiB (the chunk index held in memory took
// 52 bytes a chunk, 52 MiB for 1 Mi), the index itself being in runs on
// disk.
func TestIndexMemoryBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("writes an index of 1 Mi chunks")
	}
	ctx := context.Background()
	for _, n := range []int{256 << 10, 1 << 20} {
		repo, dir := newRepo(t)
		if err := backup.WriteFakeIndex(repo, n, 128<<10, uint64(n)); err != nil {
			t.Fatal(err)
		}
		repo.Close()
		heap := func() float64 {
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			return float64(ms.HeapInuse) / (1 << 20)
		}
		before := heap()
		r, err := backup.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		grew := heap() - before
		if st := r.Stats(ctx); st.Chunks != n {
			t.Fatalf("%d chunks indexed, want %d", st.Chunks, n)
		}
		runtime.KeepAlive(r)
		r.Close()
		t.Logf("%d chunks: heap in use grew %.1f MiB", n, grew)
		if grew > 16 {
			t.Fatalf("%d chunks indexed: the open repository holds %.1f MiB of heap, want under 16 MiB whatever the chunks", n, grew)
		}
	}
}

// filterProbe is a volume that notes the size of the chunk index's
// filter while the backup reads it.
type filterProbe struct {
	memSource
	repo  *backup.Repo
	bytes int
}

func (p *filterProbe) ReadAt(b []byte, off int64) (int, error) {
	p.bytes = max(p.bytes, backup.FilterBytes(p.repo))
	return p.memSource.ReadAt(b, off)
}

// TestIndexFilterOnlyForBackups: the chunk index's filter (which spares
// a backup a page read for most new chunks) is built by a backup whose
// lookups missed many times (not by one of a few new chunks, which
// read a page each rather than the whole index), at one size whatever
// the index holds, and dropped when it ends; opening a repository,
// restore, reads in place, verify, stats and delete build none (it was
// built at every open: 2 MiB at 1 Mi chunks, 8 MiB from 4 Mi on).
func TestIndexFilterOnlyForBackups(t *testing.T) {
	ctx := context.Background()
	rnd := rand.New(rand.NewPCG(21, 22))
	sizes := map[int]int{}
	for _, fake := range []int{0, 256 << 10} {
		repo, dir := newRepo(t)
		if fake > 0 {
			if err := backup.WriteFakeIndex(repo, fake, 128<<10, 3); err != nil {
				t.Fatal(err)
			}
		}
		a := volumeData(rnd, 1<<20)
		xa := backupAndRestore(t, repo, a, backup.Options{Volume: "a"})
		xb := backupAndRestore(t, repo, volumeData(rnd, 1<<20), backup.Options{Volume: "b"})
		repo.Close()

		r, err := backup.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(r.Close)
		none := func(what string) {
			t.Helper()
			if n, b := backup.FilterBuilds(r), backup.FilterBytes(r); n != 0 || b != 0 {
				t.Fatalf("%d chunks indexed, after %s: %d filters built, %d bytes held, want none", fake, what, n, b)
			}
		}
		none("open")
		backupAndRestoreCheck(t, r, xa.ID, a)
		none("restore")
		ir, err := r.OpenImage(ctx, xa.ID)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64<<10)
		if _, err := ir.ReadAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		none("a read in place")
		verifyClean(t, r, 2)
		none("verify")
		if st := r.Stats(ctx); st.Chunks < fake {
			t.Fatalf("stats: %d chunks, want at least %d", st.Chunks, fake)
		}
		none("stats")
		if _, err := r.Delete(ctx, []string{xb.ID}); err != nil {
			t.Fatal(err)
		}
		none("delete")

		p := &filterProbe{memSource: volumeData(rnd, 1<<20), repo: r}
		if _, _, err := r.Backup(ctx, p, backup.Options{Volume: "c"}); err != nil {
			t.Fatal(err)
		}
		none("a backup of few new chunks")
		restore := backup.SetFilterAfter(1<<40, 1) // from the second miss on
		p = &filterProbe{memSource: volumeData(rnd, 1<<20), repo: r}
		if _, _, err := r.Backup(ctx, p, backup.Options{Volume: "d"}); err != nil {
			t.Fatal(err)
		}
		restore()
		p.bytes = int(backup.FilterBuilt(r))
		if n := backup.FilterBuilds(r); n != 1 || p.bytes == 0 {
			t.Fatalf("%d chunks indexed: a backup built %d filters, held %d bytes, want one", fake, n, p.bytes)
		}
		if b := backup.FilterBytes(r); b != 0 {
			t.Fatalf("%d chunks indexed: %d bytes of filter held after the backup, want none", fake, b)
		}
		sizes[fake] = p.bytes
	}
	if sizes[0] != sizes[256<<10] {
		t.Fatalf("filter of %d bytes with a small index, %d with 256 Ki chunks more: want one size", sizes[0], sizes[256<<10])
	}
}

// TestIndexCacheOpenBounded: opening a repository reads the local index
// cache's header, page keys and metadata, not its pages (it read and
// checked all of them: ~870 MiB at 16 Mi chunks), so the bytes read do
// not grow with the index but by 8 bytes a page of it; the pages are
// checked as read, and the index still finds every chunk. A cache an
// older Umbra wrote (run version 1, no page keys) is read whole, used,
// and written again as version 2.
func TestIndexCacheOpenBounded(t *testing.T) {
	ctx := context.Background()
	const n = 256 << 10
	repo, dir := newRepo(t)
	if err := backup.WriteFakeIndex(repo, n, 128<<10, 5); err != nil {
		t.Fatal(err)
	}
	a := volumeData(rand.New(rand.NewPCG(31, 32)), 1<<20)
	xa := backupAndRestore(t, repo, a, backup.Options{Volume: "a"})
	repo.Close()
	r, note := openNote(t, dir) // the fake index objects go into the cache
	r.Close()
	fi, err := os.Stat(backup.CachePath(r))
	if err != nil {
		t.Fatal(err)
	}
	r, note = openNote(t, dir)
	read := backup.CacheOpenBytes(r)
	t.Logf("cache of %d bytes: open read %d", fi.Size(), read)
	if note != "used" || backup.CacheRead(r) != 0 {
		t.Fatalf("open: cache %q, %d index objects read, want used and none", note, backup.CacheRead(r))
	}
	if pages := fi.Size() / 4096; read > 8*4096+8*pages+64*1024 {
		t.Fatalf("open read %d bytes of a cache of %d (%d pages): want its header, keys and metadata only", read, fi.Size(), pages)
	}
	backupAndRestoreCheck(t, r, xa.ID, a)
	verifyClean(t, r, 1)
	if st := r.Stats(ctx); st.Chunks < n {
		t.Fatalf("stats: %d chunks, want at least %d", st.Chunks, n)
	}
	r.Close()

	if err := backup.RewriteCacheV1(r); err != nil {
		t.Fatal(err)
	}
	if v, err := backup.CacheVersion(r); v != 1 || err != nil {
		t.Fatalf("cache version %d, %v", v, err)
	}
	r, note = openNote(t, dir)
	if note != "used" || backup.CacheRead(r) != 0 || backup.CacheOpenBytes(r) < fi.Size()/2 {
		t.Fatalf("open of a version 1 cache: %q, %d index objects and %d bytes read, want used, none, all of it", note, backup.CacheRead(r), backup.CacheOpenBytes(r))
	}
	if v, err := backup.CacheVersion(r); v != 2 || err != nil {
		t.Fatalf("after an open, cache version %d, %v: want written again as 2", v, err)
	}
	backupAndRestoreCheck(t, r, xa.ID, a)
	verifyClean(t, r, 1)
}
