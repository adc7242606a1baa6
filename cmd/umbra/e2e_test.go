package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"umbra/internal/testutil"
)

var umbraBin string

func TestMain(m *testing.M) {
	// Every test's temporary directory (t.TempDir) goes under root, so
	// that what the suite leaves behind can be told from what other
	// suites on the machine hold at the same time.
	root, err := os.MkdirTemp("", "umbra-e2e-")
	if err != nil {
		panic(err)
	}
	// As /tmp: tests run commands as other users (nobody) in there.
	if err := os.Chmod(root, 0o1777); err != nil {
		panic(err)
	}
	os.Setenv("TMPDIR", root)
	// Index caches of S3 repositories (local ones keep theirs inside).
	cacheDir := filepath.Join(root, "umbra-cache")
	os.Setenv("UMBRA_CACHE_DIR", cacheDir)
	dir, err := os.MkdirTemp("", "umbra-bin-")
	if err != nil {
		panic(err)
	}
	umbraBin = filepath.Join(dir, "umbra")
	args := []string{"build", "-o", umbraBin}
	if os.Getenv("UMBRA_RACE") != "" { // UMBRA_RACE=1: the binary under test runs with the race detector
		args = append(args, "-race")
	}
	if out, err := exec.Command("go", append(args, ".")...).CombinedOutput(); err != nil {
		os.Stderr.Write(out)
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.RemoveAll(cacheDir)
	if left := testutil.Leftovers(root); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: the tests left behind:\n  %s\n", strings.Join(left, "\n  "))
		testutil.CleanLeftovers(root)
		code = 1
	}
	os.RemoveAll(root)
	os.Exit(code)
}

type service struct {
	t    *testing.T
	dir  string
	api  string
	nbd  string
	cmd  *exec.Cmd
	args []string
}

// startService runs `umbra serve` on state under dir with a 16 MiB volume
// per name and the extra flags given.
func startService(t *testing.T, dir string, volumes []string, extra ...string) *service {
	t.Helper()
	s := &service{t: t, dir: dir, api: filepath.Join(dir, "api.sock"), nbd: filepath.Join(dir, "nbd.sock")}
	s.args = append([]string{"serve", "--state-dir", filepath.Join(dir, "state"), "--nbd-socket", s.nbd, "--api-socket", s.api}, extra...)
	for _, v := range volumes {
		img := filepath.Join(dir, v+".img")
		if _, err := os.Stat(img); err != nil {
			testutil.SparseFile(t, img, 16<<20)
		}
		s.args = append(s.args, "--volume", v+"="+img)
	}
	s.start()
	return s
}

func (s *service) start() {
	s.t.Helper()
	os.Remove(s.api)
	s.cmd = exec.Command(umbraBin, s.args...)
	s.cmd.Stderr = os.Stderr
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	waitFile(s.t, s.api, "umbra serve's API socket")
	s.t.Cleanup(s.stop)
}

// waitFile waits for path to appear (a hang guard bounds it).
func waitFile(t *testing.T, path, what string) {
	t.Helper()
	testutil.WaitFor(t, what+" ("+path+") appears", func() bool { _, err := os.Stat(path); return err == nil })
}

func (s *service) stop() {
	if s.cmd.Process != nil && s.cmd.ProcessState == nil {
		s.cmd.Process.Signal(syscall.SIGTERM)
		s.cmd.Wait()
	}
}

func (s *service) kill9() {
	s.cmd.Process.Signal(syscall.SIGKILL)
	s.cmd.Wait()
}

// umbra runs the CLI against the service and returns stdout and the exit code.
func (s *service) umbra(args ...string) (string, int) {
	s.t.Helper()
	cmd := exec.Command(umbraBin, append([]string{"--api-socket", s.api}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out) + stderr.String(), ee.ExitCode()
	}
	if err != nil {
		s.t.Fatal(err)
	}
	return string(out), 0
}

func (s *service) ok(args ...string) string {
	s.t.Helper()
	out, code := s.umbra(args...)
	if code != 0 {
		s.t.Fatalf("umbra %s: exit %d\n%s", strings.Join(args, " "), code, out)
	}
	return out
}

type snapList struct {
	Snapshots []struct {
		Volume     string `json:"volume"`
		ID         string `json:"id"`
		Persistent bool   `json:"persistent"`
		Valid      bool   `json:"valid"`
		SetID      string `json:"set_id"`
	} `json:"snapshots"`
}

