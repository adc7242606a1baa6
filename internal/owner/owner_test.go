package owner

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A second open file description of a claimed file is refused, even in
// the same process, and the error names the file and the holder.
func TestClaimRefusesSecondOpener(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vol.img")
	if err := os.WriteFile(path, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := Claim(a, "volume file", path, "stop it first"); err != nil {
		t.Fatalf("first claim: %v", err)
	}
	b, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	err = Claim(b, "volume file", path, "stop it first")
	var he *HeldError
	if !errors.As(err, &he) || !errors.Is(err, ErrHeld) {
		t.Fatalf("second claim: got %v, want a HeldError", err)
	}
	if he.PID != os.Getpid() {
		t.Errorf("holder pid %d, want %d (this process)", he.PID, os.Getpid())
	}
	for _, want := range []string{"volume file " + path, "this process", "stop it first"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	// The claim goes with the descriptor.
	a.Close()
	if err := Claim(b, "volume file", path, ""); err != nil {
		t.Fatalf("claim after the holder closed: %v", err)
	}
}

// A directory claimed by another process (flock(1) here) is refused with
// that process's pid; claims within this process share the lock.
func TestClaimDirOtherProcess(t *testing.T) {
	if _, err := exec.LookPath("flock"); err != nil {
		t.Skip("flock(1) (util-linux) is not installed")
	}
	root := t.TempDir()
	shared := filepath.Join(root, "shadow")
	d1, err := ClaimDir(shared, "shadow storage directory", "")
	if err != nil {
		t.Fatal(err)
	}
	d2, err := ClaimDir(shared, "shadow storage directory", "")
	if err != nil {
		t.Fatalf("second claim in the same process: %v", err)
	}
	d1.Release()
	d1.Release() // a second release must not drop d2's share
	if len(dirs) != 1 {
		t.Fatalf("%d directories claimed after one of two releases, want 1", len(dirs))
	}
	d2.Release()
	if len(dirs) != 0 {
		t.Fatalf("%d directories claimed after both releases, want 0", len(dirs))
	}

	held := filepath.Join(root, "held")
	if err := os.Mkdir(held, 0o700); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("flock", "--exclusive", "--nonblock", held, "sh", "-c", "echo locked; exec cat")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	if line, _ := bufio.NewReader(stdout).ReadString('\n'); line != "locked\n" {
		t.Fatalf("flock(1) said %q", line)
	}
	_, err = ClaimDir(held, "state directory", "give another --state-dir")
	var he *HeldError
	if !errors.As(err, &he) {
		t.Fatalf("claim of a directory another process holds: got %v, want a HeldError", err)
	}
	if he.PID != cmd.Process.Pid {
		t.Errorf("holder pid %d, want flock's %d", he.PID, cmd.Process.Pid)
	}
	if !strings.Contains(err.Error(), "state directory "+held) || !strings.Contains(err.Error(), "give another --state-dir") {
		t.Errorf("error %q does not name the directory and what to do", err)
	}
	stdin.Close()
	cmd.Wait()
	d, err := ClaimDir(held, "state directory", "")
	if err != nil {
		t.Fatalf("claim after the holder exited: %v", err)
	}
	d.Release()
}

func TestHolderParse(t *testing.T) {
	locks := filepath.Join(t.TempDir(), "locks")
	content := `1: OFDLCK ADVISORY  WRITE -1 fe:00:77 0 EOF
2: FLOCK  ADVISORY  WRITE 4242 fe:00:77 0 EOF
2: -> FLOCK  ADVISORY  WRITE 5151 fe:00:77 0 EOF
3: FLOCK  ADVISORY  WRITE 99 08:01:1234 0 EOF
4: POSIX  ADVISORY  WRITE 7 00:2f:555 0 EOF
`
	if err := os.WriteFile(locks, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	dev := func(maj, mnr uint32) uint64 { return uint64(maj)<<8 | uint64(mnr) }
	for _, c := range []struct {
		dev, ino uint64
		want     int
	}{
		{dev(0xfe, 0), 77, 4242},
		{dev(8, 1), 1234, 99},
		{dev(0, 0x30), 1234, 99}, // another device number (btrfs subvolume): the inode alone
		{dev(0, 0x2f), 555, 0},   // a POSIX lock is not a claim
		{dev(8, 1), 1, 0},
	} {
		if got := holder(locks, c.dev, c.ino); got != c.want {
			t.Errorf("holder(%x, %d) = %d, want %d", c.dev, c.ino, got, c.want)
		}
	}
}
