package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/backup"
	"umbra/internal/testutil"
)

// TestJobsSyncToS3: a backup job into a local repository and a sync job
// copying it into an encrypted repository on versitygw, both every two
// seconds in a real service; once a sync has run after the last backup,
// the target holds every image of the source and they restore from it
// as from the source.
func TestJobsSyncToS3(t *testing.T) {
	testutil.Need(t, "qemu-io")
	dir := t.TempDir()
	v := testutil.StartS3(t)
	for _, e := range v.Env() {
		k, val, _ := strings.Cut(e, "=")
		t.Setenv(k, val) // the service's S3 credentials, and the CLI's
	}
	repo := filepath.Join(dir, "repo")
	offsite := v.Location("offsite")
	pw := filepath.Join(dir, "offsite.pw")
	os.WriteFile(pw, []byte("offsite secret\n"), 0o600)
	cfg := writeConfig(t, dir, `
[[job]]
name = "bk"
kind = "backup"
schedule = "*:*:0/2"
volumes = ["a"]
repo = "`+repo+`"
disabled = true

[[job]]
name = "offsite"
kind = "sync"
schedule = "*:*:0/2"
repo = "`+repo+`"
to = "`+offsite+`"
to_password_file = "`+pw+`"
disabled = true
`)
	s := startService(t, dir, []string{"a"}, "--config", cfg)
	s.ok("repo", "init", "--repo", repo)
	s.ok("repo", "init", "--repo", offsite, "--password-file", pw)
	uri := "nbd+unix:///a?socket=" + s.nbd
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 2M", uri).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	s.ok("jobs", "enable", "bk")
	s.ok("jobs", "enable", "offsite")
	s.waitRuns("offsite", "two syncs that copied an image", func(r []jobRun) bool {
		return count(r, func(r jobRun) bool { return r.Result == "success" && !strings.HasPrefix(r.Detail, "0 images copied") }) >= 2
	})
	s.ok("jobs", "disable", "bk")
	bk := s.waitRuns("bk", "the last backup to end", func(r []jobRun) bool { return len(r) > 0 && r[0].Result != "running" })
	// A sync that started after the last backup ended has copied it.
	runs := s.waitRuns("offsite", "a sync after the last backup", func(r []jobRun) bool {
		return r[0].Result == "success" && r[0].Start.After(bk[0].End)
	})
	s.ok("jobs", "disable", "offsite")
	if n := count(runs, func(r jobRun) bool { return r.Result == "failed" }); n > 0 {
		t.Fatalf("sync runs failed:\n%+v", runs)
	}
	var src, dst []backup.Image
	json.Unmarshal([]byte(s.ok("images", "list", "--repo", repo, "--json")), &src)
	stdout, stderr, code := s.run([]string{"UMBRA_PASSWORD=offsite secret"}, "images", "list", "--repo", offsite, "--json")
	if code != 0 {
		t.Fatalf("images list of the target: exit %d %s", code, stderr)
	}
	json.Unmarshal([]byte(stdout), &dst)
	if len(src) < 2 || len(dst) != len(src) {
		t.Fatalf("%d images in the source, %d in the target", len(src), len(dst))
	}
	for i := range src {
		if src[i].ID != dst[i].ID {
			t.Fatalf("image %d: %s in the source, %s in the target", i, src[i].ID, dst[i].ID)
		}
	}
	last := src[len(src)-1].ID
	a, b := filepath.Join(dir, "a.out"), filepath.Join(dir, "b.out")
	s.ok("restore", last, "--repo", repo, "--to", a)
	if _, se, code := s.run([]string{"UMBRA_PASSWORD=offsite secret"}, "restore", last, "--repo", offsite, "--to", b); code != 0 {
		t.Fatalf("restore from the target: %s", se)
	}
	ab, _ := os.ReadFile(a)
	bb, _ := os.ReadFile(b)
	if !bytes.Equal(ab, bb) || len(ab) != 16<<20 || ab[1<<20] != 0x5a {
		t.Fatalf("image %s restores from the target different from the source", last)
	}
}
