package main

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"umbra/internal/testutil"
)

// TestCLIConcurrentSetsWithWriters: two `snapshot create v --writers
// --id r2` at once on a volume holding a mounted ext4 (as a timer and an
// FSRVP request can). One commits; the other fails naming the taken id,
// and no failure path leaves the volume's writes held: an application
// that writes and fsyncs all along finishes its writes, and one more
// after both. The holds' limit is ten minutes, so a set that left writes
// held until its limit (a thaw of the filesystem waiting behind its own
// hold) would hang the test rather than pass it.
func TestCLIConcurrentSetsWithWriters(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.NeedFUSE(t)
	testutil.Need(t, "losetup", "mkfs.ext4")
	dir := t.TempDir()
	fuseDir := filepath.Join(dir, "fuse")
	s := startService(t, dir, []string{"v"}, "--fuse-dir", fuseDir)
	file := filepath.Join(fuseDir, "v")
	waitFile(t, file, "the volume's FUSE file")
	dev := testutil.Losetup(t, file, false, true)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := testutil.Mount(t, dev, dir)

	// The application: fsync'd appends until told to stop.
	stop := make(chan struct{})
	var app sync.WaitGroup
	var appErr error
	appended := 0
	app.Add(1)
	go func() {
		defer app.Done()
		f, err := os.OpenFile(filepath.Join(mnt, "journal"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			appErr = err
			return
		}
		defer f.Close()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := f.WriteString("record\n"); err != nil {
				appErr = err
				return
			}
			if err := f.Sync(); err != nil {
				appErr = err
				return
			}
			appended++
		}
	}()

	var sets sync.WaitGroup
	outs := make([]string, 2)
	codes := make([]int, 2)
	for i := range 2 {
		sets.Add(1)
		go func() {
			defer sets.Done()
			outs[i], codes[i] = s.umbra("snapshot", "create", "v", "--writers", "--id", "r2", "--hold-timeout", "10m")
		}()
	}
	sets.Wait()
	close(stop)
	app.Wait()
	if appErr != nil {
		t.Fatalf("the application's writes failed: %v", appErr)
	}
	won, lost := 0, 1
	if codes[0] != 0 {
		won, lost = 1, 0
	}
	if codes[won] != 0 || codes[lost] == 0 {
		t.Fatalf("two sets with one id: exits %v, want one success and one failure\n%s\n%s", codes, outs[0], outs[1])
	}
	if !strings.Contains(outs[lost], "r2") || !strings.Contains(outs[lost], "already exists") {
		t.Fatalf("the losing set does not say its id is taken:\n%s", outs[lost])
	}
	// Nothing stays frozen or held: one more fsync'd write goes through.
	f, err := os.OpenFile(filepath.Join(mnt, "after"), os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("after both sets\n"); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if l := s.list(); len(l.Snapshots) != 1 || l.Snapshots[0].ID != "r2" {
		t.Fatalf("snapshots after the two sets: %+v", l)
	}
	t.Logf("the application appended %d fsync'd records during the two sets", appended)
}
