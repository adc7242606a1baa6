// Package sqlite is the built-in SQLite writer: at freeze it checkpoints
// the write-ahead log (TRUNCATE) and takes the write lock (BEGIN
// IMMEDIATE), holding it until thaw, so the snapshot holds a database whose
// WAL is empty and that opens without recovery.
package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

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
func (w *Writer) Involved(s writer.Set) bool { return s.Holds(w.path) }

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
	if _, err := conn.ExecContext(ctx, "PRAGMA busy_timeout = 10000"); err != nil {
		w.drop(conn)
		return fmt.Errorf("set busy timeout on %s: %w", w.path, err)
	}
	// Checkpoint, then take the write lock; a commit that slipped in
	// between is in the WAL again, so let go and try again.
	for try := 0; ; try++ {
		var busy, logged, done int
		if err := conn.QueryRowContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)").Scan(&busy, &logged, &done); err != nil {
			w.drop(conn)
			return fmt.Errorf("checkpoint %s: %w", w.path, err)
		}
		if busy != 0 {
			// Another connection is checkpointing (auto-checkpoint):
			// SQLite says busy at once, without its busy handler.
			select {
			case <-ctx.Done():
				w.drop(conn)
				return fmt.Errorf("checkpoint %s: still busy: %w", w.path, ctx.Err())
			case <-time.After(time.Duration(min(try+1, 20)) * time.Millisecond):
			}
			continue
		}
		if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
			w.drop(conn)
			return fmt.Errorf("lock %s: %w", w.path, err)
		}
		fi, err := os.Stat(w.path + "-wal")
		if err != nil || fi.Size() == 0 {
			break
		}
		conn.ExecContext(context.Background(), "ROLLBACK")
		if try == 1000 || ctx.Err() != nil {
			w.drop(conn)
			return fmt.Errorf("checkpoint %s: commits keep refilling the WAL (last checkpoint: busy=%d, %d frames, %d done; WAL %d bytes)", w.path, busy, logged, done, fi.Size())
		}
	}
	w.conn, w.tx = conn, true
	return nil
}

// drop closes a connection and the database after a failed freeze;
// caller holds mu.
func (w *Writer) drop(conn *sql.Conn) {
	conn.Close()
	w.db.Close()
	w.db = nil
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
	// Keep no handle between sets: an open database would keep its
	// filesystem busy (no umount).
	w.db.Close()
	w.conn, w.tx, w.db = nil, false, nil
	return err
}

// Abort releases the lock.
func (w *Writer) Abort(ctx context.Context, s writer.Set) error { return w.Thaw(ctx, s) }
