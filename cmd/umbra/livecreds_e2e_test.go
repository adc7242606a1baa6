package main

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"umbra/internal/testutil"
)

// TestLiveRestoreCredentials: a live restore from an encrypted
// repository keeps no secret in the state directory: its record (0600)
// names the password file, not the password. Killed with -9 and started
// again without that file, the restore waits for credentials (in `volume
// list`); a wrong password given again is refused, the right one resumes
// it, and it ends with the image in the target. A record written with
// the secrets by an older Umbra is read, and rewritten without them.
func TestLiveRestoreCredentials(t *testing.T) {
	dir := t.TempDir()
	src := testutil.SparseFile(t, filepath.Join(dir, "src.img"), 4<<20)
	data := make([]byte, 3<<20)
	r := rand.New(rand.NewPCG(41, 42))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	os.WriteFile(src, data, 0o600) // and zeros after
	os.Truncate(src, 4<<20)
	pwFile := filepath.Join(dir, "pw")
	const password = "correct horse battery staple"
	os.WriteFile(pwFile, []byte(password+"\n"), 0o600)
	s := startService(t, dir, []string{"src"})
	repo := filepath.Join(dir, "repo")
	s.ok("repo", "init", "--repo", repo, "--password-file", pwFile)
	var resp struct {
		Images []struct {
			Image string `json:"image"`
		} `json:"images"`
	}
	json.Unmarshal([]byte(s.ok("backup", "src", "--repo", repo, "--password-file", pwFile, "--json")), &resp)
	if len(resp.Images) != 1 {
		t.Fatalf("backup: %+v", resp)
	}
	id := resp.Images[0].Image
	target := filepath.Join(dir, "dst.img")
	s.ok("restore", id, "--live", "--to", target, "--volume", "dst", "--repo", repo, "--password-file", pwFile, "--rate", "1")

	record := filepath.Join(dir, "state", "live", "dst.json")
	b, err := os.ReadFile(record)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte(password)) || bytes.Contains(b, []byte(`"password"`)) {
		t.Fatalf("the live restore record holds the password:\n%s", b)
	}
	if !bytes.Contains(b, []byte(pwFile)) {
		t.Fatalf("the live restore record does not name the password file:\n%s", b)
	}
	if fi, _ := os.Stat(record); fi.Mode().Perm() != 0o600 {
		t.Fatalf("the live restore record is %v, want 0600", fi.Mode().Perm())
	}

	// A restart without the password file: the restore waits for
	// credentials.
	s.kill9()
	os.Rename(pwFile, pwFile+".away")
	s.start()
	waitState := func(want string) {
		t.Helper()
		testutil.WaitFor(t, "live restore state "+want, func() bool {
			v := s.liveVolume("dst")
			return v.LiveRestore != nil && v.LiveRestore.State == want
		})
	}
	waitState("waiting for credentials")
	if v := s.liveVolume("dst"); !strings.Contains(v.LiveRestore.Error, "restore "+id+" --live") {
		t.Fatalf("waiting for credentials, the error does not say how to give them: %q", v.LiveRestore.Error)
	}
	wrong := filepath.Join(dir, "wrong")
	os.WriteFile(wrong, []byte("not it\n"), 0o600)
	if out, code := s.umbra("restore", id, "--live", "--to", target, "--volume", "dst", "--repo", repo, "--password-file", wrong, "--json"); code == 0 || !strings.Contains(out, "password") {
		t.Fatalf("a wrong password given again: exit %d %s", code, out)
	}
	os.Rename(pwFile+".away", pwFile)
	s.ok("restore", id, "--live", "--to", target, "--volume", "dst", "--repo", repo, "--password-file", pwFile, "--rate", "1")
	waitState("paused")

	// A version 1 record, with the password in it: read, and rewritten
	// without it; the restore goes on with the password in memory.
	s.kill9()
	var rec map[string]any
	b, _ = os.ReadFile(record)
	json.Unmarshal(b, &rec)
	rec["version"], rec["password"], rec["rate"] = 1, password, 0
	delete(rec, "password_file")
	b, _ = json.Marshal(rec)
	os.WriteFile(record, b, 0o600)
	os.Rename(pwFile, pwFile+".away")
	s.start()
	if b, _ := os.ReadFile(record); bytes.Contains(b, []byte(password)) {
		t.Fatalf("a version 1 record keeps its password after a start:\n%s", b)
	}
	s.waitLiveDone("dst")
	got, _ := os.ReadFile(target)
	want, _ := os.ReadFile(src)
	if !bytes.Equal(got, want) {
		t.Fatal("the live-restored target is not the image")
	}
}
