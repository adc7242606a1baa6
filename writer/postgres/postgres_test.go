package postgres

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/internal/testutil"
	"umbra/writer"
)

// cluster starts a PostgreSQL cluster in a temporary directory (stopped
// at cleanup) and returns its data directory and a DSN for it.
func cluster(t *testing.T) (pgdata, dsn string) {
	t.Helper()
	testutil.NeedRoot(t)
	testutil.Need(t, "runuser")
	initdb, pgctl := testutil.PGBin("initdb"), testutil.PGBin("pg_ctl")
	if initdb == "" || pgctl == "" {
		t.Skip("needs the PostgreSQL server (apt-get install postgresql)")
	}
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755) // the postgres user reaches it
	os.Chmod(dir, 0o755)
	pgdata, sock := filepath.Join(dir, "pgdata"), filepath.Join(dir, "sock")
	os.Mkdir(pgdata, 0o700)
	os.Mkdir(sock, 0o755)
	testutil.Run(t, "chown", "postgres:postgres", pgdata, sock)
	testutil.AsPostgres(t, initdb, "-D", pgdata, "-A", "trust", "-U", "postgres")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	testutil.AsPostgres(t, pgctl, "-D", pgdata, "-o", fmt.Sprintf("-p %d -k %s -c listen_addresses=''", port, sock), "-w", "-l", filepath.Join(sock, "log"), "start")
	t.Cleanup(func() {
		exec.Command("runuser", "-u", "postgres", "--", pgctl, "-D", pgdata, "-m", "immediate", "stop").Run()
	})
	return pgdata, fmt.Sprintf("host=%s port=%d user=postgres dbname=postgres", sock, port)
}

// TestPostgresWriter runs the tests that need a cluster on one (initdb
// takes seconds).
func TestPostgresWriter(t *testing.T) {
	pgdata, dsn := cluster(t)
	t.Run("labels", func(t *testing.T) { testBackupLabels(t, pgdata, dsn) })
	t.Run("abort", func(t *testing.T) { testAbortEndsBackup(t, pgdata, dsn) })
}

// testBackupLabels: freeze starts a backup that thaw stops; the set's
// labels name it and its WAL start, stay until backup complete, and the
// next set starts a backup of its own (the session of the first ended).
func testBackupLabels(t *testing.T, pgdata, dsn string) {
	w := New(dsn, pgdata)
	if w.Name() != "postgres:"+pgdata || w.Level() != writer.LevelApplication {
		t.Fatalf("writer %s level %v", w.Name(), w.Level())
	}
	ctx := context.Background()
	for _, id := range []string{"set-1", "set-2"} {
		s := writer.Set{ID: id}
		if err := w.Freeze(ctx, s); err != nil {
			t.Fatalf("freeze %s: %v", id, err)
		}
		if err := w.Thaw(ctx, s); err != nil {
			t.Fatalf("thaw %s: %v", id, err)
		}
		l, ok := w.Labels(id)
		if !ok || !strings.Contains(l.BackupLabel, "START WAL LOCATION") || !strings.Contains(l.BackupLabel, "LABEL: umbra "+id) || l.StopLSN == "" {
			t.Fatalf("labels of %s: %+v %v", id, l, ok)
		}
		if err := w.BackupComplete(ctx, s, true); err != nil {
			t.Fatal(err)
		}
		if _, ok := w.Labels(id); ok {
			t.Fatalf("labels of %s kept after backup complete", id)
		}
	}
	// Thaw with nothing frozen does nothing.
	if err := w.Thaw(ctx, writer.Set{ID: "none"}); err != nil {
		t.Fatalf("thaw without a freeze: %v", err)
	}
}

// testAbortEndsBackup: abort after freeze ends the backup (its session
// goes), so a set after it starts and stops a backup normally; abort
// without a freeze does nothing.
func testAbortEndsBackup(t *testing.T, pgdata, dsn string) {
	w := New(dsn, pgdata)
	ctx := context.Background()
	if err := w.Abort(ctx, writer.Set{ID: "a"}); err != nil {
		t.Fatalf("abort without a freeze: %v", err)
	}
	if err := w.Freeze(ctx, writer.Set{ID: "a"}); err != nil {
		t.Fatal(err)
	}
	if err := w.Abort(ctx, writer.Set{ID: "a"}); err != nil {
		t.Fatal(err)
	}
	if _, ok := w.Labels("a"); ok {
		t.Fatal("an aborted set has labels")
	}
	if err := w.Freeze(ctx, writer.Set{ID: "b"}); err != nil {
		t.Fatalf("freeze after an abort: %v", err)
	}
	if err := w.Thaw(ctx, writer.Set{ID: "b"}); err != nil {
		t.Fatalf("thaw after an abort: %v", err)
	}
}

// TestInvolvedAndUnreachable: the writer takes part in sets whose mounts
// hold its data directory; a cluster it cannot reach fails the freeze
// naming the data directory.
func TestInvolvedAndUnreachable(t *testing.T) {
	dir := t.TempDir()
	pgdata := filepath.Join(dir, "pgdata")
	w := New("host="+filepath.Join(dir, "nosock")+" port=1 user=postgres connect_timeout=5", pgdata)
	in := writer.Set{Volumes: []writer.Volume{{Name: "v", Mounts: []string{dir}}}}
	out := writer.Set{Volumes: []writer.Volume{{Name: "v", Mounts: []string{filepath.Join(dir, "other")}}}}
	if !w.Involved(in) || w.Involved(out) {
		t.Fatalf("involved in a set holding %s: %v; in one that does not: %v", pgdata, w.Involved(in), w.Involved(out))
	}
	err := w.Freeze(context.Background(), in)
	if err == nil || !strings.Contains(err.Error(), "connect to PostgreSQL") || !strings.Contains(err.Error(), pgdata) {
		t.Fatalf("freeze of an unreachable cluster: %v", err)
	}
}
