// Package postgres is the built-in PostgreSQL writer: at freeze it runs
// CHECKPOINT and pg_backup_start on a session it keeps open, and at thaw
// pg_backup_stop, whose backup_label, tablespace map and end LSN it keeps
// for the set. A copy of the snapshot's data directory with that
// backup_label, and the WAL up to the end LSN, starts with recovery only
// up to the backup's end, as a base backup does, instead of crash recovery.
package postgres

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/jackc/pgx/v5"

	"umbra/writer"
)

// Labels are what pg_backup_stop returned for one set.
type Labels struct {
	BackupLabel   string `json:"backup_label"`
	TablespaceMap string `json:"tablespace_map"`
	// StopLSN is where the backup ends: recovery of the snapshot needs the
	// WAL up to it (the snapshot holds the WAL up to the commit; the rest
	// is in the live cluster's pg_wal or its archive).
	StopLSN string `json:"stop_lsn"`
}

// Writer quiesces one PostgreSQL cluster.
type Writer struct {
	writer.Base
	dsn     string
	dataDir string

	mu     sync.Mutex // guards conn and labels
	conn   *pgx.Conn
	labels map[string]Labels
}

// New returns the writer of the cluster reached with dsn (a libpq
// connection string or URL) whose data directory is dataDir.
func New(dsn, dataDir string) *Writer {
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		abs = dataDir
	}
	return &Writer{dsn: dsn, dataDir: abs, labels: map[string]Labels{}}
}

func (w *Writer) Name() string        { return "postgres:" + w.dataDir }
func (w *Writer) Level() writer.Level { return writer.LevelApplication }

// Involved: the data directory lives on a filesystem of the set.
func (w *Writer) Involved(s writer.Set) bool { return s.Holds(w.dataDir) }

// Freeze checkpoints and starts a non-exclusive backup.
func (w *Writer) Freeze(ctx context.Context, s writer.Set) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	conn, err := pgx.Connect(ctx, w.dsn)
	if err != nil {
		return fmt.Errorf("connect to PostgreSQL (%s): %w", w.dataDir, err)
	}
	if _, err := conn.Exec(ctx, "CHECKPOINT"); err != nil {
		conn.Close(context.Background())
		return fmt.Errorf("CHECKPOINT: %w", err)
	}
	if _, err := conn.Exec(ctx, "SELECT pg_backup_start($1, true)", "umbra "+s.ID); err != nil {
		conn.Close(context.Background())
		return fmt.Errorf("pg_backup_start: %w", err)
	}
	w.conn = conn
	return nil
}

// Thaw stops the backup and keeps its labels for the set.
func (w *Writer) Thaw(ctx context.Context, s writer.Set) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.conn == nil {
		return nil
	}
	defer func() { w.conn.Close(context.Background()); w.conn = nil }()
	var l Labels
	if err := w.conn.QueryRow(ctx, "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)").Scan(&l.StopLSN, &l.BackupLabel, &l.TablespaceMap); err != nil {
		return fmt.Errorf("pg_backup_stop: %w", err)
	}
	w.labels[s.ID] = l
	return nil
}

// Abort ends the backup, if one was started (closing the session does).
func (w *Writer) Abort(ctx context.Context, s writer.Set) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.conn != nil {
		w.conn.Close(context.Background())
		w.conn = nil
	}
	return nil
}

// BackupComplete forgets the set's labels.
func (w *Writer) BackupComplete(ctx context.Context, s writer.Set, ok bool) error {
	w.mu.Lock()
	delete(w.labels, s.ID)
	w.mu.Unlock()
	return nil
}

// Labels returns the backup labels of set id: write BackupLabel as
// backup_label (and TablespaceMap as tablespace_map when not empty) into a
// copy of the snapshot's data directory, and make the WAL up to StopLSN
// available (pg_wal or restore_command), before starting it.
func (w *Writer) Labels(id string) (Labels, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	l, ok := w.labels[id]
	return l, ok
}
