// Package sqlite is the built-in SQLite writer: at freeze it checkpoints
// the write-ahead log (TRUNCATE) and takes the write lock (BEGIN
// IMMEDIATE), holding it until thaw, so the snapshot holds a database whose
// WAL is empty and that opens without recovery.
package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"sync"

	_ "modernc.org/sqlite" // the pure-Go SQLite driver

	"umbra/writer"
)

// Writer quiesces one SQLite database.
type Writer struct {
	writer.Base
	path string

	mu   sync.Mutex // guards db, conn, tx
	db   *sql.DB
	conn *sql.Conn
	tx   bool
}

// New returns the writer of the database at path.
func New(path string) *Writer {
	abs, err := filepath.Abs(path)
	if err != nil {
		abs = path
	}
	return &Writer{path: abs}
}

func (w *Writer) Name() string        { return "sqlite:" + w.path }
func (w *Writer) Level() writer.Level { return writer.LevelApplication }

// Involved: the database lives on a filesystem of the set.
func (w *Writer) Involved(s writer.Set) bool {
	for _, m := range s.Mounts() {
		if writer.Under(w.path, m) {
			return true
		}
	}
	return false
}

// Freeze checkpoints the WAL and holds the write lock.
func (w *Writer) Freeze(ctx context.Context, s writer.Set) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.db == nil {
		db, err := sql.Open("sqlite", "file:"+w.path+"?_pragma=busy_timeout(10000)")
		if err != nil {
			return fmt.Errorf("open %s: %w", w.path, err)
		}
		w.db = db
	}
	conn, err := w.db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("connect %s: %w", w.path, err)
	}
	if _, err := conn.ExecContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)"); err != nil {
		conn.Close()
		return fmt.Errorf("checkpoint %s: %w", w.path, err)
	}
	if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		conn.Close()
		return fmt.Errorf("lock %s: %w", w.path, err)
	}
	// A commit that slipped in between the checkpoint and the lock is in
	// the WAL again: checkpoint once more while holding the lock.
	var busy, logged, done int
	if err := conn.QueryRowContext(ctx, "PRAGMA wal_checkpoint(PASSIVE)").Scan(&busy, &logged, &done); err != nil {
		conn.ExecContext(context.Background(), "ROLLBACK")
		conn.Close()
		return fmt.Errorf("checkpoint %s under lock: %w", w.path, err)
	}
	w.conn, w.tx = conn, true
	return nil
}

// Thaw releases the write lock.
func (w *Writer) Thaw(ctx context.Context, s writer.Set) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.conn == nil {
		return nil
	}
	if w.tx {
		w.conn.ExecContext(context.Background(), "ROLLBACK")
	}
	err := w.conn.Close()
	w.conn, w.tx = nil, false
	return err
}

// Abort releases the lock.
func (w *Writer) Abort(ctx context.Context, s writer.Set) error { return w.Thaw(ctx, s) }
