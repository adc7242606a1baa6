package reflink

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"umbra/internal/testutil"
)

// mountWith makes a filesystem on a loop device and mounts it with opts.
func mountWith(t *testing.T, mkfs []string, opts ...string) string {
	t.Helper()
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", mkfs[0])
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	testutil.SparseFile(t, img, 512<<20)
	dev := testutil.Losetup(t, img, false, false)
	testutil.Run(t, mkfs[0], append(mkfs[1:], dev)...)
	return testutil.Mount(t, dev, dir, opts...)
}

// block returns 4 KiB that compress well (btrfs compresses them) yet
// differ from every other block: its number and a generation, repeated.
func block(blk int64, gen uint32) []byte {
	b := make([]byte, 4096)
	for i := 0; i < len(b); i += 16 {
		binary.LittleEndian.PutUint64(b[i:], uint64(blk))
		binary.LittleEndian.PutUint32(b[i+8:], gen)
	}
	return b
}

// TestChangedNeverMissesAChange: Changed must mark every block whose bytes
// differ between two snapshots (an unmarked changed block would make an
// incremental image restore wrong bytes), and should mark little else.
// Runs on XFS, btrfs, and btrfs with forced compression, whose extents
// are encoded: FIEMAP gives the start of the compressed data, not a
// per-block address, and compressed extents lie back to back on disk;
// there the btrfs extent items say which blocks are the same.
// The writes are single blocks and runs of up to 40 blocks at random
// places, logged seed.
func TestChangedNeverMissesAChange(t *testing.T) {
	for _, c := range testutil.ReflinkFilesystems {
		t.Run(c.Name, func(t *testing.T) {
			ctx := context.Background()
			mnt := mountWith(t, c.Mkfs, c.Opts...)
			seed := rand.Uint64()
			t.Logf("seed %d", seed)
			r := rand.New(rand.NewPCG(seed, 8))
			const blocks = 4096 // 16 MiB
			vol := filepath.Join(mnt, "disk.img")
			var buf bytes.Buffer
			for blk := int64(0); blk < blocks; blk++ {
				buf.Write(block(blk, 0))
			}
			os.WriteFile(vol, buf.Bytes(), 0o600)
			p := New()
			if err := p.Add(Volume{Path: vol, StorageDir: filepath.Join(mnt, ".shadow")}); err != nil {
				t.Fatal(err)
			}
			commit(t, p, vol, "s1")
			f, _ := os.OpenFile(vol, os.O_WRONLY, 0)
			written := map[int64]bool{}
			for gen := uint32(1); gen <= 80; gen++ {
				start, n := r.Int64N(blocks), int64(1)
				if gen%4 == 0 {
					n = 1 + r.Int64N(40)
				}
				for blk := start; blk < min(start+n, blocks); blk++ {
					f.WriteAt(block(blk, gen), blk*4096)
					written[blk] = true
				}
				if gen%10 == 0 {
					f.Sync() // extents of several sizes
				}
			}
			f.Close()
			commit(t, p, vol, "s2")
			bm, reliable, err := p.Changed(ctx, vol, "s1", "s2")
			if err != nil || !reliable {
				t.Fatalf("changed: %v %v", reliable, err)
			}
			a, _ := os.ReadFile(snapPath(p.vols[vol], "s1"))
			b, _ := os.ReadFile(snapPath(p.vols[vol], "s2"))
			marked := 0
			for blk := int64(0); blk < blocks; blk++ {
				differs := !bytes.Equal(a[blk*4096:(blk+1)*4096], b[blk*4096:(blk+1)*4096])
				if differs && !bm.Set(blk) {
					t.Fatalf("block %d differs between the snapshots but Changed does not mark it", blk)
				}
				if bm.Set(blk) {
					marked++
				}
			}
			t.Logf("%d blocks written, %d marked changed", len(written), marked)
			// Every write changed its block's bytes; extent maps (or, on
			// compressed btrfs, the extent items) locate each block, so
			// the marks are the written blocks.
			if marked != len(written) {
				t.Fatalf("%d blocks marked changed; %d were written", marked, len(written))
			}
		})
	}
}

// TestChangedCompressedNeighbour is the case that made encoded extents
// opaque: on btrfs with compression, a 1 MiB file is eight 128 KiB
// compressed extents, 4 KiB apart on disk; rewriting blocks 8–15 writes
// a new compressed extent right after them, and FIEMAP merges it with
// the first one into one record that shows the old addresses for the new
// blocks. Comparing addresses alone called those blocks unchanged; the
// extent items tell them apart, and tell the unchanged rest.
func TestChangedCompressedNeighbour(t *testing.T) {
	mnt := mountWith(t, []string{"mkfs.btrfs", "-q", "-f"}, "compress-force=zstd")
	vol := filepath.Join(mnt, "disk.img")
	f, err := os.Create(vol)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for blk := int64(0); blk < 256; blk++ {
		f.WriteAt(block(blk, 0), blk*4096)
	}
	f.Sync()
	p := New()
	if err := p.Add(Volume{Path: vol, StorageDir: filepath.Join(mnt, ".shadow")}); err != nil {
		t.Fatal(err)
	}
	commit(t, p, vol, "s1")
	for blk := int64(8); blk < 16; blk++ {
		f.WriteAt(block(blk, 1), blk*4096)
	}
	f.Sync()
	bm, _, err := p.Changed(context.Background(), vol, "s1", "")
	if err != nil {
		t.Fatal(err)
	}
	for blk := int64(0); blk < 256; blk++ {
		if rewritten := blk >= 8 && blk < 16; bm.Set(blk) != rewritten {
			t.Fatalf("block %d: marked %v, rewritten %v", blk, bm.Set(blk), rewritten)
		}
	}
}
