package backup_test

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"umbra/backup"
)

// gatedPacks holds every Put of a pack until gate is closed (storage
// that has stalled).
type gatedPacks struct {
	backup.Backend
	gate chan struct{}
}

func (g *gatedPacks) Put(ctx context.Context, name string, data []byte) error {
	if strings.HasPrefix(name, "packs/") {
		select {
		case <-g.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return g.Backend.Put(ctx, name, data)
}

// readHook is a Source calling hook before each read.
type readHook struct {
	backup.Source
	hook func(off int64, n int)
}

func (s *readHook) ReadAt(b []byte, off int64) (int, error) {
	s.hook(off, len(b))
	return s.Source.ReadAt(b, off)
}

// TestBackupWaitsForPacking: while storing packs is held up, a backup
// stops reading once the groups of new chunks compressed but not yet
// packed reach their bound (one more than the compressing workers),
// rather than read on with each group holding its compressed blob's
// buffer (a little over 4 MiB) until storage catches up: up to 256 of
// them waited before.
func TestBackupWaitsForPacking(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2)) // two compressing workers
	defer backup.SetPackEntries(1024)()             // packs of 4 MiB of chunks
	repo, _ := newRepo(t)
	const size = 128 << 20
	gate := make(chan struct{})
	var once sync.Once
	var read, readAtOpen atomic.Int64
	readAtOpen.Store(-1)
	open := func() {
		once.Do(func() {
			readAtOpen.Store(read.Load())
			close(gate)
		})
	}
	defer backup.SetBackend(repo, func(b backup.Backend) backup.Backend { return &gatedPacks{Backend: b, gate: gate} })()
	defer backup.SetSlotWait(open)()
	src := &readHook{Source: &patternSource{size: size, data: size}, hook: func(off int64, n int) {
		if read.Add(int64(n)) >= size {
			open() // read to the end while nothing could be stored
		}
	}}
	x, _, err := repo.Backup(context.Background(), src, backup.Options{Volume: "v"})
	if err != nil {
		t.Fatal(err)
	}
	// Held while storage stalls: 4 batches (three read ahead and the
	// one waiting), the groups in their slots, the uploader's packs
	// (one filling, two queued, two being stored: 4 MiB of chunks
	// each) and a pack's worth of rounding.
	const limit = (4 + 3 + 5 + 1) * 4 << 20
	if got := readAtOpen.Load(); got > limit || got >= size {
		t.Fatalf("%d MiB of %d read while no pack could be stored, want at most %d MiB", got>>20, size>>20, limit>>20)
	}
	if rep := repo.VerifyContext(context.Background(), nil); len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes) > 0 {
		t.Fatalf("verify after the stall: %+v", rep)
	}
	if x.Stats.Stored != size {
		t.Fatalf("stored %d bytes, want %d", x.Stats.Stored, size)
	}
}

// liveHeap is the heap the last collection found live, in bytes.
func liveHeap() int64 {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	return int64(s[0].Value.Uint64())
}

// TestBackupHeapBounded: a full backup to a local repository holds a
// bounded pipeline in memory, whatever the size of the volume: the
// batches read ahead, the compressed groups waiting to be packed, the
// chunks stored but not yet indexed. Packs go into their files as they
// fill: none is ever whole in memory (a pack buffer was ~21 MiB, and
// up to five of them were held).
func TestBackupHeapBounded(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2)) // two compressing workers
	defer backup.SetIndexEveryChunks(1 << 14)()     // 64 MiB of chunks stored but not yet indexed
	defer backup.SetPackEntries(4096)()             // packs of 16 MiB of chunks
	repo, dir := newRepo(t)
	const size = 128 << 20
	runtime.GC()
	base := liveHeap()
	var read, peak int64
	src := &readHook{Source: &patternSource{size: size, data: size}, hook: func(off int64, n int) {
		// Every 16 MiB: what is live now, however far each part of
		// the pipeline has come.
		if read += int64(n); read%(16<<20) == 0 {
			runtime.GC()
			peak = max(peak, liveHeap()-base)
		}
	}}
	x, _, err := repo.Backup(context.Background(), src, backup.Options{Volume: "v"})
	if err != nil {
		t.Fatal(err)
	}
	if x.Stats.Stored != size {
		t.Fatalf("stored %d bytes, want %d", x.Stats.Stored, size)
	}
	// Three batches of 4 MiB, three compressed groups' buffers of a
	// little over 4 MiB, a chunk-list segment (2 MiB) and its
	// encoding, the entries and set of 16 Ki chunks not yet indexed
	// (~2 MiB), a pack's entries (~1 MiB), the index's buffer (~1
	// MiB): ~32 MiB; and the index's filter, 8 MiB whatever the index
	// holds (it was sized by the index: 64 KiB here, but 8 MiB from 4 Mi
	// chunks on, which this bound did not show).
	const limit = 48 << 20
	t.Logf("live heap at most %.1f MiB above the open repository's", float64(peak)/(1<<20))
	if peak > limit {
		t.Fatalf("a backup of %d MiB held %.1f MiB of heap, want at most %d MiB", size>>20, float64(peak)/(1<<20), limit>>20)
	}
	// Nothing is left of the packs' files but the packs.
	filepath.WalkDir(filepath.Join(dir, "packs"), func(p string, d os.DirEntry, err error) error {
		if err == nil && strings.HasPrefix(d.Name(), ".tmp-") {
			t.Errorf("left behind: %s", p)
		}
		return nil
	})
}

// TestLocalObjectPieceByPiece: an object a local repository is given
// piece by piece (a pack as it fills) has no name until it is complete:
// nothing of one its writer abandoned (or whose process died) is left
// in the repository; committed, it is whole under its name, in a
// directory made for it, replacing an object of that name as a Put does.
func TestLocalObjectPieceByPiece(t *testing.T) {
	t.Run("unnamed", func(t *testing.T) { testLocalObject(t, true) })
	// Where a file cannot be unnamed: a temporary file, removed when
	// abandoned.
	t.Run("named", func(t *testing.T) {
		defer backup.SetNoUnnamedFiles()()
		testLocalObject(t, false)
	})
}

func testLocalObject(t *testing.T, unnamed bool) {
	repo, dir := newRepo(t)
	entries := func() []string {
		var out []string
		filepath.WalkDir(filepath.Join(dir, "packs"), func(p string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				out = append(out, p)
			}
			return nil
		})
		return out
	}
	w, _, abort, err := backup.CreateObject(repo, "packs")
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("abandoned"))
	if e := entries(); unnamed && len(e) != 0 {
		t.Fatalf("an object being written shows as %v", e)
	}
	abort()
	if e := entries(); len(e) != 0 {
		t.Fatalf("an abandoned object left %v", e)
	}
	name := "packs/ab/abcdef"
	for _, content := range []string{"first", "second"} {
		w, commit, abort, err := backup.CreateObject(repo, "packs")
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte(content[:3]))
		w.Write([]byte(content[3:]))
		if err := commit(name); err != nil {
			t.Fatal(err)
		}
		abort() // after a commit: nothing
		if b, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(name))); err != nil || string(b) != content {
			t.Fatalf("committed object reads %q, %v; want %q", b, err, content)
		}
	}
	if e := entries(); len(e) != 1 {
		t.Fatalf("left in packs/: %v, want only %s", e, name)
	}
}
