package backup_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"umbra/backup"
)

// TestRestoreLooksUpOnce: a restore looks each chunk up in the index
// once (the segment's count of uses finds where it is; reading it does
// not look again): with the index on disk, a lookup is a page read.
func TestRestoreLooksUpOnce(t *testing.T) {
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(5, 6))
	src := make(memSource, 8<<20) // 2048 distinct chunks
	for i := range src {
		src[i] = byte(r.Uint32())
	}
	x, _, err := repo.Backup(context.Background(), src, backup.Options{Volume: "v"})
	if err != nil {
		t.Fatal(err)
	}
	before := backup.IndexLookups(repo)
	out := filepath.Join(t.TempDir(), "out.img")
	if err := repo.Restore(x.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	if n, chunks := backup.IndexLookups(repo)-before, int64(len(src)/4096); n > chunks {
		t.Fatalf("restore of %d chunks made %d index lookups, want at most one a chunk", chunks, n)
	}
	if b, _ := os.ReadFile(out); !bytes.Equal(b, src) {
		t.Fatal("the restore differs from the volume")
	}
}

// TestRestorePlansAhead: a restore plans the next segment of the chunk
// list (reads it, counts its uses, looks its chunks up) while the current
// one is read, so that no core waits for planning between segments: the
// first segment's restore is held from starting until the second
// segment's plan is made. Every segment restores byte-identical, into a
// file and through a stream, each planned once in order, and a restore
// stopped by its context or by a segment that does not read says why.
func TestRestorePlansAhead(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(64))
	ctx := context.Background()
	repo, dir := newRepo(t)
	r := rand.New(rand.NewPCG(41, 42))
	src := volumeData(r, 6*64*4096+4096) // 7 segments, the last of one chunk
	for off := 3 * 64 * 4096; off < 4*64*4096; off += 4096 {
		k := r.IntN(64) * 4096 // segment 3 repeats chunks of segment 0
		copy(src[off:off+4096], src[k:k+4096])
	}
	x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})

	var (
		mu    sync.Mutex
		plans []int64
		fails []string
	)
	for _, stream := range []bool{false, true} {
		mu.Lock()
		plans = nil
		mu.Unlock()
		next := make(chan struct{})
		restore := backup.SetPlanned(func(first int64) {
			mu.Lock()
			plans = append(plans, first)
			mu.Unlock()
			if first == 64 {
				close(next)
			}
		}, func(first int64) {
			if first != 0 {
				return
			}
			select {
			case <-next:
			case <-time.After(time.Minute): // a failure only: the plan never comes
				mu.Lock()
				fails = append(fails, "segment 1 was not planned before segment 0 was restored")
				mu.Unlock()
			}
		})
		got := make([]byte, len(src))
		if stream {
			ir, err := repo.OpenImage(ctx, x.ID)
			if err != nil {
				t.Fatal(err)
			}
			err = ir.Stream(ctx, nil, func(b backup.StreamBatch) error {
				copy(got[b.First*4096:], b.Data)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		} else {
			out := filepath.Join(t.TempDir(), "out.img")
			if err := repo.Restore(x.ID, out, nil); err != nil {
				t.Fatal(err)
			}
			got, _ = os.ReadFile(out)
		}
		restore()
		if !bytes.Equal(got, src) {
			t.Fatalf("stream %v: the restore differs from the volume", stream)
		}
		mu.Lock()
		if len(fails) > 0 {
			t.Fatalf("stream %v: %s", stream, fails[0])
		}
		if want := []int64{0, 64, 128, 192, 256, 320, 384}; !slices.Equal(plans, want) {
			t.Fatalf("stream %v: segments planned %v, want each once in order %v", stream, plans, want)
		}
		mu.Unlock()
	}

	// Stopped: by its context at the first batch, and by a segment that
	// does not read (its object removed): the error says why.
	ir, err := repo.OpenImage(ctx, x.ID)
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	err = ir.Stream(cctx, nil, func(b backup.StreamBatch) error { cancel(); return nil })
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("stream cancelled at its first batch: %v", err)
	}
	segs := backup.SegmentObjects(repo, x.ID)
	if err := os.Remove(filepath.Join(dir, segs[4])); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "out.img")
	if err := repo.Restore(x.ID, out, nil); err == nil {
		t.Fatal("a restore with a list segment missing succeeded")
	} else if !strings.Contains(err.Error(), "segment") {
		t.Fatalf("a restore with a list segment missing: %v; want the segment named", err)
	}
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the failed restore left %s: %v", out, err)
	}
}

