package main

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"umbra/backup"
	"umbra/internal/testutil"
)

// run runs the CLI with extra environment and returns stdout, stderr and
// the exit code.
func (s *service) run(env []string, args ...string) (string, string, int) {
	s.t.Helper()
	cmd := exec.Command(umbraBin, append([]string{"--api-socket", s.api}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return stdout.String(), stderr.String(), ee.ExitCode()
	}
	if err != nil {
		s.t.Fatal(err)
	}
	return stdout.String(), stderr.String(), 0
}

// TestCLIRepository: an encrypted repository through the CLI and the
// service — progress events, wrong password, a locked repository, prune,
// stats, and an image mounted in place and read over NBD.
func TestCLIRepository(t *testing.T) {
	testutil.Need(t, "qemu-io")
	testutil.Need(t, "qemu-img")
	dir := t.TempDir()
	s := startService(t, dir, []string{"a"})
	repo := filepath.Join(dir, "repo")
	pwFile := filepath.Join(dir, "pw")
	os.WriteFile(pwFile, []byte("hunter2 but longer\n"), 0o600)
	pw := []string{"--repo", repo, "--password-file", pwFile}
	var cfg backup.Config
	json.Unmarshal([]byte(s.ok(append([]string{"repo", "init", "--json"}, pw...)...)), &cfg)
	if cfg.Encryption != "aes-256-gcm" || cfg.ChunkSize != 4096 {
		t.Fatalf("repo init: %+v", cfg)
	}
	uri := "nbd+unix:///a?socket=" + s.nbd
	write := func(pattern, off string) {
		if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P "+pattern+" "+off+" 1M", uri).CombinedOutput(); err != nil {
			t.Fatalf("qemu-io: %v %s", err, out)
		}
	}
	write("0x33", "0")
	stdout, stderr, code := s.run(nil, append([]string{"backup", "a", "--json"}, pw...)...)
	if code != 0 {
		t.Fatalf("backup: exit %d\n%s%s", code, stdout, stderr)
	}
	var ev struct {
		Event string `json:"event"`
		Item  string `json:"item"`
		Done  int64  `json:"done"`
		Total int64  `json:"total"`
	}
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &ev); err != nil || ev.Event != "progress" || ev.Item != "a" || ev.Done != ev.Total || ev.Total != 16<<20 {
		t.Fatalf("--json progress on stderr: %q (%v)", stderr, err)
	}

	// Wrong or missing password: a clear error, nothing written.
	_, stderr, code = s.run([]string{"UMBRA_PASSWORD=wrong"}, "backup", "a", "--repo", repo)
	if code == 0 || !strings.Contains(stderr, "wrong password") {
		t.Fatalf("backup with a wrong password: exit %d %s", code, stderr)
	}
	_, stderr, code = s.run(nil, "images", "list", "--repo", repo)
	if code == 0 || !strings.Contains(stderr, "password") {
		t.Fatalf("images list without a password: exit %d %s", code, stderr)
	}

	// A repository locked by a prune elsewhere: the backup says by whom.
	held, err := backup.OpenWith(context.Background(), repo, backup.Settings{Password: "hunter2 but longer"})
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := held.Lock(context.Background(), "prune", true)
	if err != nil {
		t.Fatal(err)
	}
	_, stderr, code = s.run(nil, append([]string{"backup", "a"}, pw...)...)
	if code == 0 || !strings.Contains(stderr, "locked") || !strings.Contains(stderr, "prune") {
		t.Fatalf("backup into a locked repository: exit %d %s", code, stderr)
	}
	unlock()
	held.Close()

	for _, p := range []string{"0x44", "0x55"} {
		write(p, "2M")
		s.ok(append([]string{"backup", "a"}, pw...)...)
	}
	want, _ := os.ReadFile(filepath.Join(dir, "a.img"))
	var images []backup.Image
	json.Unmarshal([]byte(s.ok(append([]string{"images", "list", "--json"}, pw...)...)), &images)
	if len(images) != 3 || images[2].Parent != images[1].ID {
		t.Fatalf("images: %+v", images)
	}
	var pr backup.PruneReport
	json.Unmarshal([]byte(s.ok(append([]string{"prune", "--keep-last", "2", "--json"}, pw...)...)), &pr)
	if len(pr.Removed) != 1 || len(pr.Kept) != 2 || pr.Removed[0] != images[0].ID {
		t.Fatalf("prune: %+v", pr)
	}
	if _, stderr, code := s.run(nil, append([]string{"images", "delete", images[1].ID, "v-19700101T000000Z"}, pw...)...); code == 0 || !strings.Contains(stderr, "v-19700101T000000Z") {
		t.Fatalf("images delete with an unknown image: exit %d, %s", code, stderr)
	}
	var dr backup.PruneReport
	json.Unmarshal([]byte(s.ok(append([]string{"images", "delete", images[1].ID, "--json"}, pw...)...)), &dr)
	if len(dr.Removed) != 1 || dr.Removed[0] != images[1].ID || len(dr.Kept) != 1 || dr.Kept[0] != images[2].ID {
		t.Fatalf("images delete: %+v", dr)
	}
	if _, _, code := s.run(nil, append([]string{"prune"}, pw...)...); code != 2 {
		t.Fatalf("prune without a keep rule: exit %d, want 2", code)
	}
	var st backup.RepoStats
	json.Unmarshal([]byte(s.ok(append([]string{"stats", "--json"}, pw...)...)), &st)
	// The incremental left has one segment, its parent's base and a patch.
	if st.Images != 1 || st.Encryption != "aes-256-gcm" || st.Chunks == 0 || st.Format != 8 || st.HashBytes != 16 || st.ListSegments != 1 || st.ListObjects != 2 ||
		st.Level != "fastest" || st.Encoder != "c" && st.Encoder != "go" {
		t.Fatalf("stats: %+v", st)
	}

	// Mount the image in place and compare it over NBD with the volume
	// as it was backed up.
	id := images[2].ID
	sock := filepath.Join(dir, "img.sock")
	mount := exec.Command(umbraBin, append([]string{"mount", id, "--socket", sock}, pw...)...)
	mount.Stderr = os.Stderr
	if err := mount.Start(); err != nil {
		t.Fatal(err)
	}
	defer mount.Process.Kill()
	waitFile(t, sock, "umbra mount's NBD socket")
	ref := filepath.Join(dir, "want.img")
	os.WriteFile(ref, want, 0o600)
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", ref, "nbd+unix:///"+id+"?socket="+sock).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare with the mounted image: %v\n%s", err, out)
	}
	if c, err := net.Dial("unix", sock); err == nil {
		c.Close()
	}
	mount.Process.Signal(syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- mount.Wait() }()
	if err := testutil.Receive(t, done, "umbra mount stops on SIGINT"); err != nil {
		t.Fatalf("umbra mount after Ctrl-C: %v", err)
	}
}