func (s *service) list() snapList {
	s.t.Helper()
	var l snapList
	if err := json.Unmarshal([]byte(s.ok("snapshot", "list", "--json")), &l); err != nil {
		s.t.Fatal(err)
	}
	return l
}

func TestCLISnapshots(t *testing.T) {
	s := startService(t, t.TempDir(), []string{"a", "b"})
	out := s.ok("volume", "list")
	if !strings.Contains(out, "a ") || !strings.Contains(out, "b ") {
		t.Fatalf("volume list:\n%s", out)
	}
	s.ok("snapshot", "create", "a", "b", "--persistent", "--id", "one")
	s.ok("snapshot", "create", "a", "--id", "two")
	l := s.list()
	if len(l.Snapshots) != 3 || l.Snapshots[0].SetID != l.Snapshots[2].SetID && l.Snapshots[0].Volume == "a" && l.Snapshots[2].Volume == "b" {
		t.Fatalf("after creates: %+v", l)
	}
	if _, code := s.umbra("snapshot", "create", "a", "--id", "one"); code == 0 {
		t.Fatal("a duplicate id was accepted")
	}
	if _, code := s.umbra("snapshot", "delete", "a", "nope"); code != 3 {
		t.Fatalf("deleting a missing snapshot: exit %d, want 3", code)
	}
	if _, code := s.umbra("snapshot", "delete", "a"); code != 2 {
		t.Fatalf("delete without ID/--oldest/--all: exit %d, want 2", code)
	}
	if _, code := s.umbra("snapshot", "create", "nosuchvolume"); code != 3 {
		t.Fatalf("snapshot of a missing volume: exit %d, want 3", code)
	}
	s.ok("snapshot", "revert", "a", "one") // deletes "two"
	if l := s.list(); len(l.Snapshots) != 2 {
		t.Fatalf("after revert: %+v", l)
	}
	s.ok("storage", "resize", "a", "--max", "1G")
	if out := s.ok("storage", "list", "a"); !strings.Contains(out, "1.0GiB") {
		t.Fatalf("storage list after resize:\n%s", out)
	}

	// A persistent snapshot survives kill -9 of the service.
	s.kill9()
	s.start()
	l = s.list()
	found := false
	for _, sn := range l.Snapshots {
		if sn.Volume == "a" && sn.ID == "one" && sn.Persistent && sn.Valid {
			found = true
		}
	}
	if !found {
		t.Fatalf("persistent snapshot lost across kill -9: %+v", l)
	}
	s.ok("snapshot", "delete", "b", "--all")
	s.ok("snapshot", "delete", "a", "--oldest")
	if l := s.list(); len(l.Snapshots) != 0 {
		t.Fatalf("after deleting all: %+v", l)
	}
}

func TestCLIUnreachable(t *testing.T) {
	cmd := exec.Command(umbraBin, "--api-socket", filepath.Join(t.TempDir(), "none.sock"), "snapshot", "list")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 4 || !strings.Contains(string(out), "umbra serve") {
		t.Fatalf("unreachable service: %v\n%s", err, out)
	}
}

// TestServeDiesUnderLoop: a loop device over the FUSE file of a volume gets
// EIO promptly (no hang) when `umbra serve` is killed, and flushed data is
// intact after a restart.
func TestServeDiesUnderLoop(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE and loop devices")
	}
	testutil.NeedFUSE(t)
	dir := t.TempDir()
	fuseDir := filepath.Join(dir, "fuse")
	s := startService(t, dir, []string{"v"}, "--fuse-dir", fuseDir)
	img := filepath.Join(dir, "v.img")
	file := filepath.Join(fuseDir, "v")
	waitFile(t, file, "the volume's FUSE file")
	dev, detach := testutil.Attach(t, file, false, true)
	defer func() {
		detach()
		exec.Command("umount", "-l", fuseDir).Run()
	}()
	d, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for i := range buf {
		buf[i] = 0x5a
	}
	// O_DIRECT needs an aligned buffer: a page from mmap is.
	page, _ := syscall.Mmap(-1, 0, 4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	copy(page, buf)
	if _, err := d.WriteAt(page, 8192); err != nil {
		t.Fatal(err)
	}
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
	s.kill9()
	done := make(chan error, 1)
	go func() { _, err := d.ReadAt(page, 0); done <- err }()
	if err := testutil.Receive(t, done, "a loop device read after umbra serve died (does it hang?)"); err == nil {
		t.Fatal("read through a dead FUSE server succeeded")
	} else {
		t.Logf("loop device read failed after the kill: %v", err)
	}
	d.Close()
	detach()
	exec.Command("umount", "-l", fuseDir).Run()
	got, _ := os.ReadFile(img)
	if got[8192] != 0x5a || got[8192+4095] != 0x5a {
		t.Fatal("a flushed write is not on the origin after the crash")
	}
	s.start() // the mount comes back
	waitFile(t, file, "the FUSE file after a restart")
}

