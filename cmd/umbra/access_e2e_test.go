package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/internal/testutil"
)

// TestUnixSocketRefusesOtherUser: a user who is neither root nor the
// service's own user is refused by the API socket with exit 5 and a
// message that says who is admitted; when the socket lets the user
// connect, the service writes the refusal to its audit log. The user is
// a real one (nobody), the CLI run with runuser.
func TestUnixSocketRefusesOtherUser(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "runuser")
	dir := t.TempDir()
	// nobody must reach the binary and the sockets' directory.
	for _, d := range []string{filepath.Dir(umbraBin), filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	s := startService(t, dir, []string{"v"})
	asNobody := func(args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command("runuser", append([]string{"-u", "nobody", "--", umbraBin, "--api-socket", s.api}, args...)...)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return string(out), ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return string(out), 0
	}
	// The socket as the service makes it (0660, root's): nobody cannot
	// connect, and the CLI says so (nothing reaches the service to audit).
	out, code := asNobody("snapshot", "list")
	if code != 5 || !strings.Contains(out, "permission denied on the API socket") {
		t.Fatalf("nobody on a 0660 socket: exit %d, want 5:\n%s", code, out)
	}
	// A socket nobody can connect to (as for a group the operator let in):
	// the service itself refuses the uid, says why, and audits it.
	if err := os.Chmod(s.api, 0o666); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"snapshot", "list"}, {"snapshot", "create", "v", "--id", "x"}} {
		out, code := asNobody(args...)
		if code != 5 || !strings.Contains(out, "uid 65534 may not use") || !strings.Contains(out, "root and the service's own user") {
			t.Fatalf("nobody %v: exit %d, want 5 with the reason:\n%s", args, code, out)
		}
	}
	if l := s.list(); len(l.Snapshots) != 0 {
		t.Fatalf("a refused create made snapshots: %+v", l)
	}
	audit, err := os.ReadFile(filepath.Join(dir, "state", "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	var refused int
	for _, line := range strings.Split(string(audit), "\n") {
		if strings.Contains(line, `"who":"unix:uid=65534"`) && strings.Contains(line, `"result":"PermissionDenied"`) {
			refused++
		}
	}
	if refused != 2 {
		t.Fatalf("%d audit lines of nobody's refused calls, want 2:\n%s", refused, audit)
	}
	// Root still gets in.
	s.ok("snapshot", "create", "v", "--id", "mine")
}
