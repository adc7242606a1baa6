package coordinator

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	_ "modernc.org/sqlite"

	"umbra/frontend"
	"umbra/fusefile"
	"umbra/internal/sqlitecommitter"
	"umbra/internal/testutil"
	"umbra/provider"
	"umbra/provider/btrfs"
	"umbra/provider/reflink"
	"umbra/writer"
	"umbra/writer/fsfreeze"
	wsqlite "umbra/writer/sqlite"
)

// seqLog is the one order of everything the writers and providers of a
// set did.
type seqLog struct {
	mu     sync.Mutex // guards events
	events []string
}

func (l *seqLog) add(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, fmt.Sprintf(format, args...))
}

func (l *seqLog) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.events)
}

// index is the position of the event, -1 when it did not happen.
func (l *seqLog) index(ev string) int { return slices.Index(l.all(), ev) }

// seqWriter logs a writer's phases; for a SQLite writer it also counts
// the live database's rows when the freeze returns and again when the
// thaw begins: nothing may commit in between, and the snapshot must hold
// exactly that many.
type seqWriter struct {
	writer.Writer
	log *seqLog
	db  string // the live database, for SQLite writers

	frozen, thawing atomic.Int64 // rows at freeze and at thaw
	mounts          []string     // what fsfreeze was asked to freeze
}

func (w *seqWriter) rows() int64 {
	db, err := sql.Open("sqlite", "file:"+w.db+"?_pragma=busy_timeout(10000)")
	if err != nil {
		return -1
	}
	defer db.Close()
	var n int64
	if err := db.QueryRow("SELECT count(*) FROM orders").Scan(&n); err != nil {
		return -1
	}
	return n
}

func (w *seqWriter) PrepareForBackup(ctx context.Context, s writer.Set) error {
	w.log.add("%s prepare-for-backup", w.Name())
	return w.Writer.PrepareForBackup(ctx, s)
}

func (w *seqWriter) PrepareForSnapshot(ctx context.Context, s writer.Set) error {
	w.log.add("%s prepare-for-snapshot", w.Name())
	return w.Writer.PrepareForSnapshot(ctx, s)
}

func (w *seqWriter) Freeze(ctx context.Context, s writer.Set) error {
	w.mounts = s.Mounts()
	err := w.Writer.Freeze(ctx, s)
	if w.db != "" {
		w.frozen.Store(w.rows())
	}
	w.log.add("%s freeze", w.Name())
	return err
}

func (w *seqWriter) Thaw(ctx context.Context, s writer.Set) error {
	w.log.add("%s thaw", w.Name())
	if w.db != "" {
		w.thawing.Store(w.rows())
	}
	return w.Writer.Thaw(ctx, s)
}

func (w *seqWriter) PostSnapshot(ctx context.Context, s writer.Set) error {
	w.log.add("%s post-snapshot", w.Name())
	return w.Writer.PostSnapshot(ctx, s)
}

func (w *seqWriter) Abort(ctx context.Context, s writer.Set) error {
	w.log.add("%s abort", w.Name())
	return w.Writer.Abort(ctx, s)
}

// seqProvider logs when each of its volumes is committed.
type seqProvider struct {
	provider.Provider
	log *seqLog
}

type seqTxn struct {
	provider.Txn
	log *seqLog
	vol string
}

func (p seqProvider) Prepare(ctx context.Context, vol string, opts provider.SnapshotOptions) (provider.Txn, error) {
	txn, err := p.Provider.Prepare(ctx, vol, opts)
	if err != nil {
		return nil, err
	}
	return seqTxn{Txn: txn, log: p.log, vol: vol}, nil
}

func (t seqTxn) Commit(ctx context.Context) (provider.Snapshot, error) {
	s, err := t.Txn.Commit(ctx)
	t.log.add("commit %s", t.vol)
	return s, err
}

