package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"umbra/internal/testutil"
)

// TestBackupChainExt4: 20 application-consistent images (one full, then
// incrementals) of a live ext4 filesystem on an Umbra volume — loop
// device over the service's FUSE file — while an application keeps
// creating, rewriting and deleting files. Each image restores
// byte-identical to the volume at its snapshot, and passes e2fsck.
//
// The reference for "the volume at its snapshot": a freeze hook pauses
// the application before fsfreeze; after the backup the test copies the
// live volume, then lets the application go on. (The backup's own
// snapshot cannot serve: the backup cursor releases its data as the
// image is read.)
func TestBackupChainExt4(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "mkfs.ext4", "e2fsck", "losetup", "qemu-img")
	testutil.NeedFUSE(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	testutil.SparseFile(t, img, 64<<20)
	fuseDir, hooks := filepath.Join(dir, "fuse"), filepath.Join(dir, "hooks")
	pause, paused := filepath.Join(dir, "pause"), filepath.Join(dir, "paused")
	os.Mkdir(hooks, 0o755)
	os.WriteFile(filepath.Join(hooks, "pause-app"), []byte("#!/bin/sh\n[ \"$1\" = freeze ] || exit 0\ntouch "+pause+
		"\nwhile [ ! -e "+paused+" ]; do sleep 0.01; done\n"), 0o755)
	s := startService(t, dir, []string{"fs"}, "--fuse-dir", fuseDir, "--hooks-dir", hooks)
	waitFile(t, filepath.Join(fuseDir, "fs"), "the volume's FUSE file")
	dev := testutil.Losetup(t, filepath.Join(fuseDir, "fs"), false, true)
	// No lazy initialization: nothing but the application writes.
	testutil.Run(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
	mnt := testutil.Mount(t, dev, dir)

	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the application: files come, change and go
		defer wg.Done()
		r := rand.New(rand.NewPCG(5, 6))
		buf := make([]byte, 256<<10)
		for i := 0; !stop.Load(); i++ {
			if _, err := os.Stat(pause); err == nil {
				os.WriteFile(paused, nil, 0o644)
				for !stop.Load() {
					if _, err := os.Stat(pause); err != nil {
						break
					}
					time.Sleep(2 * time.Millisecond)
				}
				os.Remove(paused)
			}
			name := filepath.Join(mnt, fmt.Sprintf("f%03d", r.IntN(120)))
			if r.IntN(5) == 0 {
				os.Remove(name)
				continue
			}
			n := 1 + r.IntN(len(buf))
			for k := range buf[:n] {
				buf[k] = byte(i + k/4096)
			}
			os.WriteFile(name, buf[:n], 0o644)
		}
	}()
	defer func() { stop.Store(true); wg.Wait() }()

	repo := filepath.Join(dir, "repo")
	s.ok("repo", "init", "--repo", repo)
	type taken struct{ image, want string }
	var images []taken
	for k := 0; k < 20; k++ {
		var resp struct {
			Images []struct {
				Image       string `json:"image"`
				Snapshot    string `json:"snapshot"`
				Incremental bool   `json:"incremental"`
			} `json:"images"`
			Writers []string `json:"writers"`
		}
		if err := json.Unmarshal([]byte(s.ok("backup", "fs", "--repo", repo, "--json")), &resp); err != nil || len(resp.Images) != 1 {
			t.Fatalf("backup %d: %v %+v", k, err, resp)
		}
		im := resp.Images[0]
		if k > 0 && !im.Incremental || len(resp.Writers) == 0 {
			t.Fatalf("backup %d: incremental=%v writers=%v", k, im.Incremental, resp.Writers)
		}
		// The application is paused since the snapshot: the live volume
		// is what the snapshot holds.
		want := filepath.Join(dir, fmt.Sprintf("want%02d.img", k))
		if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "raw",
			"nbd+unix:///fs?socket="+s.nbd, want).CombinedOutput(); err != nil {
			t.Fatalf("copy the volume: %v %s", err, out)
		}
		os.Remove(pause)
		images = append(images, taken{im.Image, want})
	}
	stop.Store(true)
	wg.Wait()
	for i, im := range images {
		got := filepath.Join(dir, "restored.img")
		s.ok("restore", im.image, "--repo", repo, "--to", got, "--force")
		a, _ := os.ReadFile(got)
		b, _ := os.ReadFile(im.want)
		// ext4 rewrites its superblock (bytes 1024-2047) when thawed: it
		// sets needs_recovery again. Everything else must be identical.
		copy(b[1024:2048], a[1024:2048])
		if len(a) != len(b) || !bytes.Equal(a, b) {
			var diffs []string
			for off := 0; off < len(a) && len(diffs) < 8; off += 4096 {
				if !bytes.Equal(a[off:off+4096], b[off:off+4096]) {
					diffs = append(diffs, fmt.Sprint(off))
				}
			}
			t.Fatalf("image %d %s does not restore byte-identical to the volume at its snapshot: 4 KiB blocks at %v differ", i, im.image, diffs)
		}
		if out, err := exec.Command("e2fsck", "-fn", got).CombinedOutput(); err != nil {
			t.Fatalf("e2fsck of restored image %s: %v\n%s", im.image, err, out)
		}
		os.Remove(im.want)
	}
	s.ok("verify", "--repo", repo)

	// An image's files, read in place without restoring it.
	fsDir := filepath.Join(dir, "image-files")
	mount := exec.Command(umbraBin, "mount", images[5].image, "--repo", repo, "--socket", filepath.Join(dir, "img.sock"), "--fs", fsDir)
	mount.Stderr = os.Stderr
	if err := mount.Start(); err != nil {
		t.Fatal(err)
	}
	defer mount.Process.Kill()
	testutil.WaitFor(t, "umbra mount --fs mounts the image's filesystem", func() bool { ents, _ := os.ReadDir(fsDir); return len(ents) > 1 })
	if _, err := os.Stat(filepath.Join(fsDir, "lost+found")); err != nil {
		t.Fatalf("the mounted image: %v", err)
	}
	mount.Process.Signal(syscall.SIGINT)
	if err := mount.Wait(); err != nil {
		t.Fatalf("umbra mount after Ctrl-C: %v", err)
	}
	if _, err := os.Stat(filepath.Join(fsDir, "lost+found")); err == nil {
		t.Fatal("umbra mount left the image's filesystem mounted")
	}
}
