// Package sqlite is the built-in SQLite writer: at freeze it checkpoints
// the write-ahead log (TRUNCATE) and takes the write lock (BEGIN
// IMMEDIATE), holding it until thaw, so the snapshot holds a database whose
// WAL is empty and that opens without recovery.
package sqlite

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
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

// Idle: a database that does not exist (yet) has nothing to quiesce;
// opening it would create it on the volume being snapshotted, or fail
// and abort the set.
func (w *Writer) Idle(s writer.Set) string {
	if _, err := os.Stat(w.path); errors.Is(err, fs.ErrNotExist) {
		return fmt.Sprintf("database %s does not exist", w.path)
	}
	return ""
}

// Freeze checkpoints the WAL and holds the write lock.
func (w *Writer) Freeze(ctx context.Context, s writer.Set) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.db == nil {
		db, err := sql.Open("sqlite", "file:"+w.path+"?mode=rw&_pragma=busy_timeout(10000)")
		if err != nil {
			return fmt.Errorf("open %s: %w", w.path, err)
		}
		w.db = db
	}
	conn, err := w.db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("connect %s: %w", w.path, err)
	}
	// No busy handler: SQLite's sleeps 1, 2, 5 ... 100 ms between tries,
	// and an application that commits without pause takes the write lock
	// back in the few microseconds between its transactions long before
	// such a sleep ends (freezes of 0.2-2.7 s measured). Polling every
	// ~100 us instead catches the gap within milliseconds.
	if _, err := conn.ExecContext(ctx, "PRAGMA busy_timeout = 0"); err != nil {
		w.drop(conn)
		return fmt.Errorf("set busy timeout on %s: %w", w.path, err)
	}
	// Checkpoint, then take the write lock; a commit that slipped in
	// between is in the WAL again, so let go and try again, until the
	// context (the coordinator's freeze timeout) ends.
	var last string
	gaveUp := func(try int) error {
		w.drop(conn)
		return fmt.Errorf("checkpoint %s: the application kept the database busy for %d tries (last: %s); "+
			"a long read transaction holds a checkpoint off: end it, or give the freeze more time: %w",
			w.path, try, cmp.Or(last, "no try finished"), ctx.Err())
	}
	for try := 0; ; try++ {
		if try > 0 {
			select {
			case <-ctx.Done():
				return gaveUp(try)
			case <-time.After(pollInterval(try)):
			}
		}
		var busy, logged, done int
		if err := conn.QueryRowContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)").Scan(&busy, &logged, &done); err != nil {
			if ctx.Err() != nil {
				return gaveUp(try + 1)
			}
			if isBusy(err) {
				last = err.Error()
				continue
			}
			w.drop(conn)
			return fmt.Errorf("checkpoint %s: %w", w.path, err)
		}
		if busy != 0 { // a writer, a reader of an older snapshot, or another checkpoint
			last = fmt.Sprintf("checkpoint busy: %d frames, %d done", logged, done)
			continue
		}
		if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
			if ctx.Err() != nil {
				return gaveUp(try + 1)
			}
			if isBusy(err) { // a commit took the lock first
				last = err.Error()
				continue
			}
			w.drop(conn)
			return fmt.Errorf("lock %s: %w", w.path, err)
		}
		fi, err := os.Stat(w.path + "-wal")
		if err != nil || fi.Size() == 0 {
			break
		}
		conn.ExecContext(context.Background(), "ROLLBACK")
		last = fmt.Sprintf("a commit refilled the WAL to %d bytes", fi.Size())
	}
	w.conn, w.tx = conn, true
	return nil
}

// pollInterval is the pause before try: 100 us for the first ~0.3 s,
// then 1 ms (a reader that keeps an old snapshot open can hold the
// checkpoint off until the freeze timeout).
func pollInterval(try int) time.Duration {
	if try < 2000 {
		return 100 * time.Microsecond
	}
	return time.Millisecond
}

// isBusy reports whether err is SQLite's SQLITE_BUSY or SQLITE_LOCKED
// (the lock is someone else's for now).
func isBusy(err error) bool {
	var e interface{ Code() int }
	if errors.As(err, &e) {
		c := e.Code() & 0xff
		return c == 5 || c == 6
	}
	return false
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