// TestCLIWriters: `umbra snapshot create --writers` on a volume whose ext4
// (on a loop device over the FUSE file) is mounted freezes it and runs the
// hooks; a failing hook aborts the set and `writers list` says why.
func TestCLIWriters(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE, loop devices and fsfreeze")
	}
	for _, tool := range []string{"losetup", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s", tool)
		}
	}
	dir := t.TempDir()
	hooks := filepath.Join(dir, "hooks")
	os.Mkdir(hooks, 0o755)
	log := filepath.Join(dir, "hook.log")
	os.WriteFile(filepath.Join(hooks, "10-log"), []byte("#!/bin/sh\necho \"$1 $UMBRA_SET\" >> "+log+"\n"), 0o755)
	fuseDir := filepath.Join(dir, "fuse")
	s := startService(t, dir, []string{"v"}, "--hooks-dir", hooks, "--fuse-dir", fuseDir)
	file := filepath.Join(fuseDir, "v")
	waitFile(t, file, "the volume's FUSE file")
	dev := testutil.Losetup(t, file, false, true)
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v %s", err, out)
	}
	if out, err := exec.Command("mount", dev, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v %s", err, out)
	}
	os.WriteFile(filepath.Join(mnt, "hello"), []byte("world"), 0o644)

	created := s.ok("snapshot", "create", "v", "--writers", "--id", "app")
	if !strings.Contains(created, "fsfreeze") || !strings.Contains(created, "exec:") {
		t.Fatalf("writers that took part:\n%s", created)
	}
	got, _ := os.ReadFile(log)
	if !strings.Contains(string(got), "freeze set-") || !strings.Contains(string(got), "thaw set-") {
		t.Fatalf("hooks did not run freeze and thaw:\n%s", got)
	}
	// The filesystem is thawed: writes go on.
	if err := os.WriteFile(filepath.Join(mnt, "after"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}

	os.WriteFile(filepath.Join(hooks, "20-fail"), []byte("#!/bin/sh\n[ \"$1\" = freeze ] && { echo no backups today >&2; exit 3; }\nexit 0\n"), 0o755)
	if out, code := s.umbra("snapshot", "create", "v", "--writers", "--id", "bad"); code == 0 {
		t.Fatalf("a failing hook did not abort the set:\n%s", out)
	}
	if l := s.list(); len(l.Snapshots) != 1 {
		t.Fatalf("the aborted set left snapshots: %+v", l)
	}
	ws := s.ok("writers", "list")
	if !strings.Contains(ws, "failed") || !strings.Contains(ws, "no backups today") {
		t.Fatalf("writers list does not show the failure:\n%s", ws)
	}
	if err := os.WriteFile(filepath.Join(mnt, "after2"), []byte("x"), 0o644); err != nil {
		t.Fatalf("filesystem left frozen after the abort: %v", err)
	}
}

