package main

import (
	"bytes"
	"crypto/sha256"
	"database/sql"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"umbra/internal/testutil"
)

// liveVolume is a volume of `volume list --json` with its live restore.
type liveVolume struct {
	Name        string `json:"name"`
	Size        int64  `json:"size"`
	LiveRestore *struct {
		Image        string `json:"image"`
		State        string `json:"state"`
		Error        string `json:"error"`
		Size         int64  `json:"size"`
		Restored     int64  `json:"restored"`
		DemandChunks int64  `json:"demand_chunks"`
	} `json:"live_restore"`
}

func (s *service) liveVolume(name string) liveVolume {
	s.t.Helper()
	var resp struct {
		Volumes []liveVolume `json:"volumes"`
	}
	if err := json.Unmarshal([]byte(s.ok("volume", "list", "--json")), &resp); err != nil {
		s.t.Fatal(err)
	}
	for _, v := range resp.Volumes {
		if v.Name == name {
			return v
		}
	}
	s.t.Fatalf("volume %s is not listed", name)
	return liveVolume{}
}

// waitLiveDone waits for volume name's live restore to end (a bound
// against a hang, not a timing assertion).
func (s *service) waitLiveDone(name string) {
	s.t.Helper()
	for start := time.Now(); ; time.Sleep(50 * time.Millisecond) {
		v := s.liveVolume(name)
		if v.LiveRestore == nil || v.LiveRestore.State == "done" {
			return
		}
		if time.Since(start) > 5*time.Minute {
			s.t.Fatalf("the live restore of %s has not ended: %+v", name, *v.LiveRestore)
		}
	}
}

// TestLiveRestore: an ext4 volume holding files and a SQLite database is
// backed up, then restored live into a new file with its background
// restore held back (--rate 1): the restored volume is mounted through
// its FUSE file and a loop device at once, every file reads back with
// its checksum, SQLite's integrity_check passes, new files are written,
// and a snapshot taken meanwhile holds the files as they were. Raw writes
// go to the part of the volume outside the filesystem. The repository
// goes away (reads of unrestored data fail with EIO, restored data still
// reads) and comes back. The service is killed with -9 and started
// again, twice (once while the background restore runs at full speed);
// at the end the target file equals, block by block, what was read
// through the volume plus exactly the raw writes made. Local and S3
// repositories.
func TestLiveRestore(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.NeedFUSE(t)
	testutil.Need(t, "losetup", "mkfs.ext4", "mount", "e2fsck")
	for _, backend := range []string{"local", "s3"} {
		t.Run(backend, func(t *testing.T) { liveRestore(t, backend) })
	}
}

