package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/internal/testutil"
)

// TestStorageShrinkAndPlacement: shrinking a shadow storage association
// below what live snapshots use deletes the oldest until it fits, and
// the survivors still read what they held; a volume says whether it can
// hold other volumes' storage, and refuses to hold its own.
func TestStorageShrinkAndPlacement(t *testing.T) {
	testutil.Need(t, "qemu-io")
	dir := t.TempDir()
	fuseDir := filepath.Join(dir, "fuse")
	var extra []string
	root := os.Geteuid() == 0
	if _, err := os.Stat("/dev/fuse"); err == nil && root {
		extra = []string{"--fuse-dir", fuseDir}
	}
	s := startService(t, dir, []string{"a"}, extra...)
	uri := "nbd+unix:///a?socket=" + s.nbd
	io := func(export, cmd string) string {
		args := []string{"-f", "raw", "-c", cmd, uri}
		if export != "" { // a snapshot: read-only
			args = []string{"-f", "raw", "-r", "-c", cmd, "nbd+unix:///" + export + "?socket=" + s.nbd}
		}
		out, err := exec.Command("qemu-io", args...).CombinedOutput()
		if err != nil || strings.Contains(string(out), "failed") || strings.Contains(string(out), "Pattern verification") {
			t.Fatalf("qemu-io %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	io("", "write -P 0x11 0 1M")
	for i, pat := range []string{"0x22", "0x33", "0x44"} {
		s.ok("snapshot", "create", "a", "--id", "s"+string(rune('1'+i)))
		io("", "write -P "+pat+" 0 1M") // each snapshot now owns 1 MiB of preserved data
	}
	var st struct {
		Storage []struct {
			UsedBytes      int64 `json:"used_bytes"`
			AllocatedBytes int64 `json:"allocated_bytes"`
		} `json:"storage"`
	}
	allocated := func() int64 { return st.Storage[0].AllocatedBytes }
	json.Unmarshal([]byte(s.ok("storage", "list", "a", "--json")), &st)
	if st.Storage[0].UsedBytes != 3145728 {
		t.Fatalf("storage used before the shrink: %+v", st)
	}
	if a := allocated(); a < 3<<20 {
		t.Fatalf("storage allocated %d bytes before the shrink, less than the 3 MiB used", a)
	}
	// The shrink names the snapshots it deleted, in text and JSON.
	if out := s.ok("storage", "resize", "a", "--max", "1536K"); !strings.Contains(out, "deleted to fit: a@s1, a@s2") {
		t.Fatalf("storage resize does not name the snapshots it deleted:\n%s", out)
	}
	l := s.list()
	if len(l.Snapshots) != 1 || l.Snapshots[0].ID != "s3" {
		t.Fatalf("after shrinking to 1.5 MiB: %+v", l)
	}
	io("a@s3", "read -P 0x33 0 1M")
	json.Unmarshal([]byte(s.ok("storage", "list", "a", "--json")), &st)
	if st.Storage[0].UsedBytes != 1048576 {
		t.Fatalf("storage used after the shrink: %+v", st)
	}
	// The space of the dropped snapshots goes back at once: the diff area
	// keeps no more than its max.
	if a := allocated(); a < 1<<20 || a > 2<<20 {
		t.Fatalf("storage allocated %d bytes after shrinking to 1.5 MiB with 1 MiB used", a)
	}
	if out := s.ok("storage", "list", "a"); !strings.Contains(out, "ALLOCATED") {
		t.Fatalf("storage list shows no allocated column:\n%s", out)
	}

	// vssadmin delete shadowstorage: the association goes, and every
	// shadow copy with it; the volume says why it cannot be shadow-copied.
	if out := s.ok("storage", "delete", "a"); !strings.Contains(out, "1 shadow copies") {
		t.Fatalf("storage delete: %s", out)
	}
	if l := s.list(); len(l.Snapshots) != 0 {
		t.Fatalf("snapshots after storage delete: %+v", l)
	}
	if out, code := s.umbra("snapshot", "create", "a"); code == 0 || !strings.Contains(out, "storage") {
		t.Fatalf("snapshot without storage: exit %d %s", code, out)
	}
	s.ok("storage", "add", "a", "--dir", filepath.Join(dir, "shadow2"))
	s.ok("snapshot", "create", "a")

	type vols struct {
		Volumes []struct {
			CanBeStorage  bool     `json:"can_be_storage"`
			StorageWhyNot string   `json:"storage_why_not"`
			Mounts        []string `json:"mounts"`
		} `json:"volumes"`
	}
	var v vols
	json.Unmarshal([]byte(s.ok("volume", "list", "--json")), &v)
	if v.Volumes[0].CanBeStorage || v.Volumes[0].StorageWhyNot == "" {
		t.Fatalf("an unmounted volume as storage: %+v", v)
	}
	if len(extra) == 0 {
		t.Log("not root or no /dev/fuse: the mounted case is not tested")
		return
	}
	dev := testutil.Losetup(t, filepath.Join(fuseDir, "a"), false, true)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := testutil.Mount(t, dev, dir)
	json.Unmarshal([]byte(s.ok("volume", "list", "--json")), &v)
	if !v.Volumes[0].CanBeStorage || len(v.Volumes[0].Mounts) != 1 || v.Volumes[0].Mounts[0] != mnt {
		t.Fatalf("a mounted volume as storage: %+v", v)
	}
	if out, code := s.umbra("storage", "add", "a", "--dir", filepath.Join(mnt, "diff")); code != 2 || !strings.Contains(out, "itself") {
		t.Fatalf("storage on the volume itself: exit %d %s", code, out)
	}
}
