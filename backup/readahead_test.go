package backup_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"umbra/backup"
)

// gateSource holds the first read in [0, gateEnd) until a read at or
// past gateEnd began: a backup that reads segments one after another
// never gets there (the test fails after a minute instead of hanging).
type gateSource struct {
	memSource
	gateEnd int64
	once    sync.Once
	later   chan struct{} // closed by the first read past gateEnd
	laterMu sync.Once
	waited  atomic.Bool
	failed  atomic.Bool
}

func (g *gateSource) ReadAt(p []byte, off int64) (int, error) {
	if off >= g.gateEnd {
		g.laterMu.Do(func() { close(g.later) })
	} else {
		g.once.Do(func() {
			select {
			case <-g.later:
				g.waited.Store(true)
			case <-time.After(time.Minute):
				g.failed.Store(true)
			}
		})
	}
	return g.memSource.ReadAt(p, off)
}

// TestIncrementalReadsSegmentsAtOnce: an incremental's changed chunks of
// several segments are read at once (the first segment's read waits for
// a later segment's to begin), in a bounded number of batch buffers
// (readers + 1 however far the others could run ahead), and the image
// is the one read one segment after another: the same segments and
// patches in the same order, restoring to the volume. A chunk written in
// three segments is stored once, also when index objects are written
// between them (a reader may have looked it up before).
func TestIncrementalReadsSegmentsAtOnce(t *testing.T) {
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(1024)) // one 4 MiB batch a segment
	defer backup.SetIncrementalIndexEveryChunks(8)()
	defer backup.SetSmallPacks(64<<10, 1)() // index objects as the backup goes
	defer backup.SetGroupRaw(16 << 10)()
	ctx := context.Background()
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(7, 8))
	const segs = 8
	src := volumeData(r, segs*1024*4096)
	parent := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
	var blks []int
	for s := range segs {
		for i := range 20 {
			blks = append(blks, s*1024+i*50+s)
		}
	}
	next, bm := rewrite(r, src, blks...)
	// Segments 2 and 6 get a chunk the same as segment 0's first new one.
	copy(next[(2*1024+3)*4096:(2*1024+4)*4096], next[blks[0]*4096:(blks[0]+1)*4096])
	copy(next[(6*1024+3)*4096:(6*1024+4)*4096], next[blks[0]*4096:(blks[0]+1)*4096])
	for _, c := range []int{2*1024 + 3, 6*1024 + 3} {
		bm.Bits[c/64] |= 1 << (c % 64)
	}

	const readers = 3
	var most atomic.Int64
	restore := backup.SetReadWorkers(readers, func(n int) {
		for m := most.Load(); int64(n) > m && !most.CompareAndSwap(m, int64(n)); m = most.Load() {
		}
	})
	g := &gateSource{memSource: next, gateEnd: 1024 * 4096, later: make(chan struct{})}
	x, st, err := repo.Backup(ctx, g, backup.Options{Volume: "v", Parent: parent, Changed: bm})
	restore()
	if err != nil {
		t.Fatal(err)
	}
	if g.failed.Load() || !g.waited.Load() {
		t.Fatalf("the first segment's changed chunks were read before any later segment's began (read one after another)")
	}
	if m := most.Load(); m < 2 || m > readers+1 {
		t.Fatalf("%d batch buffers out at most, want 2 to %d (readers + 1)", m, readers+1)
	}
	if !st.Incremental || st.Read != int64(len(blks)+2)*4096 {
		t.Fatalf("incremental %v, read %d bytes, want %d", st.Incremental, st.Read, (len(blks)+2)*4096)
	}
	if want := int64(len(blks)) * 4096; st.Stored != want {
		t.Fatalf("stored %d bytes of new chunks, want %d (the chunk in segments 0, 2 and 6 once)", st.Stored, want)
	}
	backupAndRestoreCheck(t, repo, x.ID, next)

	// The same incremental read one segment after another.
	defer backup.SetReadWorkers(1, nil)()
	y, _, err := repo.Backup(ctx, next, backup.Options{Volume: "v", Parent: parent, Changed: bm})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(x.Segments, y.Segments) || !slices.Equal(x.Patches, y.Patches) {
		t.Fatalf("segments %v patches %v read at once, %v and %v one after another", x.Segments, x.Patches, y.Segments, y.Patches)
	}
	if len(backup.PatchObjects(repo, x.ID)) != segs {
		t.Fatalf("%d patches, want one a segment", len(backup.PatchObjects(repo, x.ID)))
	}
	verifyClean(t, repo, 3)
}
