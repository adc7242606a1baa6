package reflink

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"umbra/internal/testutil"
)

// BenchmarkCommit: commit (FICLONE) of a 10 GiB sparse file with 1, 1 000
// and 100 000 extents on XFS (reflink=1), as root.
func BenchmarkCommit(b *testing.B) {
	testutil.NeedRoot(b)
	testutil.Need(b, "losetup", "mkfs.xfs")
	dir := b.TempDir()
	img := filepath.Join(dir, "xfs.img")
	testutil.SparseFile(b, img, 2<<30)
	dev := testutil.Losetup(b, img, false, false)
	testutil.Run(b, "mkfs.xfs", "-q", "-f", "-m", "reflink=1", dev)
	mnt := testutil.Mount(b, dev, dir)
	for _, extents := range []int{1, 1000, 100000} {
		b.Run(fmt.Sprintf("extents=%d", extents), func(b *testing.B) {
			vol := filepath.Join(mnt, fmt.Sprintf("v%d.img", extents))
			f, _ := os.Create(vol)
			f.Truncate(10 << 30)
			blk := make([]byte, 4096)
			stride := int64(10<<30) / int64(extents)
			for i := 0; i < extents; i++ {
				blk[0] = byte(i)
				f.WriteAt(blk, int64(i)*stride) // one extent each (spaced, not mergeable)
			}
			f.Sync()
			f.Close()
			p := New()
			if err := p.Add(Volume{Path: vol, StorageDir: filepath.Join(mnt, "s")}); err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			var total time.Duration
			for i := 0; i < b.N; i++ {
				txn, _ := p.Prepare(ctx, vol, testOpts(fmt.Sprintf("b%d", i)))
				txn.PreCommit(ctx, time.Second)
				start := time.Now()
				if _, err := txn.Commit(ctx); err != nil {
					b.Fatal(err)
				}
				total += time.Since(start)
				txn.Abort(ctx)
			}
			b.ReportMetric(float64(total.Microseconds())/float64(b.N), "commit-µs")
		})
	}
}
