package main

import (
	"bufio"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"umbra/internal/testutil"
)

// TestCLIDeleteInUse: deleting a shadow copy is refused while it is in
// use — a read-only loop device over its FUSE file, an NBD client
// connected to it, an exposure — naming the users and what to do, and
// --all deletes nothing then; the loop device reads on. --force deletes
// anyway and says what it cut off (the NBD client's next read fails);
// once the users are gone a plain delete works.
func TestCLIDeleteInUse(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.NeedFUSE(t)
	testutil.Need(t, "losetup", "nbdsh")
	dir := t.TempDir()
	fuseDir := filepath.Join(dir, "fuse")
	s := startService(t, dir, []string{"a"}, "--fuse-dir", fuseDir)
	waitFile(t, filepath.Join(fuseDir, "a"), "the volume's FUSE file")
	s.ok("snapshot", "create", "a", "--id", "one")
	s.ok("snapshot", "create", "a", "--id", "two")

	refused := func(args []string, want ...string) {
		t.Helper()
		out, code := s.umbra(append([]string{"snapshot", "delete"}, args...)...)
		if code == 0 {
			t.Fatalf("delete %v of a snapshot in use was accepted:\n%s", args, out)
		}
		for _, w := range append(want, "in use", "losetup -d", "--force", "nothing was deleted") {
			if !strings.Contains(out, w) {
				t.Fatalf("delete refusal does not say %q:\n%s", w, out)
			}
		}
		if n := len(s.list().Snapshots); n != 2 {
			t.Fatalf("a refused delete left %d snapshots, want 2", n)
		}
	}
	users := func(id string) []string {
		t.Helper()
		var l struct {
			Snapshots []struct {
				ID    string   `json:"id"`
				Users []string `json:"users"`
			} `json:"snapshots"`
		}
		if err := json.Unmarshal([]byte(s.ok("snapshot", "list", "--json")), &l); err != nil {
			t.Fatal(err)
		}
		for _, sn := range l.Snapshots {
			if sn.ID == id {
				return sn.Users
			}
		}
		t.Fatalf("snapshot %s not listed", id)
		return nil
	}
	// The kernel lets go of a FUSE file, and the server of a connection, a
	// moment after the client is gone (bounded only against a hang).
	free := func(id string) {
		t.Helper()
		for i := 0; len(users(id)) > 0; i++ {
			if i == 3000 {
				t.Fatalf("snapshot %s still in use by %v", id, users(id))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	// A loop device over the snapshot's FUSE file.
	dev, detach := testutil.Attach(t, filepath.Join(fuseDir, "a@one"), true, false)
	defer detach()
	refused([]string{"a", "one"}, "a@one (1 open FUSE file(s))")
	refused([]string{"a", "--all"}, "a@one")
	if u := users("one"); len(u) != 1 || u[0] != "1 open FUSE file(s)" {
		t.Fatalf("snapshot list users: %v", u)
	}
	if out := s.ok("snapshot", "list"); !strings.Contains(out, "IN USE BY") || !strings.Contains(out, "1 open FUSE file(s)") {
		t.Fatalf("snapshot list does not show who uses the snapshot:\n%s", out)
	}
	b := make([]byte, 4096)
	if f, err := os.Open(dev); err != nil {
		t.Fatal(err)
	} else if _, err := f.ReadAt(b, 1<<20); err != nil {
		t.Fatalf("the loop device's read after a refused delete: %v", err)
	} else {
		f.Close()
	}
	detach()
	free("one")

	// An NBD client connected to it, kept open.
	nbd := exec.Command("nbdsh", "-u", "nbd+unix:///a@one?socket="+s.nbd, "-c", `
import sys
h.pread(4096, 0)
print("connected", flush=True)
sys.stdin.readline()
try:
    h.pread(4096, 0)
    print("read ok", flush=True)
except Exception as e:
    print("read failed:", e, flush=True)
`)
	// nbdsh runs the first python3 on PATH: Debian's, with libnbd's module.
	nbd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	in, _ := nbd.StdinPipe()
	outp, _ := nbd.StdoutPipe()
	nbd.Stderr = os.Stderr
	if err := nbd.Start(); err != nil {
		t.Fatal(err)
	}
	defer nbd.Process.Kill()
	rd := bufio.NewReader(outp)
	if line, err := rd.ReadString('\n'); err != nil || line != "connected\n" {
		t.Fatalf("nbdsh: %q %v", line, err)
	}
	refused([]string{"a", "one"}, "a@one (1 NBD connection(s))")

	// An exposure.
	s.ok("snapshot", "expose", "a", "two", "--no-mount")
	refused([]string{"a", "two"}, "a@two (exposed as NBD export a@two)")

	// Deleting the storage association deletes its shadow copies: refused
	// the same way.
	if out, code := s.umbra("storage", "delete", "a"); code == 0 || !strings.Contains(out, "a@one (1 NBD connection(s))") || !strings.Contains(out, "snapshot delete a --all --force") {
		t.Fatalf("storage delete while its snapshots are in use: exit %d\n%s", code, out)
	}
	if n := len(s.list().Snapshots); n != 2 {
		t.Fatalf("a refused storage delete left %d snapshots, want 2", n)
	}

	out := s.ok("snapshot", "delete", "a", "--all", "--force", "--json")
	var resp struct {
		Snapshots []string `json:"snapshots"`
		CutOff    []string `json:"cut_off"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if strings.Join(resp.Snapshots, ",") != "a@one,a@two" ||
		strings.Join(resp.CutOff, ";") != "a@one: 1 NBD connection(s);a@two: exposed as NBD export a@two" {
		t.Fatalf("forced delete: %+v", resp)
	}
	io.WriteString(in, "\n")
	line, _ := rd.ReadString('\n')
	if !strings.HasPrefix(line, "read failed") {
		t.Fatalf("the NBD client cut off by the forced delete: %q", line)
	}
	in.Close()
	nbd.Wait()

	// Free snapshots delete without --force.
	s.ok("snapshot", "create", "a", "--id", "three")
	s.ok("snapshot", "delete", "a", "three")
	if n := len(s.list().Snapshots); n != 0 {
		t.Fatalf("%d snapshots left", n)
	}
}
