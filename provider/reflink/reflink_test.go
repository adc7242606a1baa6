package reflink

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"umbra/internal/owner"
	"umbra/internal/testutil"
	"umbra/provider"
	"umbra/provider/providertest"
)

// mountFS makes a filesystem of the given kind on a loop device and
// mounts it.
func mountFS(t *testing.T, kind string) string {
	t.Helper()
	testutil.NeedRoot(t)
	mkfs := map[string][]string{"xfs": {"mkfs.xfs", "-q", "-f", "-m", "reflink=1"}, "btrfs": {"mkfs.btrfs", "-q", "-f"}}[kind]
	testutil.Need(t, "losetup", mkfs[0])
	dir := t.TempDir()
	img := filepath.Join(dir, kind+".img")
	testutil.SparseFile(t, img, 512<<20)
	dev := testutil.Losetup(t, img, false, false)
	testutil.Run(t, mkfs[0], append(mkfs[1:], dev)...)
	return testutil.Mount(t, dev, dir)
}

func commit(t *testing.T, p *Provider, vol, id string) provider.Snapshot {
	t.Helper()
	ctx := context.Background()
	txn, err := p.Prepare(ctx, vol, provider.SnapshotOptions{ID: id})
	if err != nil {
		t.Fatal(err)
	}
	if err := txn.PreCommit(ctx, time.Second); err != nil {
		t.Fatal(err)
	}
	s, err := txn.Commit(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := txn.PostCommit(ctx); err != nil {
		t.Fatal(err)
	}
	return s
}

func TestReflink(t *testing.T) {
	for _, kind := range []string{"xfs", "btrfs"} {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			mnt := mountFS(t, kind)
			vol := filepath.Join(mnt, "disk.img")
			orig := make([]byte, 16<<20)
			rand.Read(orig)
			os.WriteFile(vol, orig, 0o600)
			p := New()
			if err := p.Add(Volume{Path: vol, StorageDir: filepath.Join(mnt, ".shadow")}); err != nil {
				t.Fatal(err)
			}
			s1 := commit(t, p, vol, "s1")
			if s1.DiffBytes > 64<<10 {
				t.Fatalf("a fresh clone already holds %d unshared bytes", s1.DiffBytes)
			}
			// Change 1 % of the 4 KiB blocks, scattered.
			f, _ := os.OpenFile(vol, os.O_WRONLY, 0)
			var changed []int64
			for blk := int64(7); blk < 4096; blk += 97 {
				f.WriteAt(bytes.Repeat([]byte{0xee}, 4096), blk*4096)
				changed = append(changed, blk)
			}
			f.Sync()
			f.Close()
			bm, reliable, err := p.Changed(ctx, vol, "s1", "")
			if err != nil || !reliable {
				t.Fatalf("changed: %v %v", reliable, err)
			}
			want := map[int64]bool{}
			for _, b := range changed {
				want[b] = true
			}
			for blk := int64(0); blk < 4096; blk++ {
				if bm.Set(blk) != want[blk] {
					t.Fatalf("block %d: changed=%v, want %v", blk, bm.Set(blk), want[blk])
				}
			}
			img, err := p.Open(ctx, vol, "s1")
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(orig))
			img.ReadAt(got, 0)
			img.Close()
			if !bytes.Equal(got, orig) {
				t.Fatal("snapshot does not read its commit point")
			}
			commit(t, p, vol, "s2")
			if err := p.Revert(ctx, vol, "s1"); err != nil {
				t.Fatal(err)
			}
			now, _ := os.ReadFile(vol)
			if !bytes.Equal(now, orig) {
				t.Fatal("revert did not restore the volume")
			}
			if list, _ := p.List(ctx, vol); len(list) != 1 || list[0].ID != "s1" {
				t.Fatalf("after revert: %+v", list)
			}
			if err := p.Delete(ctx, vol, "nope"); !errors.Is(err, provider.ErrNotFound) {
				t.Fatalf("delete unknown: %v", err)
			}
		})
	}
}

