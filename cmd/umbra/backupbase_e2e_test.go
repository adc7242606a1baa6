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

// TestBackupBaseNotServed: the snapshot a backup keeps as the base of
// the next incremental image has its data behind the backup cursor
// released. It is listed as a backup base (text and JSON, with no
// export), not offered or served over NBD (nbdinfo is refused, by name),
// not a FUSE file, and neither exposed nor reverted to; the refusals say
// what it is.
func TestBackupBaseNotServed(t *testing.T) {
	testutil.Need(t, "nbdinfo", "qemu-io")
	dir := t.TempDir()
	fuseDir := filepath.Join(dir, "fuse")
	var extra []string
	fuse := os.Geteuid() == 0
	if _, err := os.Stat("/dev/fuse"); err != nil {
		fuse = false
	}
	if fuse {
		extra = []string{"--fuse-dir", fuseDir}
	}
	s := startService(t, dir, []string{"a"}, extra...)
	uri := "nbd+unix:///a?socket=" + s.nbd
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", uri).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	repo := filepath.Join(dir, "repo")
	s.ok("repo", "init", "--repo", repo)
	s.ok("backup", "a", "--repo", repo)

	var l struct {
		Snapshots []struct {
			ID     string `json:"id"`
			Valid  bool   `json:"valid"`
			State  string `json:"state"`
			Reason string `json:"reason"`
			Export string `json:"export"`
		} `json:"snapshots"`
	}
	json.Unmarshal([]byte(s.ok("snapshot", "list", "a", "--json")), &l)
	if len(l.Snapshots) != 1 || !strings.HasPrefix(l.Snapshots[0].ID, "backup-") {
		t.Fatalf("snapshots after a backup: %+v, want its base", l)
	}
	base := l.Snapshots[0]
	if base.State != "backup-base" || base.Export != "" || !strings.Contains(base.Reason, "released") {
		t.Fatalf("the backup base is listed as %+v, want state backup-base, no export, a reason", base)
	}
	if out := s.ok("snapshot", "list", "a"); !strings.Contains(out, "backup-base") || strings.Contains(out, "a@"+base.ID) {
		t.Fatalf("snapshot list does not show the base as a backup base without an export:\n%s", out)
	}

	export := "a@" + base.ID
	// libnbd prints the server's message only in its debug output.
	info := exec.Command("nbdinfo", "nbd+unix:///"+export+"?socket="+s.nbd)
	info.Env = append(os.Environ(), "LIBNBD_DEBUG=1")
	out, err := info.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "backup base") {
		t.Fatalf("nbdinfo of the backup base: %v, want a refusal saying it is a backup base\n%s", err, out)
	}
	out, err = exec.Command("nbdinfo", "--list", "nbd+unix:///?socket="+s.nbd).CombinedOutput()
	if err != nil || strings.Contains(string(out), export) || !strings.Contains(string(out), "export=\"a\"") && !strings.Contains(string(out), "a\n") {
		t.Fatalf("nbdinfo --list: %v, want the volume and not the backup base\n%s", err, out)
	}

	if fuse {
		waitFile(t, filepath.Join(fuseDir, "a"), "the volume's FUSE file")
		if _, err := os.Stat(filepath.Join(fuseDir, export)); err == nil {
			t.Fatal("the backup base is a FUSE file")
		}
		if out, code := s.umbra("snapshot", "expose", "a", base.ID); code == 0 || !strings.Contains(out, "backup base") {
			t.Fatalf("expose of the backup base: exit %d, want a refusal saying it is a backup base\n%s", code, out)
		}
	}
	if out, code := s.umbra("snapshot", "revert", "a", base.ID); code == 0 || !strings.Contains(out, "backup cursor") {
		t.Fatalf("revert to the backup base: exit %d, want a refusal\n%s", code, out)
	}
	// It still serves its purpose: the next backup is incremental.
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x6b 0 64k", uri).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	if out := s.ok("backup", "a", "--repo", repo); !strings.Contains(out, "incremental") {
		t.Logf("second backup:\n%s", out)
	}
}
