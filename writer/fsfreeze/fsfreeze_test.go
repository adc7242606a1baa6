package fsfreeze

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"umbra/internal/testutil"
	"umbra/writer"
)

// TestFreezeBlocksAndGuardThaws: a frozen ext4 blocks writes; the guard
// thaws it by itself when nobody does.
func TestFreezeBlocksAndGuardThaws(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.ext4")
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	testutil.SparseFile(t, img, 32<<20)
	dev := testutil.Losetup(t, img, false, false)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := testutil.Mount(t, dev, dir)

	w := New()
	w.Guard = 300 * time.Millisecond
	// The guard's timer is the test's to fire: it checks that a write
	// waits first, whatever the scheduler does meanwhile.
	fire := make(chan func(), 1)
	w.afterFunc = func(d time.Duration, f func()) *time.Timer {
		if d != w.Guard {
			t.Errorf("guard timer of %v, want %v", d, w.Guard)
		}
		fire <- f
		return time.AfterFunc(time.Hour, func() {})
	}
	set := writer.Set{ID: "s", Volumes: []writer.Volume{{Name: "v", Devices: []string{img}}}}
	vols, err := writer.ResolveMounts(set.Volumes)
	if err != nil {
		t.Fatal(err)
	}
	set.Volumes = vols
	if !w.Involved(set) || len(set.Mounts()) != 1 || set.Mounts()[0] != mnt {
		t.Fatalf("mounts of the volume: %v, want [%s]", set.Mounts(), mnt)
	}
	if err := w.Freeze(context.Background(), set); err != nil {
		t.Fatal(err)
	}
	guard := testutil.Receive(t, fire, "the guard's timer starts")
	// A writing process blocks on the frozen filesystem: it is seen
	// asleep in the kernel (D) and the file it writes is not there.
	f := filepath.Join(mnt, "f")
	wr := exec.Command("sh", "-c", "echo x > "+f)
	if err := wr.Start(); err != nil {
		w.Thaw(context.Background(), set)
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- wr.Wait() }()
	blocked := func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", wr.Process.Pid))
		if err != nil {
			return false
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		return i > 0 && i+2 < len(s) && s[i+2] == 'D'
	}
	for deadline := time.Now().Add(testutil.HangGuard); !blocked(); time.Sleep(10 * time.Millisecond) {
		select {
		case err := <-done:
			w.Thaw(context.Background(), set)
			t.Fatalf("a write passed the freeze (err %v)", err)
		default:
		}
		if time.Now().After(deadline) {
			w.Thaw(context.Background(), set)
			testutil.Hung(t, "the writing process blocks on the frozen filesystem")
		}
	}
	if b, _ := os.ReadFile(f); len(b) != 0 {
		w.Thaw(context.Background(), set)
		t.Fatalf("the write landed while frozen: %q", b)
	}
	// Nobody thaws: the guard does.
	guard()
	if err := testutil.Receive(t, done, "the write once the guard thawed"); err != nil {
		t.Fatal(err)
	}
	if err := w.Thaw(context.Background(), set); err != nil {
		t.Fatalf("thaw after the guard: %v", err)
	}
}

// TestGuardProcessOutlivesCrash: a process freezes a filesystem with a
// guard process and dies (SIGKILL); the guard thaws the filesystem.
func TestGuardProcessOutlivesCrash(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.ext4")
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	testutil.SparseFile(t, img, 32<<20)
	dev := testutil.Losetup(t, img, false, false)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := testutil.Mount(t, dev, dir)
	marker := filepath.Join(dir, "frozen")
	child := exec.Command(os.Args[0], "-test.run=^TestGuardProcessOutlivesCrash$")
	child.Env = append(os.Environ(), "UMBRA_FREEZE_CHILD="+mnt, "UMBRA_FREEZE_MARKER="+marker)
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer child.Process.Kill()
	testutil.WaitFor(t, "the child freezes", func() bool { _, err := os.Stat(marker); return err == nil })
	child.Process.Signal(syscall.SIGKILL)
	child.Wait()
	done := make(chan error, 1)
	go func() { done <- os.WriteFile(filepath.Join(mnt, "after"), []byte("x"), 0o644) }()
	defer ioctl(mnt, fiThaw) // should the guard not: the mount must go
	if err := testutil.Receive(t, done, "the guard process thaws the filesystem after the freezing process died"); err != nil {
		t.Fatal(err)
	}
}

// TestMain doubles as the freezing child and as the guard process.
func TestMain(m *testing.M) {
	if os.Getenv("UMBRA_FREEZE_GUARD") != "" {
		// args: -test.run=^$ --after D MOUNT...
		args := os.Args[2:]
		d, _ := time.ParseDuration(args[1])
		RunGuard(d, args[2:])
		os.Exit(0)
	}
	if mnt := os.Getenv("UMBRA_FREEZE_CHILD"); mnt != "" {
		w := New()
		w.Guard = time.Second
		w.GuardCommand = []string{os.Args[0], "-test.run=^$"}
		os.Setenv("UMBRA_FREEZE_GUARD", "1")
		set := writer.Set{ID: "c", Volumes: []writer.Volume{{Name: "v", Mounts: []string{mnt}}}}
		if err := w.Freeze(context.Background(), set); err != nil {
			os.Exit(1)
		}
		os.WriteFile(os.Getenv("UMBRA_FREEZE_MARKER"), nil, 0o600)
		select {} // frozen until killed
	}
	os.Exit(m.Run())
}
