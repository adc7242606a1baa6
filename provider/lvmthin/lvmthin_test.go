package lvmthin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"umbra/internal/testutil"
	"umbra/provider"
	"umbra/provider/providertest"
)

// thinPool makes a VG on a loop device with a thin pool and returns the
// VG's name. It needs device-mapper's thin-pool target: this machine's
// kernel may lack it; scripts/vmtest scripts/vm/lvmthin runs the test in a
// VM with Debian's kernel.
func thinPool(t *testing.T) string {
	t.Helper()
	testutil.NeedRoot(t)
	testutil.Need(t, "lvm", "losetup", "dmsetup", "thin_check")
	if _, err := os.Stat("/dev/mapper/control"); err != nil {
		t.Skip("no device-mapper in this kernel (/dev/mapper/control): run scripts/vmtest --gotest ./provider/lvmthin scripts/vm/lvmthin")
	}
	if out, err := exec.Command("dmsetup", "targets").CombinedOutput(); err != nil || !strings.Contains(string(out), "thin-pool") {
		t.Skipf("no dm thin-pool target in this kernel (dmsetup targets: %s): run scripts/vmtest --gotest ./provider/lvmthin scripts/vm/lvmthin", strings.TrimSpace(string(out)))
	}
	dir := t.TempDir()
	// Its own LVM configuration: no udev (the VM has none), no metadata
	// backups in /etc.
	os.WriteFile(filepath.Join(dir, "lvm.conf"), []byte(`devices { obtain_device_list_from_udev = 0 external_device_info_source = "none" }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
`), 0o644)
	t.Setenv("LVM_SYSTEM_DIR", dir)
	img := testutil.SparseFile(t, filepath.Join(dir, "pv.img"), 256<<20)
	dev := testutil.Losetup(t, img, false, false)
	vg := fmt.Sprintf("umbratest%d", os.Getpid())
	testutil.Run(t, "lvm", "pvcreate", "-q", dev)
	testutil.Run(t, "lvm", "vgcreate", "-q", vg, dev)
	t.Cleanup(func() { exec.Command("lvm", "vgremove", "-q", "-f", vg).Run() })
	testutil.Run(t, "lvm", "lvcreate", "-q", "-y", "-L", "128M", "-T", vg+"/pool")
	return vg
}

func TestConformance(t *testing.T) {
	vg := thinPool(t)
	ctx := context.Background()
	n := 0
	providertest.Run(t, func(t *testing.T) providertest.Volume {
		n++
		lv := fmt.Sprintf("v%d", n)
		testutil.Run(t, "lvm", "lvcreate", "-q", "-y", "-V", "8M", "-T", vg+"/pool", "-n", lv)
		p := New()
		vol := vg + "/" + lv
		if err := p.Add(ctx, vol); err != nil {
			t.Fatal(err)
		}
		dev := dmPath(vg, lv)
		return providertest.Volume{
			Provider: p, Name: vol, Size: 8 << 20,
			Write: func(t *testing.T, off int64, b []byte) {
				f, err := os.OpenFile(dev, os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if _, err := f.WriteAt(b, off); err != nil {
					t.Fatal(err)
				}
				if err := f.Sync(); err != nil {
					t.Fatal(err)
				}
			},
			Read: func(t *testing.T, off int64, b []byte) {
				f, err := os.Open(dev)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if _, err := f.ReadAt(b, off); err != nil {
					t.Fatal(err)
				}
			},
		}
	})
}

func TestAddRefusesNonThin(t *testing.T) {
	vg := thinPool(t)
	ctx := context.Background()
	testutil.Run(t, "lvm", "lvcreate", "-q", "-y", "-L", "8M", "-n", "thick", vg)
	p := New()
	if err := p.Add(ctx, vg+"/thick"); err == nil || !strings.Contains(err.Error(), "not a thin LV") {
		t.Fatalf("add of a thick LV: %v, want it refused as not thin", err)
	}
	if err := p.Add(ctx, "novg"); err == nil || !strings.Contains(err.Error(), "VG/LV") {
		t.Fatalf("add of %q: %v, want a VG/LV error", "novg", err)
	}
	if err := p.Add(ctx, vg+"/missing"); err == nil {
		t.Fatal("add of a missing LV succeeded")
	}
	if _, err := p.Prepare(ctx, vg+"/thick", provider.SnapshotOptions{}); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("prepare on a volume not added: %v, want ErrNotFound", err)
	}
}

// TestChanged checks changed-block tracking from the pool's metadata:
// exactly the chunks written after a snapshot are reported, between a
// snapshot and the live LV and between two snapshots.
func TestChanged(t *testing.T) {
	vg := thinPool(t)
	ctx := context.Background()
	testutil.Run(t, "lvm", "lvcreate", "-q", "-y", "-V", "16M", "-T", vg+"/pool", "-n", "c")
	p := New()
	vol := vg + "/c"
	if err := p.Add(ctx, vol); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(dmPath(vg, "c"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	write := func(off int64, n int) {
		t.Helper()
		if _, err := f.WriteAt(bytes.Repeat([]byte{0x5a}, n), off); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	write(0, 16<<20) // every chunk mapped
	snapshot := func(id string) {
		t.Helper()
		txn, err := p.Prepare(ctx, vol, provider.SnapshotOptions{ID: id})
		if err != nil {
			t.Fatal(err)
		}
		if err := txn.PreCommit(ctx, time.Second); err != nil {
			t.Fatal(err)
		}
		if _, err := txn.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		txn.PostCommit(ctx)
	}
	check := func(since, upto string, offs ...int64) {
		t.Helper()
		bm, reliable, err := p.Changed(ctx, vol, since, upto)
		if err != nil || !reliable {
			t.Fatalf("changed %s..%q: reliable %v, %v", since, upto, reliable, err)
		}
		want := map[int64]bool{}
		for _, off := range offs {
			want[off/bm.Granule] = true
		}
		for i := int64(0); i < (16<<20)/bm.Granule; i++ {
			if bm.Set(i) != want[i] {
				t.Fatalf("changed %s..%q: chunk %d (of %d bytes) reported %v, want %v", since, upto, i, bm.Granule, bm.Set(i), want[i])
			}
		}
	}
	snapshot("s1")
	first := []int64{0, 3<<20 + 4096, 9 << 20}
	for _, off := range first {
		write(off, 4096)
	}
	check("s1", "", first...)
	snapshot("s2")
	write(12<<20, 4096)
	check("s1", "s2", first...)
	check("s2", "", 12<<20)
}
