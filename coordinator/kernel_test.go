package coordinator

import (
	"context"
	"database/sql"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	_ "modernc.org/sqlite"

	"umbra/frontend"
	"umbra/fusefile"
	"umbra/internal/testutil"
	"umbra/nbd"
	"umbra/provider"
	"umbra/writer"
	"umbra/writer/fsfreeze"
	wsqlite "umbra/writer/sqlite"
)

// TestSQLiteSetsOnKernelPath: ext4 on a loop device over an Umbra volume —
// carried by nbdfuse over Umbra's NBD export, and by Umbra's own FUSE
// file —; a program commits SQLite transactions in WAL mode without pause;
// snapshot sets are taken with the fsfreeze and SQLite writers. Every
// snapshot opens read-only with integrity_check = ok, has no hot WAL to
// roll back, and holds every transaction acknowledged before its set began.
func TestSQLiteSetsOnKernelPath(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.ext4")
	testutil.NeedFUSE(t)
	for _, via := range []string{"nbdfuse", "fuse"} {
		t.Run(via, func(t *testing.T) { sqliteSets(t, via) })
	}
}

func sqliteSets(t *testing.T, via string) {
	sets := 50
	if via == "fuse" && os.Getenv("UMBRA_LONG") == "" {
		sets = 10
	}
	dir := t.TempDir()
	_, p := cowVolume(t, dir, "vol", 512<<20)
	// file returns the file that carries an export to a loop device, for
	// as long as t runs.
	var file func(t *testing.T, export string, readOnly bool) string
	var volFile string
	switch via {
	case "fuse":
		fuseDir := filepath.Join(dir, "fuse")
		os.Mkdir(fuseDir, 0o755)
		srv, err := fusefile.Mount(fuseDir, frontend.FUSESource(p), fusefile.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Unmount() })
		file = func(_ *testing.T, export string, _ bool) string { return filepath.Join(fuseDir, export) }
	case "nbdfuse":
		sock := filepath.Join(dir, "nbd.sock")
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		srv := nbd.NewServer(frontend.NBDExports(p, nil), nbd.Options{})
		go srv.Serve(context.Background(), l)
		t.Cleanup(func() { srv.Shutdown(context.Background()) })
		file = func(t *testing.T, export string, ro bool) string {
			return testutil.NBDFuse(t, "nbd+unix:///"+export+"?socket="+sock, dir, ro)
		}
	}
	volFile = file(t, "vol", false)
	dev := testutil.Losetup(t, volFile, false, via == "fuse")
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := testutil.Mount(t, dev, dir)

	dbPath := filepath.Join(mnt, "app.db")
	db, err := sql.Open("sqlite", "file:"+dbPath+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(20000)&_pragma=synchronous(NORMAL)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(1)
	if _, err := db.Exec("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)"); err != nil {
		t.Fatal(err)
	}
	var acked atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }); wg.Wait() }
	t.Cleanup(halt) // before the unmounts registered earlier
	wg.Add(1)
	go func() {
		defer wg.Done()
		payload := make([]byte, 64)
		for i := int64(1); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := db.Exec("INSERT INTO t (id, payload) VALUES (?, ?)", i, payload); err != nil {
				t.Errorf("insert %d: %v", i, err)
				return
			}
			acked.Store(i)
		}
	}()

	reg := &provider.Registry{}
	reg.Register(p)
	ws := writer.NewRegistry()
	ws.Add(fsfreeze.New())
	ws.Add(wsqlite.New(dbPath))
	c := New(reg, ws, func(vol string) []string { return []string{volFile} }, nil)
	var worst time.Duration
	for k, before := 0, int64(0); k < sets; k++ {
		// The application commits between sets: each snapshot holds
		// more rows than the one before.
		prev := before
		testutil.WaitFor(t, "the application commits a row", func() bool { return acked.Load() > prev })
		before = acked.Load()
		set, err := c.CreateSet(context.Background(), Request{Volumes: []string{"vol"}, Writers: true, ForBackup: true})
		if err != nil {
			t.Fatalf("set %d: %v", k, err)
		}
		if len(set.Writers) != 2 {
			t.Fatalf("set %d: writers %v, want fsfreeze and sqlite", k, set.Writers)
		}
		worst = max(worst, set.Timings.FreezeToThaw)
		// Each snapshot's reader (its nbdfuse and NBD connections) goes
		// when its subtest ends, as a requester lets go of a snapshot
		// before saying the backup is complete; kept to the end, fifty
		// sets' nbdfuse processes would pass the server's connection cap.
		if !t.Run(fmt.Sprintf("set-%d", k), func(t *testing.T) {
			checkSnapshot(t, dir, file(t, "vol@"+set.Snapshots[0].ID, true), before, k, via == "fuse")
		}) {
			break
		}
		if err := set.BackupComplete(context.Background(), true); err != nil {
			t.Fatal(err)
		}
	}
	halt()
	t.Logf("%d sets; %d transactions committed meanwhile; worst freeze-to-thaw %v", sets, acked.Load(), worst)
}

func checkSnapshot(t *testing.T, dir, file string, before int64, k int, directIO bool) {
	t.Helper()
	sdev, detach := testutil.Attach(t, file, true, directIO)
	defer detach()
	smnt := testutil.Mount(t, sdev, dir, "ro", "noload")
	defer testutil.Run(t, "umount", smnt)
	db := filepath.Join(smnt, "app.db")
	if fi, err := os.Stat(db + "-wal"); err == nil && fi.Size() > 0 {
		t.Fatalf("set %d: the snapshot has a hot WAL of %d bytes", k, fi.Size())
	}
	// Open a copy: the snapshot is read-only, and SQLite must find no
	// journal to roll back.
	cp := filepath.Join(dir, fmt.Sprintf("copy%d.db", k))
	data, err := os.ReadFile(db)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(cp, data, 0o600)
	defer os.Remove(cp)
	sdb, err := sql.Open("sqlite", "file:"+cp+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer sdb.Close()
	var res string
	if err := sdb.QueryRow("PRAGMA integrity_check").Scan(&res); err != nil || res != "ok" {
		t.Fatalf("set %d: integrity_check = %q, %v", k, res, err)
	}
	var n, maxID int64
	if err := sdb.QueryRow("SELECT count(*), coalesce(max(id), 0) FROM t").Scan(&n, &maxID); err != nil {
		t.Fatal(err)
	}
	if maxID < before || n != maxID {
		t.Fatalf("set %d: snapshot holds %d rows up to #%d; #%d was acknowledged before the set began", k, n, maxID, before)
	}
}
