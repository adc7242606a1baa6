package fsfreeze

import (
	"context"
	"os"
	"path/filepath"
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
	os.WriteFile(img, nil, 0o600)
	os.Truncate(img, 32<<20)
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
