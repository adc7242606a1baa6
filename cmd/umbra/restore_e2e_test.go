package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/internal/testutil"
)

// TestCLIPasswordAndRestoreTarget: a password given for an unencrypted
// repository is refused (exit 2) by the verbs that open it locally and
// by backup through the service, rather than ignored while its user
// believes the images are encrypted; restore refuses, without --force,
// to overwrite a file that holds something or a block device that holds
// data, and refuses a mounted device even with --force.
func TestCLIPasswordAndRestoreTarget(t *testing.T) {
	testutil.Need(t, "qemu-io")
	dir := t.TempDir()
	s := startService(t, dir, []string{"a"})
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "nbd+unix:///a?socket="+s.nbd).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	repo := filepath.Join(dir, "plain")
	s.ok("repo", "init", "--repo", repo)
	pw := filepath.Join(dir, "pw")
	os.WriteFile(pw, []byte("a password that protects nothing\n"), 0o600)
	for _, args := range [][]string{
		{"images", "list", "--repo", repo, "--password-file", pw},
		{"backup", "a", "--repo", repo, "--password-file", pw},
		{"verify", "--repo", repo, "--password-file", pw},
	} {
		if _, stderr, code := s.run(nil, args...); code != 2 || !strings.Contains(stderr, "not encrypted") {
			t.Fatalf("umbra %s: exit %d %s; want 2 and the repository not encrypted", strings.Join(args, " "), code, stderr)
		}
	}
	if _, stderr, code := s.run([]string{"UMBRA_PASSWORD=nothing"}, "images", "list", "--repo", repo); code != 2 || !strings.Contains(stderr, "not encrypted") {
		t.Fatalf("images list with UMBRA_PASSWORD on an unencrypted repository: exit %d %s", code, stderr)
	}
	if out := s.ok("images", "list", "--repo", repo, "--json"); strings.TrimSpace(out) != "[]" && strings.TrimSpace(out) != "null" {
		t.Fatalf("a refused backup wrote an image: %s", out)
	}

	var resp struct {
		Images []struct {
			Image string `json:"image"`
		} `json:"images"`
	}
	json.Unmarshal([]byte(s.ok("backup", "a", "--repo", repo, "--json")), &resp)
	if len(resp.Images) != 1 {
		t.Fatalf("backup: %+v", resp)
	}
	id := resp.Images[0].Image
	want, _ := os.ReadFile(filepath.Join(dir, "a.img"))

	// An existing file: refused without --force and left as it was.
	target := filepath.Join(dir, "precious.txt")
	os.WriteFile(target, []byte("keep me\n"), 0o600)
	if _, stderr, code := s.run(nil, "restore", id, "--repo", repo, "--to", target); code != 2 || !strings.Contains(stderr, "--force") {
		t.Fatalf("restore over an existing file: exit %d %s", code, stderr)
	}
	if b, _ := os.ReadFile(target); string(b) != "keep me\n" {
		t.Fatal("a refused restore changed the file")
	}
	s.ok("restore", id, "--repo", repo, "--to", target, "--force")
	if b, _ := os.ReadFile(target); !bytes.Equal(b, want) {
		t.Fatal("restore --force over a file does not hold the image")
	}
	empty := filepath.Join(dir, "empty.img")
	os.WriteFile(empty, nil, 0o600)
	s.ok("restore", id, "--repo", repo, "--to", empty) // nothing to lose

	// A block device that holds a filesystem.
	if os.Geteuid() != 0 {
		t.Log("not root: block device targets not tested")
		return
	}
	testutil.Need(t, "losetup", "mkfs.ext4", "mount")
	backing := testutil.SparseFile(t, filepath.Join(dir, "disk.img"), 16<<20)
	dev := testutil.Losetup(t, backing, false, false)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	if _, stderr, code := s.run(nil, "restore", id, "--repo", repo, "--to", dev); code != 2 || !strings.Contains(stderr, "holds data") {
		t.Fatalf("restore onto a device holding a filesystem: exit %d %s", code, stderr)
	}
	mnt := testutil.Mount(t, dev, dir)
	if _, stderr, code := s.run(nil, "restore", id, "--repo", repo, "--to", dev, "--force"); code == 0 || !strings.Contains(stderr, "in use") {
		t.Fatalf("restore --force onto a mounted device: exit %d %s", code, stderr)
	}
	testutil.Run(t, "umount", mnt)
	s.ok("restore", id, "--repo", repo, "--to", dev, "--force")
	got, err := os.ReadFile(backing)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the device after restore --force does not hold the image (%v)", err)
	}
}
