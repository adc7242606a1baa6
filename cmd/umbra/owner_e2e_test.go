package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/internal/testutil"
)

// TestSecondServiceRefused: while one `umbra serve` owns a volume file,
// its state directory, its shadow storage and its sockets, a second
// `umbra serve` given any of them is refused at start, with an error that
// names the file and the first service's pid, and the first service's
// snapshot and volume are as they were (one owner, DESIGN invariant 10).
func TestSecondServiceRefused(t *testing.T) {
	testutil.Need(t, "qemu-io")
	dir := t.TempDir()
	var extra []string
	fuse := os.Geteuid() == 0 && fileExists("/dev/fuse")
	if fuse {
		extra = append(extra, "--fuse-dir", filepath.Join(dir, "fuse"))
	}
	s := startService(t, dir, []string{"dup"}, extra...)
	pid := s.cmd.Process.Pid
	uri := func(export string) string { return "nbd+unix:///" + export + "?socket=" + s.nbd }
	qemuIO := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("qemu-io", append([]string{"-f", "raw"}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-io %v: %v\n%s", args, err, out)
		}
	}
	qemuIO("-c", "write -P 0xaa 0 1M", uri("dup"))
	s.ok("snapshot", "create", "dup", "--persistent", "--id", "keep")
	qemuIO("-c", "write -P 0xbb 0 64k", uri("dup"))

	img := filepath.Join(dir, "dup.img")
	other := func(name string) []string {
		d := filepath.Join(dir, name)
		return []string{"--state-dir", filepath.Join(d, "state"), "--nbd-socket", filepath.Join(d, "nbd.sock"), "--api-socket", filepath.Join(d, "api.sock")}
	}
	if err := os.MkdirAll(filepath.Join(dir, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	testutil.SparseFile(t, filepath.Join(dir, "x", "other.img"), 16<<20)
	otherVol := "--volume=o=" + filepath.Join(dir, "x", "other.img")
	cases := []struct {
		name string
		args []string
		want string // what the refusal names
	}{
		{"same volume file", append(other("b"), "--volume", "dup="+img), "volume file " + img},
		{"same state directory", []string{"--state-dir", filepath.Join(dir, "state"), "--nbd-socket", filepath.Join(dir, "c-nbd.sock"), "--api-socket", filepath.Join(dir, "c-api.sock"), otherVol}, "state directory " + filepath.Join(dir, "state")},
		{"same shadow storage", append(other("d"), otherVol, "--storage", filepath.Join(dir, "state", "shadow")), "shadow storage directory " + filepath.Join(dir, "state", "shadow")},
		{"same NBD socket", []string{"--state-dir", filepath.Join(dir, "e", "state"), "--nbd-socket", s.nbd, "--api-socket", filepath.Join(dir, "e-api.sock"), otherVol}, "NBD socket " + s.nbd},
		{"same API socket", []string{"--state-dir", filepath.Join(dir, "f", "state"), "--nbd-socket", filepath.Join(dir, "f-nbd.sock"), "--api-socket", s.api, otherVol}, "API socket " + s.api},
	}
	if fuse {
		cases = append(cases, struct {
			name string
			args []string
			want string
		}{"same FUSE directory", append(other("g"), otherVol, "--fuse-dir", filepath.Join(dir, "fuse")), "FUSE directory " + filepath.Join(dir, "fuse")})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out, code := serveRefused(t, c.args)
			if code != 1 {
				t.Errorf("exit code %d, want 1", code)
			}
			holder := fmt.Sprintf("in use by pid %d", pid)
			if strings.HasPrefix(c.want, "FUSE") {
				holder = "in use by another process" // a FUSE mount does not say whose it is
			}
			for _, want := range []string{c.want, holder, "or stop"} {
				if !strings.Contains(out, want) {
					t.Errorf("refusal does not say %q:\n%s", want, out)
				}
			}
		})
	}
	// The first service still serves, its snapshot unchanged.
	if l := s.list(); len(l.Snapshots) != 1 || !l.Snapshots[0].Valid {
		t.Fatalf("the first service's snapshots after the refusals: %+v", l)
	}
	qemuIO("-r", "-c", "read -P 0xaa 0 1M", uri("dup@keep"))
	qemuIO("-r", "-c", "read -P 0xbb 0 64k", "-c", "read -P 0xaa 64k 960k", uri("dup"))
}

// serveRefused runs `umbra serve` with args and expects it to exit
// before it serves; it returns its output and exit code. A service that
// comes up (logs that it serves the API) fails the test.
func serveRefused(t *testing.T, args []string) (string, int) {
	t.Helper()
	cmd := exec.Command(umbraBin, append([]string{"serve"}, args...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		if strings.Contains(sc.Text(), "serving the management API") {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("the second service started:\n%s", out.String())
		}
	}
	cmd.Wait()
	return out.String(), cmd.ProcessState.ExitCode()
}

func fileExists(path string) bool { _, err := os.Stat(path); return err == nil }