func TestReflinkLimitAndErrors(t *testing.T) {
	ctx := context.Background()
	mnt := mountFS(t, "xfs")
	vol := filepath.Join(mnt, "disk.img")
	data := make([]byte, 8<<20)
	rand.Read(data)
	os.WriteFile(vol, data, 0o600)
	p := New()
	if err := p.Add(Volume{Path: vol, StorageDir: filepath.Join(mnt, ".shadow"), MaxBytes: 6 << 20}); err != nil {
		t.Fatal(err)
	}
	for i, id := range []string{"a", "b", "c"} {
		commit(t, p, vol, id)
		f, _ := os.OpenFile(vol, os.O_WRONLY, 0)
		f.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 4<<20), 0) // unshares 4 MiB of the newest clone
		f.Sync()
		f.Close()
	}
	commit(t, p, vol, "d") // commit applies the limit
	list, _ := p.List(ctx, vol)
	var used int64
	for _, s := range list {
		used += s.DiffBytes
	}
	if used > 6<<20 || len(list) == 4 {
		t.Fatalf("limit not applied: %d bytes in %d snapshots", used, len(list))
	}
	if list[0].ID == "a" {
		t.Fatalf("the oldest snapshot survived: %+v", list)
	}

	// Storage on another filesystem is refused, naming both paths.
	err := p.Add(Volume{Path: vol, StorageDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "different filesystems") {
		t.Fatalf("storage on another filesystem: %v", err)
	}
	// A filesystem without reflinks is refused.
	if _, e := exec.LookPath("mkfs.ext4"); e == nil {
		other := t.TempDir()
		f := filepath.Join(other, "x.img")
		os.WriteFile(f, []byte("x"), 0o600)
		if fi, _ := os.Stat("/tmp"); fi != nil {
			if err := p.Add(Volume{Path: f, StorageDir: filepath.Join(other, "s")}); err == nil {
				t.Log("the temporary directory's filesystem clones; skipping the no-reflink check")
			} else if !strings.Contains(err.Error(), "cannot clone") {
				t.Fatalf("no-reflink filesystem: %v", err)
			}
		}
	}
}

func TestConformance(t *testing.T) {
	for _, kind := range []string{"xfs", "btrfs"} {
		t.Run(kind, func(t *testing.T) {
			providertest.Run(t, func(t *testing.T) providertest.Volume {
				mnt := mountFS(t, kind)
				vol := filepath.Join(mnt, "disk.img")
				os.WriteFile(vol, make([]byte, 4<<20), 0o600)
				p := New()
				if err := p.Add(Volume{Path: vol, StorageDir: filepath.Join(mnt, ".shadow")}); err != nil {
					t.Fatal(err)
				}
				return providertest.Volume{
					Provider: p, Name: vol, Size: 4 << 20,
					Write: func(t *testing.T, off int64, b []byte) {
						f, err := os.OpenFile(vol, os.O_WRONLY, 0)
						if err != nil {
							t.Fatal(err)
						}
						defer f.Close()
						f.WriteAt(b, off)
					},
					Read: func(t *testing.T, off int64, b []byte) {
						f, err := os.Open(vol)
						if err != nil {
							t.Fatal(err)
						}
						defer f.Close()
						f.ReadAt(b, off)
					},
				}
			})
		})
	}
}

func testOpts(id string) provider.SnapshotOptions { return provider.SnapshotOptions{ID: id} }

// A storage directory another process owns (a second service's) is
// refused, named, before anything is cloned into it; the provider's own
// claim goes with Close.
func TestStorageOwned(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(file, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	held := filepath.Join(dir, ".umbra-shadow")
	if err := os.Mkdir(held, 0o700); err != nil {
		t.Fatal(err)
	}
	pid := testutil.HoldLock(t, held)
	p := New()
	defer p.Close()
	err := p.Add(Volume{Path: file, StorageDir: held})
	if !errors.Is(err, owner.ErrHeld) || !strings.Contains(err.Error(), held) || !strings.Contains(err.Error(), fmt.Sprintf("pid %d", pid)) {
		t.Fatalf("add with a storage directory pid %d holds: got %v, want it refused naming both", pid, err)
	}
	if len(p.Volumes()) != 0 {
		t.Fatalf("refused volume registered: %v", p.Volumes())
	}
}
