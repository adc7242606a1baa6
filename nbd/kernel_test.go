package nbd_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"umbra/provider"
)

// attachNBDFuse carries an export to a block device the way kernels
// without an nbd module can: nbdfuse makes it a file, a loop device makes
// the file a block device. It returns the device; cleanup detaches in
// order.
func attachNBDFuse(t *testing.T, uri, dir string, readOnly bool) string {
	t.Helper()
	mnt := filepath.Join(dir, fmt.Sprintf("fuse%d", time.Now().UnixNano()))
	os.Mkdir(mnt, 0o755)
	args := []string{mnt, uri}
	if readOnly {
		args = append([]string{"-r"}, args...)
	}
	cmd := exec.Command("nbdfuse", args...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("nbdfuse: %v", err)
	}
	file := filepath.Join(mnt, "nbd")
	for i := 0; ; i++ {
		if _, err := os.Stat(file); err == nil {
			break
		}
		if i > 100 {
			cmd.Process.Kill()
			t.Fatalf("nbdfuse did not create %s", file)
		}
		time.Sleep(50 * time.Millisecond)
	}
	losetup := []string{"-f", "--show"}
	if readOnly {
		losetup = append(losetup, "-r")
	}
	out, err := exec.Command("losetup", append(losetup, file)...).CombinedOutput()
	if err != nil {
		exec.Command("fusermount3", "-u", mnt).Run()
		cmd.Wait()
		t.Fatalf("losetup %s: %v %s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		exec.Command("losetup", "-d", dev).Run()
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
	return dev
}

func mount(t *testing.T, dev, dir string, opts ...string) string {
	t.Helper()
	mnt := filepath.Join(dir, fmt.Sprintf("mnt%d", time.Now().UnixNano()))
	os.Mkdir(mnt, 0o755)
	args := []string{dev, mnt}
	if len(opts) > 0 {
		args = append([]string{"-o", strings.Join(opts, ",")}, args...)
	}
	run(t, "mount", args...)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	return mnt
}

// TestKernelPathFrozenSnapshot: ext4 on loop over nbdfuse over an Umbra
// volume; a writer keeps writing while the filesystem is frozen and a
// snapshot committed; the snapshot, carried the same way, passes
// e2fsck -fn and holds every file written before the freeze.
func TestKernelPathFrozenSnapshot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for loop devices, mount and fsfreeze")
	}
	need(t, "nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fsfreeze", "fusermount3")
	s := serve(t, 256<<20)
	dev := attachNBDFuse(t, s.uri("vol"), s.dir, false)
	run(t, "mkfs.ext4", "-q", "-F", dev)
	fsdir := mount(t, dev, s.dir)

	var mu sync.Mutex
	var written []string // files whose write returned
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
			data := bytes.Repeat([]byte(name), 1000+i%3000)
			if err := os.WriteFile(filepath.Join(fsdir, name), data, 0o644); err != nil {
				t.Errorf("writer: %v", err)
				return
			}
			mu.Lock()
			written = append(written, name)
			mu.Unlock()
		}
	}()
	time.Sleep(300 * time.Millisecond)
	run(t, "fsfreeze", "-f", fsdir)
	mu.Lock()
	before := append([]string(nil), written...)
	mu.Unlock()
	_, err := s.vol.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "frozen"})
	run(t, "fsfreeze", "-u", fsdir)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the writer goes on after the thaw
	close(stop)
	wg.Wait()
	if len(before) == 0 {
		t.Fatal("the writer wrote nothing before the freeze")
	}

	sdev := attachNBDFuse(t, s.uri("vol@frozen"), s.dir, true)
	if out, err := exec.Command("e2fsck", "-fn", sdev).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn on the snapshot: %v\n%s", err, out)
	}
	sdir := mount(t, sdev, s.dir, "ro", "noload")
	for _, name := range before {
		got, err := os.ReadFile(filepath.Join(sdir, name))
		if err != nil {
			t.Fatalf("file %s written before the freeze is missing from the snapshot: %v", name, err)
		}
		i := 0
		fmt.Sscanf(name, "f%05d", &i)
		if !bytes.Equal(got, bytes.Repeat([]byte(name), 1000+i%3000)) {
			t.Fatalf("file %s differs in the snapshot", name)
		}
	}
	t.Logf("%d files written before the freeze are in the snapshot; e2fsck clean", len(before))
}
