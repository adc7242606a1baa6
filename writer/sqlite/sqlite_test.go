package sqlite

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

	"umbra/internal/testutil"
	"umbra/writer"
)

// app is a database in WAL mode that a goroutine commits to without
// pause, as the demo's and the coordinator tests' applications do.
type app struct {
	path    string
	db      *sql.DB
	commits atomic.Int64
	stop    chan struct{}
	wg      sync.WaitGroup
}

func startApp(t testing.TB) *app {
	t.Helper()
	a := &app{path: filepath.Join(t.TempDir(), "app.db"), stop: make(chan struct{})}
	db, err := sql.Open("sqlite", "file:"+a.path+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(20000)")
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	if _, err := db.Exec("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)"); err != nil {
		t.Fatal(err)
	}
	a.db = db
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		p := make([]byte, 64)
		for i := int64(1); ; i++ {
			select {
			case <-a.stop:
				return
			default:
			}
			if _, err := db.Exec("INSERT INTO t VALUES (?, ?)", i, p); err != nil {
				t.Errorf("commit %d: %v", i, err)
				return
			}
			a.commits.Store(i)
		}
	}()
	t.Cleanup(func() { close(a.stop); a.wg.Wait(); db.Close() })
	return a
}

// TestFreezeUnderCommits: with an application committing without pause,
// each freeze leaves an empty WAL and holds the application's commits
// until thaw; then they resume.
func TestFreezeUnderCommits(t *testing.T) {
	a := startApp(t)
	w := New(a.path)
	// Thawed before the application stops, should a check fail while
	// frozen (the application would wait out its busy timeout).
	t.Cleanup(func() { w.Thaw(context.Background(), writer.Set{}) })
	// What is committed is read from the database, not from the
	// application's counter, which it updates a moment after each commit
	// (on a loaded machine, after a freeze that came in between).
	r, err := sql.Open("sqlite", "file:"+a.path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	committed := func() int64 {
		var n int64
		if err := r.QueryRow("SELECT coalesce(max(id), 0) FROM t").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	var took []time.Duration
	for k, held := 0, int64(0); k < 10; k++ {
		// Each freeze comes while the application commits.
		prev := held
		testutil.WaitFor(t, "the application commits", func() bool { return committed() > prev })
		t0 := time.Now()
		if err := w.Freeze(context.Background(), writer.Set{}); err != nil {
			t.Fatalf("freeze %d: %v", k, err)
		}
		took = append(took, time.Since(t0))
		if fi, err := os.Stat(a.path + "-wal"); err != nil || fi.Size() != 0 {
			t.Fatalf("freeze %d: the WAL is not empty (%v)", k, err)
		}
		held = committed()
		time.Sleep(30 * time.Millisecond) // a chance for a commit to get through; none may
		if n := committed(); n != held {
			t.Fatalf("freeze %d: %d commits went through while frozen", k, n-held)
		}
		if err := w.Thaw(context.Background(), writer.Set{}); err != nil {
			t.Fatal(err)
		}
		testutil.WaitFor(t, fmt.Sprintf("the application commits again after thaw %d", k), func() bool { return committed() > held })
	}
	slices.Sort(took)
	t.Logf("10 freezes under %d commits: median %v, worst %v", a.commits.Load(), took[5], took[9])
}

// TestFreezeGivesUp: a reader that keeps an old snapshot open holds the
// checkpoint off; the freeze gives up when its context ends, says why,
// and leaves the database usable.
func TestFreezeGivesUp(t *testing.T) {
	a := startApp(t)
	r, err := sql.Open("sqlite", "file:"+a.path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	tx, err := r.Begin()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := tx.QueryRow("SELECT count(*) FROM t").Scan(&n); err != nil { // the read snapshot starts here
		t.Fatal(err)
	}
	for before := a.commits.Load(); a.commits.Load() < before+10; {
		time.Sleep(time.Millisecond) // commits after the reader's snapshot
	}
	w := New(a.path)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err = w.Freeze(ctx, writer.Set{})
	if err == nil || !strings.Contains(err.Error(), "kept the database busy") {
		t.Fatalf("freeze with a reader holding an old snapshot: %v, want it to give up", err)
	}
	tx.Rollback()
	before := a.commits.Load()
	testutil.WaitFor(t, "the application commits after the failed freeze", func() bool { return a.commits.Load() > before })
	if err := w.Freeze(context.Background(), writer.Set{}); err != nil {
		t.Fatalf("freeze once the reader is gone: %v", err)
	}
	w.Thaw(context.Background(), writer.Set{})
}

// BenchmarkFreezeUnderCommits: how long a freeze takes while an
// application commits without pause (ms-median and ms-worst per run).
func BenchmarkFreezeUnderCommits(b *testing.B) {
	a := startApp(b)
	w := New(a.path)
	var took []time.Duration
	for i := 0; i < b.N; i++ {
		time.Sleep(20 * time.Millisecond)
		t0 := time.Now()
		if err := w.Freeze(context.Background(), writer.Set{}); err != nil {
			b.Fatal(err)
		}
		took = append(took, time.Since(t0))
		w.Thaw(context.Background(), writer.Set{})
	}
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2])/1e6, "ms-median")
	b.ReportMetric(float64(took[len(took)-1])/1e6, "ms-worst")
}

// A configured database that does not exist has nothing to quiesce: the
// writer says so (it does not take part in the set), and a freeze never
// creates the file on the volume being snapshotted.
func TestMissingDatabase(t *testing.T) {
	dir := t.TempDir()
	for _, path := range []string{filepath.Join(dir, "app.db"), filepath.Join(dir, "not-yet", "app.db")} {
		w := New(path)
		if why := w.Idle(writer.Set{}); !strings.Contains(why, path) || !strings.Contains(why, "does not exist") {
			t.Errorf("Idle for missing %s: %q, want it to say the database does not exist", path, why)
		}
		if err := w.Freeze(context.Background(), writer.Set{}); err == nil {
			t.Errorf("freeze of missing %s succeeded", path)
		}
		w.Thaw(context.Background(), writer.Set{})
		if _, err := os.Stat(path); err == nil {
			t.Errorf("freeze created %s", path)
		}
	}
	a := startApp(t)
	if why := New(a.path).Idle(writer.Set{}); why != "" {
		t.Errorf("Idle for an existing database: %q", why)
	}
}
