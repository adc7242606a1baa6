// Package testutil holds helpers for tests that use the real kernel
// path: loop devices, mounts, filesystems, fsfreeze. Every helper skips
// the test with a message when root or a tool is missing, and registers
// cleanups that tear down in order (umount, losetup -d, then the caller's
// FUSE unmount and server stop, registered earlier, run after).
package testutil

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"umbra/expose"
)

// ReflinkFS is a filesystem that shares extents (FICLONE), made by
// Mkfs (the command and its flags, without the device) and mounted with
// Opts.
type ReflinkFS struct {
	Name string
	Mkfs []string
	Opts []string
}

// ReflinkFilesystems are the filesystems the reflink provider serves,
// as its tests and the CLI's run them: XFS with reflink=1, btrfs, and
// btrfs with forced compression (whose compressed extents have no
// per-block address).
var ReflinkFilesystems = []ReflinkFS{
	{"xfs", []string{"mkfs.xfs", "-q", "-f", "-m", "reflink=1"}, nil},
	{"btrfs", []string{"mkfs.btrfs", "-q", "-f"}, nil},
	{"btrfs-compressed", []string{"mkfs.btrfs", "-q", "-f"}, []string{"compress-force=zstd"}},
}

// NeedRoot skips the test unless it runs as root.
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (loop devices, mount, fsfreeze)")
	}
}

// SparseFile creates path as an empty sparse file of size bytes (an
// image to put a filesystem or a volume on) and returns path.
func SparseFile(t testing.TB, path string, size int64) string {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

// NeedFUSE skips the test unless the kernel offers FUSE (/dev/fuse).
func NeedFUSE(t testing.TB) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("needs /dev/fuse (FUSE): a volume's file, nbdfuse and the loop devices over them")
	}
}

// Need skips the test unless every tool is on PATH.
func Need(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s: run ./scripts/test as root to install the Debian tools the tests use", tool)
		}
	}
}

// Run runs a command and fails the test with its output on error.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Losetup attaches file to a free loop device and detaches it at cleanup.
func Losetup(t testing.TB, file string, readOnly, directIO bool) string {
	t.Helper()
	dev, detach := Attach(t, file, readOnly, directIO)
	t.Cleanup(detach)
	return dev
}

// Attach attaches file to a free loop device and returns the function that
// detaches it: once, and only while the device is still backed by file —
// tests run in parallel, and a loop device detached early may already carry
// another test's file.
func Attach(t testing.TB, file string, readOnly, directIO bool) (dev string, detach func()) {
	t.Helper()
	args := []string{"-f", "--show"}
	if readOnly {
		args = append(args, "-r")
	}
	if directIO {
		args = append(args, "--direct-io=on")
	}
	out, err := exec.Command("losetup", append(args, file)...).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup %s: %v %s", file, err, out)
	}
	dev = strings.TrimSpace(string(out))
	var once sync.Once
	return dev, func() {
		once.Do(func() {
			// Also when file was a FUSE file of a server that died.
			if expose.Carries(dev, file) {
				exec.Command("losetup", "-d", dev).Run()
			}
		})
	}
}

// Mount mounts dev on a new directory under dir and unmounts at cleanup.
func Mount(t testing.TB, dev, dir string, opts ...string) string {
	t.Helper()
	mnt, err := os.MkdirTemp(dir, "mnt")
	if err != nil {
		t.Fatal(err)
	}
	args := []string{dev, mnt}
	if len(opts) > 0 {
		args = append([]string{"-o", strings.Join(opts, ",")}, args...)
	}
	Run(t, "mount", args...)
	t.Cleanup(func() {
		if err := exec.Command("umount", mnt).Run(); err != nil {
			exec.Command("umount", "-l", mnt).Run()
		}
	})
	return mnt
}

func fileData(name string) []byte {
	i := 0
	fmt.Sscanf(name, "f%05d", &i)
	return bytes.Repeat([]byte(name), 1000+i%3000)
}

// FrozenSnapshot runs the front-end test of the kernel path: while a
// writer keeps writing files to the filesystem at fsdir, it freezes the
// filesystem, calls snapshot, thaws, and lets the writer go on; then it
// attaches the snapshot with attach (which returns a block device),
// checks it with e2fsck -fn, mounts it read-only and checks that every
// file written before the freeze is there with its content. It returns
// how many files it checked.
func FrozenSnapshot(t testing.TB, fsdir, workdir string, snapshot func() error, attach func() string) int {
	t.Helper()
	Need(t, "fsfreeze", "e2fsck")
	var mu sync.Mutex
	var written []string
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			name := fmt.Sprintf("f%05d", i)
			if err := os.WriteFile(filepath.Join(fsdir, name), fileData(name), 0o644); err != nil {
				t.Errorf("writer: %v", err)
				return
			}
			mu.Lock()
			written = append(written, name)
			mu.Unlock()
		}
	}()
	time.Sleep(300 * time.Millisecond)
	Run(t, "fsfreeze", "-f", fsdir)
	mu.Lock()
	before := append([]string(nil), written...)
	mu.Unlock()
	err := snapshot()
	Run(t, "fsfreeze", "-u", fsdir)
	if err != nil {
		close(stop)
		wg.Wait()
		t.Fatalf("snapshot: %v", err)
	}
	time.Sleep(200 * time.Millisecond) // the writer goes on after the thaw
	close(stop)
	wg.Wait()
	if len(before) == 0 {
		t.Fatal("the writer wrote nothing before the freeze")
	}
	dev := attach()
	if out, err := exec.Command("e2fsck", "-fn", dev).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn on the snapshot: %v\n%s", err, out)
	}
	sdir := Mount(t, dev, workdir, "ro", "noload")
	for _, name := range before {
		got, err := os.ReadFile(filepath.Join(sdir, name))
		if err != nil {
			t.Fatalf("file %s written before the freeze is missing from the snapshot: %v", name, err)
		}
		if !bytes.Equal(got, fileData(name)) {
			t.Fatalf("file %s differs in the snapshot", name)
		}
	}
	return len(before)
}

// NBDFuse runs nbdfuse to make the NBD export at uri a file and returns
// the file's path; cleanup unmounts it and stops nbdfuse (register loop
// devices over the file after this, so they are detached first).
func NBDFuse(t testing.TB, uri, dir string, readOnly bool) string {
	t.Helper()
	Need(t, "nbdfuse", "fusermount3")
	mnt, err := os.MkdirTemp(dir, "nbdfuse")
	if err != nil {
		t.Fatal(err)
	}
	args := []string{mnt, uri}
	if readOnly {
		args = append([]string{"-r"}, args...)
	}
	cmd := exec.Command("nbdfuse", args...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("nbdfuse: %v", err)
	}
	file := filepath.Join(mnt, "nbd")
	t.Cleanup(func() {
		exec.Command("fusermount3", "-u", mnt).Run()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	// Wait for the file, not for a time: a loaded machine can take many
	// seconds to start nbdfuse. The deadline only turns a hang into a
	// failure.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if _, err := os.Stat(file); err == nil {
			return file
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdfuse did not create %s in 2 minutes", file)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