// TestCLIMixedSet: one snapshot set over a COW volume, a reflink file and
// a btrfs subvolume (both on a btrfs made on a loop device).
func TestCLIMixedSet(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.btrfs", "btrfs")
	dir := t.TempDir()
	img := filepath.Join(dir, "b.img")
	testutil.SparseFile(t, img, 256<<20)
	dev := testutil.Losetup(t, img, false, false)
	testutil.Run(t, "mkfs.btrfs", "-q", "-f", dev)
	mnt := testutil.Mount(t, dev, dir)
	file := filepath.Join(mnt, "vm.img")
	os.WriteFile(file, []byte(strings.Repeat("v1", 4096)), 0o600)
	sub := filepath.Join(mnt, "home")
	testutil.Run(t, "btrfs", "subvolume", "create", sub)
	os.WriteFile(filepath.Join(sub, "notes"), []byte("v1"), 0o644)

	s := startService(t, dir, []string{"a"}, "--reflink-volume", file, "--btrfs-volume", sub)
	out := s.ok("providers", "list")
	for _, p := range []string{"cow", "reflink", "btrfs"} {
		if !strings.Contains(out, p) {
			t.Fatalf("providers list lacks %s:\n%s", p, out)
		}
	}
	s.ok("snapshot", "create", "a", file, sub, "--id", "mixed")
	os.WriteFile(file, []byte(strings.Repeat("v2", 4096)), 0o600)
	os.WriteFile(filepath.Join(sub, "notes"), []byte("v2"), 0o644)
	var l snapList
	json.Unmarshal([]byte(s.ok("snapshot", "list", file, "--json")), &l)
	if len(l.Snapshots) != 1 || l.Snapshots[0].ID != "mixed" {
		t.Fatalf("reflink snapshots: %+v", l)
	}
	setID := l.Snapshots[0].SetID
	json.Unmarshal([]byte(s.ok("snapshot", "list", "a", "--json")), &l)
	if len(l.Snapshots) != 1 || l.Snapshots[0].SetID != setID {
		t.Fatalf("the COW snapshot is not in the same set %s: %+v", setID, l)
	}
	if b, _ := os.ReadFile(filepath.Join(mnt, ".umbra-snapshots", "home", "mixed", "notes")); string(b) != "v1" {
		t.Fatalf("subvolume snapshot reads %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(mnt, ".umbra-shadow", "vm.img@mixed")); string(b[:2]) != "v1" {
		t.Fatalf("reflink snapshot reads %q", b[:2])
	}
	// The reflink snapshot is a read-only NBD export like any other.
	if _, err := exec.LookPath("qemu-io"); err == nil {
		uri := "nbd+unix:///" + file + "@mixed?socket=" + s.nbd
		out, err := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x76 0 1", "-c", "read -P 0x31 1 1", uri).CombinedOutput()
		if err != nil || strings.Contains(string(out), "failed") || strings.Contains(string(out), "Pattern verification") {
			t.Fatalf("reading the reflink snapshot over NBD: %v\n%s", err, out)
		}
	}
	s.ok("snapshot", "revert", file, "mixed")
	if b, _ := os.ReadFile(file); string(b[:2]) != "v1" {
		t.Fatal("revert of the reflink file did not restore it")
	}
	// A subvolume cannot be imaged: said before any snapshot is taken.
	s.ok("repo", "init", "--repo", filepath.Join(dir, "repo"))
	if out, code := s.umbra("backup", sub, "--repo", filepath.Join(dir, "repo")); code != 2 || !strings.Contains(out, "cannot be imaged") {
		t.Fatalf("backup of a btrfs subvolume: exit %d %s", code, out)
	}
	// The whole set goes at once, on every provider.
	out = s.ok("snapshot", "delete", "--set", setID)
	if strings.Count(out, "deleted ") != 3 {
		t.Fatalf("delete --set: %s", out)
	}
	for _, v := range []string{"a", file, sub} {
		json.Unmarshal([]byte(s.ok("snapshot", "list", v, "--json")), &l)
		if len(l.Snapshots) != 0 {
			t.Fatalf("snapshots of %s left after delete --set: %+v", v, l)
		}
	}
	s.stop() // before the unmount
}

// TestCLIBackup: umbra backup through the service — a full image, then an
// incremental one reading only what changed — restore, list and verify.
func TestCLIBackup(t *testing.T) {
	testutil.Need(t, "qemu-io")
	dir := t.TempDir()
	s := startService(t, dir, []string{"a"})
	repo := filepath.Join(dir, "repo")
	if out, code := s.umbra("backup", "a", "--repo", repo); code != 3 && code != 2 || !strings.Contains(out, "repo init") {
		t.Fatalf("backup into a missing repository: exit %d\n%s", code, out)
	}
	s.ok("repo", "init", "--repo", repo)
	uri := "nbd+unix:///a?socket=" + s.nbd
	qemuIO := func(cmd string) {
		if out, err := exec.Command("qemu-io", "-f", "raw", "-c", cmd, uri).CombinedOutput(); err != nil {
			t.Fatalf("qemu-io %s: %v %s", cmd, err, out)
		}
	}
	img := filepath.Join(dir, "a.img")
	qemuIO("write -P 0x11 0 1M")
	want1, _ := os.ReadFile(img)
	type result struct {
		Images []struct {
			Image       string `json:"image"`
			Snapshot    string `json:"snapshot"`
			Incremental bool   `json:"incremental"`
			BytesRead   int64  `json:"bytes_read"`
		} `json:"images"`
	}
	// A second repository (say, the off-site one) backed up in between
	// keeps its own base: neither repository's next image reads more
	// than what changed since its own last one.
	other := filepath.Join(dir, "other")
	s.ok("repo", "init", "--repo", other)
	var r1, r2, o1, o2 result
	json.Unmarshal([]byte(s.ok("backup", "a", "--repo", repo, "--json")), &r1)
	json.Unmarshal([]byte(s.ok("backup", "a", "--repo", other, "--json")), &o1)
	qemuIO("write -P 0x22 4M 64k")
	want2, _ := os.ReadFile(img)
	json.Unmarshal([]byte(s.ok("backup", "a", "--repo", repo, "--json")), &r2)
	json.Unmarshal([]byte(s.ok("backup", "a", "--repo", other, "--json")), &o2)
	if len(r1.Images) != 1 || r1.Images[0].Incremental || len(r2.Images) != 1 || !r2.Images[0].Incremental {
		t.Fatalf("backups: %+v then %+v", r1, r2)
	}
	if r2.Images[0].BytesRead != 65536 {
		t.Fatalf("the incremental image read %d bytes for a 64 KiB change", r2.Images[0].BytesRead)
	}
	if len(o2.Images) != 1 || !o2.Images[0].Incremental || o2.Images[0].BytesRead != 65536 {
		t.Fatalf("the other repository's second image: %+v (first %+v)", o2, o1)
	}
	for _, c := range []struct {
		id   string
		want []byte
	}{{r1.Images[0].Image, want1}, {r2.Images[0].Image, want2}} {
		out := filepath.Join(dir, "restored.img")
		s.ok("restore", c.id, "--repo", repo, "--to", out, "--force")
		got, _ := os.ReadFile(out)
		if !bytes.Equal(got, c.want) {
			t.Fatalf("image %s does not restore byte-identical", c.id)
		}
	}
	if out := s.ok("images", "list", "--repo", repo); strings.Count(out, "\na-") != 2 {
		t.Fatalf("images list:\n%s", out)
	}
	s.ok("verify", "--repo", repo)
	// Only each repository's newest backup snapshot stays, as the base of
	// its next image.
	if l := s.list(); len(l.Snapshots) != 2 || l.Snapshots[0].ID != r2.Images[0].Snapshot && l.Snapshots[1].ID != r2.Images[0].Snapshot ||
		l.Snapshots[0].ID != o2.Images[0].Snapshot && l.Snapshots[1].ID != o2.Images[0].Snapshot {
		t.Fatalf("snapshots after two backups into each of two repositories: %+v", l)
	}
}

// TestDemo runs the README's main job (the full path as root) and the
// engine alone (--engine-only): both scenarios reach their last step.
func TestDemo(t *testing.T) {
	full := "tracking" // the engine's last step
	if ok, _ := canRunFullDemo(); ok {
		full = "restore"
	}
	for _, c := range []struct {
		name, last string
		args       []string
	}{
		{"engine", "tracking", []string{"--engine-only"}},
		{"main", full, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			out, err := exec.Command(umbraBin, append([]string{"demo", "--dir", dir, "--size", "67108864", "--json"}, c.args...)...).CombinedOutput()
			if err != nil {
				t.Fatalf("umbra demo: %v\n%s", err, out)
			}
			var res struct {
				Dir   string     `json:"dir"`
				Steps []demoStep `json:"steps"`
			}
			if err := json.Unmarshal(out[bytes.IndexByte(out, '{'):], &res); err != nil {
				t.Fatalf("demo --json: %v\n%s", err, out)
			}
			if res.Dir != dir || len(res.Steps) == 0 || res.Steps[len(res.Steps)-1].Step != c.last {
				t.Fatalf("demo %v did not end with %q in %s: %s", c.args, c.last, dir, out)
			}
		})
	}
}