func liveRestore(t *testing.T, backend string) {
	dir := t.TempDir()
	const size, fsSize = 32 << 20, 24 << 20 // ext4 in the first 24 MiB, raw data after it
	r := rand.New(rand.NewPCG(7, 8))

	// The source: ext4 with files and a database, raw random data after it.
	src := testutil.SparseFile(t, filepath.Join(dir, "src.img"), size)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", "-b", "4096", src, "6144") // 24 MiB of 4 KiB blocks
	sums := map[string][32]byte{}
	func() {
		dev, detach := testutil.Attach(t, src, false, false)
		defer detach()
		mnt := testutil.Mount(t, dev, dir)
		for i := range 24 {
			b := make([]byte, 1+r.IntN(300<<10))
			for j := range b {
				b[j] = byte(r.Uint32())
			}
			name := fmt.Sprintf("f%02d", i)
			os.WriteFile(filepath.Join(mnt, name), b, 0o644)
			sums[name] = sha256.Sum256(b)
		}
		makeDB(t, filepath.Join(mnt, "app.db"), 2000)
		testutil.Run(t, "umount", mnt)
	}()
	tail := make([]byte, size-fsSize)
	for i := 0; i < len(tail); i += 4096 {
		if r.IntN(4) > 0 { // some zero chunks, kept as holes
			for j := i; j < i+4096; j++ {
				tail[j] = byte(r.Uint32())
			}
		}
	}
	f, _ := os.OpenFile(src, os.O_RDWR, 0)
	f.WriteAt(tail, fsSize)
	f.Close()

	fuseDir := filepath.Join(dir, "fuse")
	s := startService(t, dir, []string{"src"}, "--fuse-dir", fuseDir)
	repo := filepath.Join(dir, "repo")
	var env []string
	// outage makes the repository unreachable until the function it
	// returns is called.
	outage := func() func() {
		os.Rename(filepath.Join(repo, "packs"), filepath.Join(repo, "packs.away"))
		return func() { os.Rename(filepath.Join(repo, "packs.away"), filepath.Join(repo, "packs")) }
	}
	if backend == "s3" {
		v := testutil.StartS3(t)
		repo, env = v.Location("repo"), v.Env()
		// After a restart the service finds the S3 keys in its own
		// environment: nothing keeps them on disk.
		for _, kv := range env {
			k, val, _ := strings.Cut(kv, "=")
			t.Setenv(k, val)
		}
		outage = func() func() { v.Stop(); return v.Start }
	}
	s.okEnv(env, "repo", "init", "--repo", repo)
	var resp struct {
		Images []struct {
			Image string `json:"image"`
		} `json:"images"`
	}
	json.Unmarshal([]byte(s.okEnv(env, "backup", "src", "--repo", repo, "--json")), &resp)
	if len(resp.Images) != 1 {
		t.Fatalf("backup: %+v", resp)
	}
	id := resp.Images[0].Image

	// Restored live, its background held back: usable at once.
	target := filepath.Join(dir, "restored.img")
	s.okEnv(env, "restore", id, "--live", "--to", target, "--volume", "dst", "--repo", repo, "--rate", "1")
	if _, stderr, code := s.run(env, "restore", id, "--live", "--to", filepath.Join(dir, "other.img"), "--volume", "dst", "--repo", repo); code == 0 || !strings.Contains(stderr, "dst") {
		t.Fatalf("a second live restore as volume dst: exit %d %s", code, stderr)
	}
	before, _ := os.ReadFile(src)
	if _, stderr, code := s.run(env, "restore", id, "--live", "--to", src, "--volume", "again", "--repo", repo, "--force"); code != 2 || !strings.Contains(stderr, "origin of volume src") {
		t.Fatalf("a live restore over a volume the service serves: exit %d %s", code, stderr)
	}
	if after, _ := os.ReadFile(src); !bytes.Equal(before, after) {
		t.Fatal("a refused live restore changed the volume it was refused over")
	}
	v := s.liveVolume("dst")
	if v.LiveRestore == nil || v.LiveRestore.Image != id || v.Size != size || v.LiveRestore.Restored >= size {
		t.Fatalf("volume list after restore --live: %+v %+v", v, v.LiveRestore)
	}
	file := filepath.Join(fuseDir, "dst")
	waitFile(t, file, "the restored volume's FUSE file")
	dev, detach := testutil.Attach(t, file, false, false)
	mnt := testutil.Mount(t, dev, dir)
	for name, want := range sums {
		b, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil || sha256.Sum256(b) != want {
			t.Fatalf("%s on the live-restored volume: %v, or not the file backed up", name, err)
		}
	}
	if n := checkDBRows(t, filepath.Join(mnt, "app.db")); n != 2000 {
		t.Fatalf("the restored database holds %d rows, want 2000", n)
	}
	// A snapshot, then new files: the snapshot keeps the image's bytes,
	// preserved through the restore target.
	s.ok("snapshot", "create", "dst", "--id", "before")
	for i := range 8 {
		b := bytes.Repeat([]byte{byte(i + 1)}, 100<<10)
		os.WriteFile(filepath.Join(mnt, fmt.Sprintf("new%d", i)), b, 0o644)
		sums[fmt.Sprintf("new%d", i)] = sha256.Sum256(b)
	}
	os.Remove(filepath.Join(mnt, "f00"))
	delete(sums, "f00")
	syscall.Sync()
	func() {
		sdev, sdetach := testutil.Attach(t, filepath.Join(fuseDir, "dst@before"), true, false)
		defer sdetach()
		smnt := testutil.Mount(t, sdev, dir, "ro", "noload")
		defer exec.Command("umount", smnt).Run()
		if _, err := os.Stat(filepath.Join(smnt, "new0")); err == nil {
			t.Fatal("the snapshot holds a file written after it")
		}
		if b, err := os.ReadFile(filepath.Join(smnt, "f00")); err != nil || len(b) == 0 {
			t.Fatalf("the snapshot lost f00: %v", err)
		}
	}()
	testutil.Run(t, "umount", mnt)
	detach()
	testutil.Run(t, "e2fsck", "-fn", file)
	s.ok("snapshot", "delete", "dst", "before")

	// What the filesystem part reads now is what the target must hold at
	// the end (reading it restores it on demand; the raw part is left to
	// the background restore).
	want := make([]byte, size)
	ff, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ff.ReadAt(want[:fsSize], 0); err != nil {
		t.Fatal(err)
	}
	copy(want[fsSize:], tail)
	// Raw writes, some covering chunks in part: the rest of those chunks
	// is the image's.
	rawWrite := func(off int64, n int) {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32()) | 1
		}
		if _, err := ff.WriteAt(b, off); err != nil {
			t.Fatalf("write %d bytes at %d through the FUSE file: %v", n, off, err)
		}
		copy(want[off:], b)
	}
	rawWrite(fsSize+1000, 3000)
	rawWrite(fsSize+5<<20+512, 12345)
	rawWrite(fsSize+6<<20, 8192)
	if err := ff.Sync(); err != nil {
		t.Fatal(err)
	}
	check := func(off, n int64) {
		t.Helper()
		got := make([]byte, n)
		if _, err := ff.ReadAt(got, off); err != nil {
			t.Fatalf("read %d+%d: %v", off, n, err)
		}
		if !bytes.Equal(got, want[off:off+n]) {
			t.Fatalf("read %d+%d: not the image plus the writes", off, n)
		}
	}
	check(fsSize, 8192)

	ff.Close()

	// kill -9 with the background restore held back: it resumes.
	s.kill9()
	exec.Command("umount", "-l", fuseDir).Run()
	s.start()
	v = s.liveVolume("dst")
	if v.LiveRestore == nil || v.LiveRestore.State == "done" || v.LiveRestore.Restored >= size {
		t.Fatalf("after a restart the live restore is not resumed: %+v", v.LiveRestore)
	}
	waitFile(t, file, "the restored volume's FUSE file after a restart")
	ff, err = os.OpenFile(file, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The repository goes away (a fresh service has opened no blob yet): unrestored data fails with EIO, restored
	// data reads; it comes back, and so do the reads.
	{
		back := outage()
		got := make([]byte, 4096)
		if _, err := ff.ReadAt(got, fsSize+3<<20); err == nil {
			t.Fatal("a read of unrestored data succeeded with the repository gone")
		} else if !strings.Contains(err.Error(), "input/output error") {
			t.Fatalf("a read of unrestored data with the repository gone: %v, want EIO", err)
		}
		check(0, 1<<20)
		if v := s.liveVolume("dst"); v.LiveRestore.State != "waiting for the repository" || v.LiveRestore.Error == "" {
			t.Fatalf("live restore state with the repository gone: %+v", *v.LiveRestore)
		}
		back()
		check(fsSize+3<<20, 4096)
	}
	check(fsSize, 16384)
	ff.Close()
	// Full speed (the same command with another rate), and kill -9
	// wherever the background restore is.
	s.okEnv(env, "restore", id, "--live", "--to", target, "--repo", repo)
	s.kill9()
	exec.Command("umount", "-l", fuseDir).Run()
	s.start()
	s.waitLiveDone("dst")
	if _, err := os.Stat(filepath.Join(dir, "state", "live", "dst.map")); err == nil {
		t.Fatal("the live restore's map is left after it ended")
	}
	got, err := os.ReadFile(target)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < size; off += 4096 {
		if !bytes.Equal(got[off:off+4096], want[off:off+4096]) {
			t.Fatalf("block at %d of the restored target is not the image plus the writes made", off)
		}
	}
	// An ordinary volume from now on, across a restart too.
	s.stop()
	exec.Command("umount", "-l", fuseDir).Run()
	s.start()
	if v := s.liveVolume("dst"); v.LiveRestore != nil {
		t.Fatalf("after the restore and a restart: %+v", *v.LiveRestore)
	}
	s.stop()
	exec.Command("umount", "-l", fuseDir).Run()
}

func (s *service) okEnv(env []string, args ...string) string {
	s.t.Helper()
	out, stderr, code := s.run(env, args...)
	if code != 0 {
		s.t.Fatalf("umbra %s: exit %d\n%s%s", strings.Join(args, " "), code, out, stderr)
	}
	return out
}

// makeDB creates a SQLite database with n rows.
func makeDB(t *testing.T, path string, n int) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("CREATE TABLE orders (id INTEGER PRIMARY KEY, note TEXT)"); err != nil {
		t.Fatal(err)
	}
	tx, _ := db.Begin()
	for i := range n {
		tx.Exec("INSERT INTO orders (note) VALUES (?)", strings.Repeat(fmt.Sprint(i), 20))
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

// checkDBRows runs integrity_check on the database in place and counts
// its rows.
func checkDBRows(t *testing.T, path string) int {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var ok string
	if err := db.QueryRow("PRAGMA integrity_check").Scan(&ok); err != nil || ok != "ok" {
		t.Fatalf("%s: integrity_check %q %v", path, ok, err)
	}
	var n int
	db.QueryRow("SELECT count(*) FROM orders").Scan(&n)
	return n
}
