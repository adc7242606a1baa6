package backup_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"umbra/backup"
)

// syncTrace records what a local repository's Syncs made durable: the
// Sync each path was fsynced in, and the syncfs calls.
type syncTrace struct {
	mu     sync.Mutex
	round  map[string][]int64 // path → the Syncs that fsynced it
	syncfs int
	fail   error // what each fsync fails with
}

func traceSyncs(t *testing.T) *syncTrace {
	st := &syncTrace{round: map[string][]int64{}}
	t.Cleanup(backup.TraceSyncs(func(round int64, path string) error {
		st.mu.Lock()
		defer st.mu.Unlock()
		if path == "" {
			st.syncfs++
			return nil
		}
		st.round[path] = append(st.round[path], round)
		return st.fail
	}))
	return st
}

func (st *syncTrace) reset() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.round, st.syncfs = map[string][]int64{}, 0
}

// TestIncrementalSyncsItsFiles: an incremental of a few changes makes
// durable the few files it wrote and their directories, each fsynced
// once, not the whole filesystem (a syncfs waits for every process's
// writes to it: 2.2 s of a 1 Mi-chunk incremental's 3.0 s, measured
// 2026-12-07), and in the order crash safety needs: its packs before the
// index object naming them, both and its chunk list before its image
// record. A Sync with nothing new to make durable makes no system call.
func TestIncrementalSyncsItsFiles(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(256))
	ctx := context.Background()
	repo, dir := newRepo(t)
	r := rand.New(rand.NewPCG(7, 8))
	src := volumeData(r, 2048*4096)
	full := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	before := backup.ObjectNames(repo, "")
	next, bm := rewrite(r, src, 3, 300, 301, 900, 1500, 2047)
	st := traceSyncs(t)
	x, stats, err := repo.Backup(ctx, next, backup.Options{Volume: "v", Parent: full, Changed: bm})
	if err != nil {
		t.Fatal(err)
	}
	if !stats.Incremental {
		t.Fatalf("not incremental: %s", stats.WhyFull)
	}
	backupAndRestoreCheck(t, repo, x.ID, next)
	if st.syncfs > 0 {
		t.Errorf("the incremental synced the whole filesystem %d times", st.syncfs)
	}
	var written []string
	for _, n := range backup.ObjectNames(repo, "") {
		if !slices.Contains(before, n) {
			written = append(written, n)
		}
	}
	last := func(prefix string, max bool) int64 {
		var out int64 = -1
		for _, n := range written {
			if !strings.HasPrefix(n, prefix) {
				continue
			}
			rs := st.round[filepath.Join(dir, n)]
			if len(rs) == 0 {
				return -1
			}
			if out < 0 || max && rs[0] > out || !max && rs[0] < out {
				out = rs[0]
			}
		}
		return out
	}
	for _, n := range written {
		p := filepath.Join(dir, n)
		if rs := st.round[p]; len(rs) != 1 {
			t.Errorf("%s fsynced in Syncs %v, want once", n, rs)
		}
		if len(st.round[filepath.Dir(p)]) == 0 {
			t.Errorf("%s's directory never fsynced", n)
		}
	}
	packs, index, lists, image := last("packs/", true), last("index/", true), last("segments/", true), last("images/", true)
	if packs < 0 || index < 0 || lists < 0 || image < 0 {
		t.Fatalf("new objects %v; Syncs of the last pack %d, index %d, segment %d, image %d", written, packs, index, lists, image)
	}
	if firstIndex := last("index/", false); packs >= firstIndex || index >= image || lists >= image {
		t.Errorf("durable in Syncs: packs by %d, index from %d to %d, chunk list by %d, image record in %d: want packs, index, record in that order",
			packs, firstIndex, index, lists, image)
	}
	// Nothing new: nothing to wait for.
	st.reset()
	if err := backup.SyncRepo(repo); err != nil {
		t.Fatal(err)
	}
	if len(st.round) > 0 || st.syncfs > 0 {
		t.Errorf("a Sync with nothing written fsynced %d paths and synced the filesystem %d times", len(st.round), st.syncfs)
	}
}

// TestSyncManyFiles: a Sync after many files were written (a full
// backup's packs) is one syncfs, not an fsync of each.
func TestSyncManyFiles(t *testing.T) {
	defer backup.SetSyncFilesMax(4)()
	defer backup.SetSmallPacks(64<<10, 1000)()
	repo, _ := newRepo(t)
	st := traceSyncs(t)
	src := volumeData(rand.New(rand.NewPCG(9, 10)), 1024*4096)
	backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	if st.syncfs == 0 {
		t.Errorf("a backup of %d packs synced no filesystem", len(backup.ObjectNames(repo, "packs/")))
	}
}

// TestSyncFailed: a Sync whose fsync of a file fails says so, and the
// next one makes everything durable again (a syncfs), not only what was
// written since.
func TestSyncFailed(t *testing.T) {
	repo, _ := newRepo(t)
	st := traceSyncs(t)
	src := volumeData(rand.New(rand.NewPCG(11, 12)), 64*4096)
	st.fail = errors.New("injected")
	if _, _, err := repo.Backup(context.Background(), src, backup.Options{Volume: "v"}); err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("a backup whose files could not be made durable: %v", err)
	}
	st.fail = nil
	st.reset()
	if err := backup.SyncRepo(repo); err != nil {
		t.Fatal(err)
	}
	if st.syncfs != 1 {
		t.Errorf("the Sync after a failed one synced the filesystem %d times (and %d paths), want once", st.syncfs, len(st.round))
	}
}