// ordersApp inserts numbered rows into a WAL database until stopped and
// says how many were acknowledged.
func ordersApp(t *testing.T, path string) (acked func() int64, stop func()) {
	t.Helper()
	c, err := sqlitecommitter.Start(path)
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			if err := c.Stop(); err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(stop) // before the unmounts registered earlier
	return c.Acked, stop
}

// snapshotRows opens a database read from a snapshot: it must pass
// integrity_check, have no WAL left to replay, and hold rows 1..n.
func snapshotRows(t *testing.T, path string) int64 {
	t.Helper()
	if fi, err := os.Stat(path + "-wal"); err == nil && fi.Size() > 0 {
		t.Fatalf("%s: the snapshot has a WAL of %d bytes", path, fi.Size())
	}
	n, err := sqlitecommitter.CheckCopy(path)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// mkfs makes a filesystem on a loop device over a new 512 MiB file in
// dir and mounts it.
func mkfs(t *testing.T, dir, name string, mkfs ...string) string {
	t.Helper()
	img := filepath.Join(dir, name+".img")
	testutil.SparseFile(t, img, 512<<20)
	dev := testutil.Losetup(t, img, false, false)
	testutil.Run(t, mkfs[0], append(mkfs[1:], dev)...)
	return testutil.Mount(t, dev, dir)
}

// TestSystemVolumesWithWriters: one snapshot set over a reflink volume
// that is a live SQLite database on XFS, a btrfs subvolume holding
// another live database, and a COW volume with ext4 (carried to the
// kernel by Umbra's FUSE file), with the SQLite writers and the fsfreeze
// writer. The applications freeze first, then fsfreeze freezes the ext4
// — and only it: FICLONE and btrfs snapshots wait on a frozen filesystem
// (TestSystemCommitWaitsOnFreeze) —, all three volumes commit, and the
// thaws run in reverse. Each database read from its snapshot (the cloned
// file; the file in the snapshot subvolume) passes integrity_check and
// holds exactly the rows committed when its writer's freeze returned,
// which is also the count when its thaw began.
func TestSystemVolumesWithWriters(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.xfs", "mkfs.btrfs", "btrfs", "mkfs.ext4")
	testutil.NeedFUSE(t)
	ctx := context.Background()
	dir := t.TempDir()
	log := &seqLog{}

	// The COW volume, ext4 on a loop device over its FUSE file.
	_, cp := cowVolume(t, dir, "vol", 256<<20)
	fuseDir := filepath.Join(dir, "fuse")
	os.Mkdir(fuseDir, 0o755)
	srv, err := fusefile.Mount(fuseDir, frontend.FUSESource(cp), fusefile.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Unmount() })
	volFile := filepath.Join(fuseDir, "vol")
	dev := testutil.Losetup(t, volFile, false, true)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	ext4 := testutil.Mount(t, dev, dir)

	// The system volumes and their databases.
	xfs := mkfs(t, dir, "xfs", "mkfs.xfs", "-q", "-f", "-m", "reflink=1")
	bfs := mkfs(t, dir, "btrfs", "mkfs.btrfs", "-q", "-f")
	sub := filepath.Join(bfs, "app")
	testutil.Run(t, "btrfs", "subvolume", "create", sub)
	dbX, dbB := filepath.Join(xfs, "orders.db"), filepath.Join(sub, "orders.db")
	ackedX, stopX := ordersApp(t, dbX)
	ackedB, stopB := ordersApp(t, dbB)
	rp, bp := reflink.New(), btrfs.New()
	if err := rp.Add(reflink.Volume{Path: dbX, StorageDir: filepath.Join(xfs, ".shadow")}); err != nil {
		t.Fatal(err)
	}
	if err := bp.Add(sub, filepath.Join(bfs, ".snapshots")); err != nil {
		t.Fatal(err)
	}

	reg := &provider.Registry{}
	for _, p := range []provider.Provider{cp, rp, bp} {
		reg.Register(seqProvider{Provider: p, log: log})
	}
	ws := writer.NewRegistry()
	fsw := &seqWriter{Writer: fsfreeze.New(), log: log}
	sqX := &seqWriter{Writer: wsqlite.New(dbX), log: log, db: dbX}
	sqB := &seqWriter{Writer: wsqlite.New(dbB), log: log, db: dbB}
	for _, w := range []writer.Writer{fsw, sqX, sqB} {
		ws.Add(w)
	}
	c := New(reg, ws, func(vol string) []string {
		if vol == "vol" {
			return []string{volFile}
		}
		return nil
	}, nil)

	waitRows(t, 100, ackedX, ackedB)
	beforeX, beforeB := ackedX(), ackedB()
	set, err := c.CreateSet(ctx, Request{Volumes: []string{"vol", dbX, sub}, Writers: true, ForBackup: true, ID: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	// The apps go on after the thaw, so the live databases grow past the
	// snapshots.
	waitRows(t, max(sqX.thawing.Load(), sqB.thawing.Load())+100, ackedX, ackedB)
	stopX()
	stopB()
	t.Logf("events: %s", strings.Join(log.all(), "; "))
	t.Logf("freeze to thaw %v, hold %v", set.Timings.FreezeToThaw, set.Timings.Hold)

	if want := []string{fsw.Name(), sqX.Name(), sqB.Name()}; !sameSet(set.Writers, want) {
		t.Fatalf("writers of the set: %v, want %v", set.Writers, want)
	}
	if !slices.Equal(fsw.mounts, []string{ext4}) {
		t.Fatalf("fsfreeze was asked to freeze %v, want only the COW volume's ext4 %s", fsw.mounts, ext4)
	}
	// Every writer's own phases in order, none aborted.
	for _, w := range []*seqWriter{fsw, sqX, sqB} {
		last := -1
		for _, ph := range []string{"prepare-for-backup", "prepare-for-snapshot", "freeze", "thaw", "post-snapshot"} {
			i := log.index(w.Name() + " " + ph)
			if i <= last {
				t.Fatalf("%s: %s at %d, after the previous phase at %d", w.Name(), ph, i, last)
			}
			last = i
		}
		if log.index(w.Name()+" abort") >= 0 {
			t.Fatalf("%s was aborted", w.Name())
		}
	}
	// Across them: applications freeze, then the filesystem; every
	// volume commits inside; the filesystem thaws, then the applications.
	commits := []int{log.index("commit vol"), log.index("commit " + dbX), log.index("commit " + sub)}
	first, last := slices.Min(commits), slices.Max(commits)
	if first < 0 {
		t.Fatalf("commits at %v", commits)
	}
	for _, w := range []*seqWriter{sqX, sqB} {
		if f := log.index(w.Name() + " freeze"); f > log.index(fsw.Name()+" freeze") {
			t.Fatalf("%s froze after the filesystem", w.Name())
		}
		if th := log.index(w.Name() + " thaw"); th < log.index(fsw.Name()+" thaw") {
			t.Fatalf("%s thawed before the filesystem", w.Name())
		}
	}
	if log.index(fsw.Name()+" freeze") > first || log.index(fsw.Name()+" thaw") < last {
		t.Fatalf("the commits (%d..%d) are not inside the filesystem freeze", first, last)
	}

	// The databases in the snapshots.
	snaps := map[string]provider.Snapshot{}
	for _, s := range set.Snapshots {
		snaps[s.Volume] = s
	}
	for _, x := range []struct {
		w      *seqWriter
		path   string
		before int64
	}{
		{sqX, snaps[dbX].Path, beforeX},
		{sqB, filepath.Join(snaps[sub].Path, "orders.db"), beforeB},
	} {
		got := snapshotRows(t, x.path)
		frozen, thawing := x.w.frozen.Load(), x.w.thawing.Load()
		if frozen != thawing {
			t.Fatalf("%s: %d rows when the freeze returned, %d when the thaw began: a commit got through the freeze", x.w.db, frozen, thawing)
		}
		if got != frozen || got < x.before {
			t.Fatalf("%s: the snapshot holds %d rows; %d were committed at the freeze, %d acknowledged before the set", x.path, got, frozen, x.before)
		}
		t.Logf("%s: %d rows in the snapshot = rows at freeze; %d acknowledged before the set", x.path, got, x.before)
	}

	// A set made for a backup releases its snapshots.
	if err := set.BackupComplete(ctx, true); err != nil {
		t.Fatal(err)
	}
	for _, vol := range []string{"vol", dbX, sub} {
		p, _ := reg.For(ctx, vol)
		if l, err := p.List(ctx, vol); err != nil || len(l) != 0 {
			t.Fatalf("%s after backup complete: %+v %v", vol, l, err)
		}
	}
}

// waitRows waits until every app has n rows acknowledged.
func waitRows(t *testing.T, n int64, acked ...func() int64) {
	t.Helper()
	for _, a := range acked {
		testutil.WaitFor(t, fmt.Sprintf("the apps reach %d rows", n), func() bool { return a() >= n })
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// TestSystemCommitWaitsOnFreeze pins why the fsfreeze writer is not
// involved for reflink files and btrfs subvolumes: their commit (FICLONE;
// btrfs subvolume snapshot) waits on a frozen filesystem until it thaws,
// so committing inside that freeze would hang until the freeze guard
// thawed it, and the snapshot would be taken after the thaw.
func TestSystemCommitWaitsOnFreeze(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.xfs", "mkfs.btrfs", "btrfs")
	ctx := context.Background()
	dir := t.TempDir()
	xfs := mkfs(t, dir, "xfs", "mkfs.xfs", "-q", "-f", "-m", "reflink=1")
	bfs := mkfs(t, dir, "btrfs", "mkfs.btrfs", "-q", "-f")
	file := filepath.Join(xfs, "disk.img")
	os.WriteFile(file, make([]byte, 1<<20), 0o600)
	sub := filepath.Join(bfs, "app")
	testutil.Run(t, "btrfs", "subvolume", "create", sub)
	rp, bp := reflink.New(), btrfs.New()
	if err := rp.Add(reflink.Volume{Path: file, StorageDir: filepath.Join(xfs, ".shadow")}); err != nil {
		t.Fatal(err)
	}
	if err := bp.Add(sub, filepath.Join(bfs, ".snapshots")); err != nil {
		t.Fatal(err)
	}
	for _, x := range []struct {
		p        provider.Provider
		vol, mnt string
	}{{rp, file, xfs}, {bp, sub, bfs}} {
		t.Run(x.p.Name(), func(t *testing.T) {
			txn, err := x.p.Prepare(ctx, x.vol, provider.SnapshotOptions{ID: "frozen"})
			if err != nil {
				t.Fatal(err)
			}
			if err := txn.PreCommit(ctx, time.Second); err != nil {
				t.Fatal(err)
			}
			fw := fsfreeze.New()
			fw.Guard = 20 * time.Second // never left frozen, whatever fails below
			set := writer.Set{Volumes: []writer.Volume{{Mounts: []string{x.mnt}}}}
			if err := fw.Freeze(ctx, set); err != nil {
				t.Fatal(err)
			}
			thawed := false
			thaw := func() {
				if !thawed {
					thawed = true
					if err := fw.Thaw(ctx, set); err != nil {
						t.Error(err)
					}
				}
			}
			defer thaw()
			done := make(chan error, 1)
			go func() { _, err := txn.Commit(ctx); done <- err }()
			select {
			case err := <-done:
				t.Fatalf("the commit returned (%v) while %s was frozen", err, x.mnt)
			case <-time.After(500 * time.Millisecond):
			}
			thaw()
			if err := testutil.Receive(t, done, "the commit finishes after the thaw"); err != nil {
				t.Fatal(err)
			}
		})
	}
}