// TestRestoreNextSegmentFromOpenedBlob: a blob opened for one segment
// also gives the chunks the next segment needs of it (its plan is made
// by then), so a blob two consecutive segments need is opened once, in
// a restore into a file and in a stream. With no room kept for the next
// segment the same restore opens that blob again: the case is real.
func TestRestoreNextSegmentFromOpenedBlob(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(64))
	defer backup.SetGroupRaw(16 << 10 * 4)() // blobs of 16 chunks
	ctx := context.Background()
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(43, 44))
	src := make(memSource, 3*64*4096) // 3 segments of distinct chunks
	for i := range src {
		src[i] = byte(r.Uint32())
	}
	// Segment 1 starts with chunks 40..47 of segment 0, segment 2 with
	// chunks 8..15 of segment 1.
	copy(src[64*4096:72*4096], src[40*4096:48*4096])
	copy(src[128*4096:136*4096], src[72*4096:80*4096])
	x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})

	type key struct{ pack, off uint32 }
	run := func(stream bool) (opened map[key]int, fails []string) {
		var mu sync.Mutex
		opened = map[key]int{}
		next := map[int64]chan struct{}{64: make(chan struct{}), 128: make(chan struct{})}
		// Each segment starts once the next one is planned, as it does
		// when planning is quicker than restoring, so that the result
		// does not depend on which goroutine runs first.
		defer backup.SetPlanned(func(first int64) {
			if c, ok := next[first]; ok {
				close(c)
			}
		}, func(first int64) {
			c, ok := next[first+64]
			if !ok {
				return
			}
			select {
			case <-c:
			case <-time.After(time.Minute): // a failure only: the plan never comes
				mu.Lock()
				fails = append(fails, fmt.Sprintf("segment at %d was not planned before the one before it was restored", first+64))
				mu.Unlock()
			}
		})()
		defer backup.SetBlobOpened(func(pack, off uint32) {
			mu.Lock()
			opened[key{pack, off}]++
			mu.Unlock()
		})()
		got := make([]byte, len(src))
		if stream {
			ir, err := repo.OpenImage(ctx, x.ID)
			if err != nil {
				t.Fatal(err)
			}
			if err := ir.Stream(ctx, nil, func(b backup.StreamBatch) error {
				copy(got[b.First*4096:], b.Data)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		} else {
			out := filepath.Join(t.TempDir(), "out.img")
			if err := repo.Restore(x.ID, out, nil); err != nil {
				t.Fatal(err)
			}
			got, _ = os.ReadFile(out)
		}
		if !bytes.Equal(got, src) {
			t.Fatalf("stream %v: the restore differs from the volume", stream)
		}
		mu.Lock()
		defer mu.Unlock()
		return opened, fails
	}
	for _, stream := range []bool{false, true} {
		opened, fails := run(stream)
		if len(fails) > 0 {
			t.Fatalf("stream %v: %s", stream, fails[0])
		}
		if len(opened) < 11 {
			t.Fatalf("stream %v: %d blobs opened, want at least 11 (176 distinct chunks in blobs of 16)", stream, len(opened))
		}
		for k, n := range opened {
			if n != 1 {
				t.Errorf("stream %v: blob at %d of pack %d opened %d times, want once", stream, k.off, k.pack, n)
			}
		}
	}
	restore := backup.SetRestoreNextCache(0)
	opened, _ := run(false)
	restore()
	again := 0
	for _, n := range opened {
		again += n - 1
	}
	if again < 2 {
		t.Fatalf("with no room for the next segment %d blobs were opened again, want at least 2 (one per segment boundary)", again)
	}
}
