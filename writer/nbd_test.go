package writer

import (
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"testing"
)

// fakeSysBlock makes a /sys/block with nbd devices connected by the given
// pids (0: not connected, no pid file) and points SysBlock at it. This
// machine may have no nbd module; the kernel path is scripts/vmtest's.
func fakeSysBlock(t *testing.T, devs map[string]int) {
	t.Helper()
	root := t.TempDir()
	for name, pid := range devs {
		d := filepath.Join(root, name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if pid > 0 {
			if err := os.WriteFile(filepath.Join(d, "pid"), []byte(strconv.Itoa(pid)+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	old := SysBlock
	SysBlock = root
	t.Cleanup(func() { SysBlock = old })
}

func TestNBDDevices(t *testing.T) {
	fakeSysBlock(t, map[string]int{"nbd0": 4242, "nbd1": 99, "nbd2": 0, "nbd10": 4242, "loop0": 4242, "sda": 0})
	if got := NBDDevices([]int{4242, 7}); !reflect.DeepEqual(got, []string{"/dev/nbd0", "/dev/nbd10"}) {
		t.Fatalf("devices of pids 4242 and 7: %v", got)
	}
	if got := NBDDevices(nil); got != nil {
		t.Fatalf("devices of no client: %v", got)
	}
	if got := NBDDevices([]int{5}); got != nil {
		t.Fatalf("devices of a pid no device names: %v", got)
	}
}

// A filesystem on an nbd device, or on a partition of one, lies on the
// volume the device is connected to; one on another nbd device whose
// name starts the same does not.
func TestResolveMountsNBD(t *testing.T) {
	mounts := []Mount{
		{Point: "/mnt/whole", Source: "/dev/nbd1", FSType: "ext4"},
		{Point: "/mnt/part", Source: "/dev/nbd0p2", FSType: "xfs"},
		{Point: "/mnt/other", Source: "/dev/nbd10", FSType: "ext4"},
		{Point: "/mnt/loop", Source: "/dev/loop7", FSType: "ext4"},
		{Point: "/mnt/odd", Source: "/dev/nbd0px", FSType: "ext4"},
	}
	backing := func(dev string) (string, bool) {
		if dev == "/dev/loop7" {
			return "/run/umbra/files/v", true
		}
		return "", false
	}
	vols := resolveMounts([]Volume{
		{Name: "v", Devices: []string{"/run/umbra/files/v", "/dev/nbd0"}},
		{Name: "w", Devices: []string{"/dev/nbd1"}},
		{Name: "x"},
	}, mounts, backing)
	want := [][]string{{"/mnt/part", "/mnt/loop"}, {"/mnt/whole"}, nil}
	for i, v := range vols {
		if !reflect.DeepEqual(v.Mounts, want[i]) {
			t.Errorf("volume %s mounts %v, want %v", v.Name, v.Mounts, want[i])
		}
	}
}
