package main

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"umbra/internal/testutil"
)

// TestCLIRevertInUse: a revert is refused while the volume is in use —
// its FUSE file open (as a loop device holds it), an NBD client
// connected — and the refusal names the users and what to do; --force
// reverts anyway; once the users are gone a plain revert works.
func TestCLIRevertInUse(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "qemu-io")
	testutil.NeedFUSE(t)
	dir := t.TempDir()
	fuseDir := filepath.Join(dir, "fuse")
	s := startService(t, dir, []string{"a"}, "--fuse-dir", fuseDir)
	file := filepath.Join(fuseDir, "a")
	waitFile(t, file, "the volume's FUSE file")
	refused := func(want ...string) {
		t.Helper()
		out, code := s.umbra("snapshot", "revert", "a", "one")
		if code == 0 {
			t.Fatal("revert of a volume in use was accepted")
		}
		t.Logf("refused: %s", out)
		for _, w := range append(want, "in use", "losetup -d") {
			if !strings.Contains(out, w) {
				t.Fatalf("revert refusal does not say %q:\n%s", w, out)
			}
		}
	}
	// The kernel releases a FUSE file and the server a connection a
	// moment after the client is gone.
	reverts := func() {
		t.Helper()
		var out string
		var code int
		for deadline := time.Now().Add(testutil.HangGuard); ; time.Sleep(20 * time.Millisecond) {
			if out, code = s.umbra("snapshot", "revert", "a", "one"); code == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("revert once the volume is free: exit %d for %v\n%s", code, testutil.HangGuard, out)
			}
		}
	}
	s.ok("snapshot", "create", "a", "--id", "one")

	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	refused("1 open FUSE file")
	if out := s.ok("volume", "list", "--json"); !strings.Contains(out, `"1 open FUSE file(s)"`) {
		t.Fatalf("volume list does not show the open FUSE file:\n%s", out)
	}
	f.Close()
	reverts()

	qio := exec.Command("qemu-io", "-f", "raw", "nbd+unix:///a?socket="+s.nbd)
	in, _ := qio.StdinPipe()
	out, _ := qio.StdoutPipe()
	if err := qio.Start(); err != nil {
		t.Fatal(err)
	}
	defer qio.Process.Kill()
	io.WriteString(in, "write -P 0x33 0 64k\n")
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.Contains(line, "wrote 65536/65536") {
		t.Fatalf("qemu-io write: %q %v", line, err)
	}
	refused("1 NBD connection")
	s.ok("snapshot", "revert", "a", "one", "--force")
	in.Close()
	qio.Wait()
	reverts()
	b := make([]byte, 65536)
	if g, err := os.Open(file); err != nil {
		t.Fatal(err)
	} else {
		g.ReadAt(b, 0)
		g.Close()
	}
	if strings.Count(string(b), "\x33") != 0 {
		t.Fatal("the forced revert did not roll back the NBD client's write")
	}
}
