package testutil

import (
	"bufio"
	"os/exec"
	"testing"
)

// HoldLock has another process (flock(1)) hold an exclusive flock on
// path (a file or a directory) until the test ends, as a second Umbra
// service would, and returns that process's pid.
func HoldLock(t testing.TB, path string) int {
	t.Helper()
	Need(t, "flock")
	cmd := exec.Command("flock", "--exclusive", "--nonblock", path, "sh", "-c", "echo locked; exec cat")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); cmd.Wait() })
	if line, _ := bufio.NewReader(stdout).ReadString('\n'); line != "locked\n" {
		t.Fatalf("flock %s did not take the lock (it said %q)", path, line)
	}
	return cmd.Process.Pid
}