// TestCLIBackupS3: backup through the service into an S3 repository on a
// real S3 server, credentials from the CLI's environment; restore from it.
func TestCLIBackupS3(t *testing.T) {
	testutil.Need(t, "qemu-io")
	s3 := testutil.StartS3(t)
	dir := t.TempDir()
	s := startService(t, dir, []string{"a"})
	loc := s3.Location("fleet")
	if out, _, code := s.run(s3.Env(), "repo", "init", "--repo", loc); code != 0 {
		t.Fatalf("repo init on S3: exit %d %s", code, out)
	}
	if _, stderr, code := s.run(nil, "images", "list", "--repo", loc); code == 0 || !strings.Contains(stderr, "AWS_ACCESS_KEY_ID") {
		t.Fatalf("S3 without credentials: exit %d %s", code, stderr)
	}
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x66 1M 3M", "nbd+unix:///a?socket="+s.nbd).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	want, _ := os.ReadFile(filepath.Join(dir, "a.img"))
	out, stderr, code := s.run(s3.Env(), "backup", "a", "--repo", loc, "--json")
	if code != 0 {
		t.Fatalf("backup to S3: exit %d %s %s", code, out, stderr)
	}
	var resp struct {
		Images []struct {
			Image string `json:"image"`
		} `json:"images"`
	}
	json.Unmarshal([]byte(out), &resp)
	restored := filepath.Join(dir, "restored.img")
	if out, stderr, code := s.run(s3.Env(), "restore", resp.Images[0].Image, "--repo", loc, "--to", restored); code != 0 {
		t.Fatalf("restore from S3: exit %d %s %s", code, out, stderr)
	}
	got, _ := os.ReadFile(restored)
	if string(got) != string(want) {
		t.Fatal("the image from S3 does not restore byte-identical")
	}
}
