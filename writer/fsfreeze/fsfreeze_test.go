package fsfreeze

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
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
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- os.WriteFile(filepath.Join(mnt, "f"), []byte("x"), 0o644) }()
	select {
	case err := <-done:
		t.Fatalf("a write passed the freeze (err %v)", err)
	case <-time.After(100 * time.Millisecond):
	}
	// Nobody thaws: the guard does.
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
		if el := time.Since(start); el < 200*time.Millisecond {
			t.Fatalf("thawed after %v, before the guard", el)
		}
	case <-time.After(5 * time.Second):
		w.Thaw(context.Background(), set)
		t.Fatal("the guard did not thaw the filesystem")
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
	for i := 0; ; i++ {
		if _, err := os.Stat(marker); err == nil {
			break
		}
		if i > 500 {
			child.Process.Kill()
			t.Fatal("the child never froze")
		}
		time.Sleep(10 * time.Millisecond)
	}
	child.Process.Signal(syscall.SIGKILL)
	child.Wait()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- os.WriteFile(filepath.Join(mnt, "after"), []byte("x"), 0o644) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("the guard thawed the filesystem %v after the crash", time.Since(start))
	case <-time.After(10 * time.Second):
		ioctl(mnt, fiThaw)
		t.Fatal("the filesystem stayed frozen after the freezing process died")
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
