package main

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	_ "modernc.org/sqlite"

	"umbra/internal/sqlitecommitter"
	"umbra/internal/testutil"
)

// sqliteApp inserts numbered rows into db until stopped.
func sqliteApp(t *testing.T, path string) (stop func() int, committed func() int) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, note TEXT)"); err != nil {
		t.Fatal(err)
	}
	var quit atomic.Bool
	var n atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !quit.Load() {
			if _, err := db.Exec("INSERT INTO orders (note) VALUES (?)", fmt.Sprintf("order %d", n.Load()+1)); err == nil {
				n.Add(1)
			}
		}
	}()
	return func() int { quit.Store(true); wg.Wait(); db.Close(); return int(n.Load()) }, func() int { return int(n.Load()) }
}

// checkDB opens a database copy read-only: it must pass integrity_check
// and hold rows 1..n with no gap (whole transactions only).
func checkDB(t *testing.T, path string) int {
	t.Helper()
	n, err := sqlitecommitter.CheckCopy(path)
	if err != nil {
		t.Fatal(err)
	}
	return int(n)
}

// TestSystemProvidersWithWriters: live SQLite databases that are a
// reflink volume (a database file on XFS) and that live in a btrfs
// subvolume are snapshotted in one set with the SQLite writer frozen
// around it; each snapshot opens, passes integrity_check and holds a
// whole prefix of the committed rows.
func TestSystemProvidersWithWriters(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.xfs", "mkfs.btrfs", "btrfs")
	dir := t.TempDir()
	mk := func(kind string, args ...string) string {
		img := filepath.Join(dir, kind+".img")
		testutil.SparseFile(t, img, 512<<20)
		dev := testutil.Losetup(t, img, false, false)
		testutil.Run(t, args[0], append(args[1:], dev)...)
		return testutil.Mount(t, dev, dir)
	}
	xfs := mk("xfs", "mkfs.xfs", "-q", "-f", "-m", "reflink=1")
	bfs := mk("btrfs", "mkfs.btrfs", "-q", "-f")
	sub := filepath.Join(bfs, "app")
	testutil.Run(t, "btrfs", "subvolume", "create", sub)
	dbX, dbB := filepath.Join(xfs, "orders.db"), filepath.Join(sub, "orders.db")
	stopX, doneX := sqliteApp(t, dbX)
	stopB, doneB := sqliteApp(t, dbB)
	defer stopX()
	defer stopB()
	// waitRows waits until both applications committed more than x and b
	// rows.
	waitRows := func(x, b int) {
		testutil.WaitFor(t, fmt.Sprintf("the applications commit more than %d and %d rows", x, b), func() bool { return doneX() > x && doneB() > b })
	}
	s := startService(t, dir, []string{"c"}, "--reflink-volume", dbX, "--btrfs-volume", sub, "--sqlite-writer", dbX, "--sqlite-writer", dbB)
	defer s.stop()
	waitRows(0, 0)
	var resp struct {
		Writers []string `json:"writers"`
	}
	json.Unmarshal([]byte(s.ok("snapshot", "create", dbX, sub, "--writers", "--id", "consistent", "--json")), &resp)
	if len(resp.Writers) != 2 {
		t.Fatalf("writers frozen: %v, want both SQLite writers", resp.Writers)
	}
	waitRows(doneX(), doneB()) // rows after the snapshot's
	nX, nB := stopX(), stopB()
	gotX := checkDB(t, filepath.Join(xfs, ".umbra-shadow", "orders.db@consistent"))
	gotB := checkDB(t, filepath.Join(bfs, ".umbra-snapshots", "app", "consistent", "orders.db"))
	if gotX == 0 || gotX >= nX || gotB == 0 || gotB >= nB {
		t.Fatalf("snapshots hold %d of %d and %d of %d rows: want a non-empty prefix taken while the apps ran", gotX, nX, gotB, nB)
	}
	t.Logf("reflink snapshot: %d of %d rows; btrfs snapshot: %d of %d rows", gotX, nX, gotB, nB)
	// The btrfs snapshot is exposed as its path.
	var m struct {
		Path string `json:"path"`
	}
	json.Unmarshal([]byte(s.ok("snapshot", "expose", sub, "consistent", "--json")), &m)
	if m.Path != filepath.Join(bfs, ".umbra-snapshots", "app", "consistent") {
		t.Fatalf("btrfs exposure: %+v", m)
	}
	s.ok("snapshot", "unexpose", sub, "consistent")
}

// TestReflinkSnapshotExpose: a reflink snapshot of raw data exposes as
// its NBD export, and a mount of it says it holds no filesystem.
// (Incremental images of reflink volumes: reflink_backup_test.go.)
func TestReflinkSnapshotExpose(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.xfs", "blkid")
	dir := t.TempDir()
	img := filepath.Join(dir, "xfs.img")
	testutil.SparseFile(t, img, 512<<20)
	dev := testutil.Losetup(t, img, false, false)
	testutil.Run(t, "mkfs.xfs", "-q", "-f", "-m", "reflink=1", dev)
	mnt := testutil.Mount(t, dev, dir)
	vm := filepath.Join(mnt, "vm.img")
	data := make([]byte, 4<<20)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	os.WriteFile(vm, data, 0o600)
	s := startService(t, dir, []string{"c"}, "--reflink-volume", vm)
	defer s.stop()
	s.ok("snapshot", "create", vm, "--id", "raw")
	// Listing every volume includes the other providers' volumes.
	if out := s.ok("snapshot", "list"); !strings.Contains(out, "raw") || !strings.Contains(out, vm) {
		t.Fatalf("snapshot list without a volume leaves out the reflink volume's snapshot:\n%s", out)
	}
	if out := s.ok("volume", "list"); !strings.Contains(out, vm) || !strings.Contains(out, "reflink") {
		t.Fatalf("volume list leaves out the reflink volume:\n%s", out)
	}
	if out, code := s.umbra("snapshot", "expose", vm, "raw"); code == 0 || !strings.Contains(out, "no mountable filesystem") {
		t.Fatalf("mounting a snapshot without a filesystem: exit %d %s", code, out)
	}
	if out := s.ok("snapshot", "expose", vm, "raw", "--no-mount"); !strings.Contains(out, "nbd:"+vm+"@raw") {
		t.Fatalf("expose --no-mount: %s", out)
	}
	s.ok("snapshot", "unexpose", vm, "raw")
}
