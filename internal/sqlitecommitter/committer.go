// Package sqlitecommitter is a small SQLite application for the demo and
// the tests of application-consistent snapshots: it commits numbered
// rows into an orders table, in WAL mode and without pause, and says
// which row was acknowledged last. A snapshot taken with the SQLite
// writer must hold every acknowledged row up to the freeze.
package sqlitecommitter

import (
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	_ "modernc.org/sqlite" // the database/sql driver "sqlite"
)

// Committer inserts rows 1, 2, 3, … into the table orders (id, note)
// until stopped.
type Committer struct {
	path  string
	db    *sql.DB
	acked atomic.Int64
	quit  chan struct{}
	wg    sync.WaitGroup
	once  sync.Once
	err   error // the insert that stopped it, read after wg.Wait
}

// Start creates the table orders in the database at path (WAL mode)
// and starts committing.
func Start(path string) (*Committer, error) {
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(20000)")
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	db.SetMaxOpenConns(1)
	if _, err := db.Exec("CREATE TABLE orders (id INTEGER PRIMARY KEY, note TEXT)"); err != nil {
		db.Close()
		return nil, fmt.Errorf("%s: create table orders: %w", path, err)
	}
	c := &Committer{path: path, db: db, quit: make(chan struct{})}
	c.wg.Add(1)
	go c.run()
	return c, nil
}

func (c *Committer) run() {
	defer c.wg.Done()
	for i := int64(1); ; i++ {
		select {
		case <-c.quit:
			return
		default:
		}
		if _, err := c.db.Exec("INSERT INTO orders (id, note) VALUES (?, ?)", i, fmt.Sprintf("order %d", i)); err != nil {
			c.err = fmt.Errorf("%s: insert %d: %w", c.path, i, err)
			return
		}
		c.acked.Store(i)
	}
}

// Acked is the last row whose commit returned.
func (c *Committer) Acked() int64 { return c.acked.Load() }

// Stop stops committing, waits for the commit in flight, closes the
// database and returns the insert error that stopped it early, if one
// did. Later calls return the same.
func (c *Committer) Stop() error {
	c.once.Do(func() {
		close(c.quit)
		c.wg.Wait()
		c.db.Close()
	})
	return c.err
}

// CheckCopy opens a copy of the database read-only (a file in a
// snapshot, or copied out of one: SQLite looks for no WAL beside it) and
// returns how many rows it holds. It must pass integrity_check and hold
// rows 1..n with no gap: whole transactions, one point in time.
func CheckCopy(path string) (int64, error) {
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro&immutable=1")
	if err != nil {
		return 0, err
	}
	defer db.Close()
	var ok string
	if err := db.QueryRow("PRAGMA integrity_check").Scan(&ok); err != nil || ok != "ok" {
		return 0, errors.Join(fmt.Errorf("%s: integrity_check = %q", path, ok), err)
	}
	var n, maxID int64
	if err := db.QueryRow("SELECT count(*), coalesce(max(id), 0) FROM orders").Scan(&n, &maxID); err != nil {
		return 0, fmt.Errorf("%s: count the orders: %w", path, err)
	}
	if n != maxID {
		return 0, fmt.Errorf("%s: %d rows but the highest id is %d: a gap, not one point in time", path, n, maxID)
	}
	return n, nil
}
