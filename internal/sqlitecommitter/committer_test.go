package sqlitecommitter

import (
	"database/sql"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestEveryAckedRowIsThere: after Stop, the database holds rows 1..Acked,
// no gap and nothing past the last acknowledged commit.
func TestEveryAckedRowIsThere(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.db")
	c, err := Start(path)
	if err != nil {
		t.Fatal(err)
	}
	for c.Acked() < 10 {
		time.Sleep(time.Millisecond)
	}
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := c.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n, maxID int64
	if err := db.QueryRow("SELECT count(*), max(id) FROM orders").Scan(&n, &maxID); err != nil {
		t.Fatal(err)
	}
	if n != c.Acked() || maxID != c.Acked() {
		t.Errorf("%d rows up to %d, want 1..%d", n, maxID, c.Acked())
	}
}

// TestStartRefusesAnExistingTable: a database that already has orders is
// refused, naming the file.
func TestStartRefusesAnExistingTable(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.db")
	c, err := Start(path)
	if err != nil {
		t.Fatal(err)
	}
	c.Stop()
	if c, err := Start(path); err == nil {
		c.Stop()
		t.Fatal("Start on a database with orders: no error")
	}
}

// TestCheckCopy: a stopped database checks whole; a gap in the rows or a
// file that is not a database is an error naming the file.
func TestCheckCopy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.db")
	c, err := Start(path)
	if err != nil {
		t.Fatal(err)
	}
	for c.Acked() < 3 {
		time.Sleep(time.Millisecond)
	}
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if n, err := CheckCopy(path); err != nil || n != c.Acked() {
		t.Fatalf("CheckCopy: %d rows, %v; want %d", n, err, c.Acked())
	}
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("PRAGMA journal_mode=DELETE; DELETE FROM orders WHERE id = 2"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	if _, err := CheckCopy(path); err == nil || !strings.Contains(err.Error(), "gap") || !strings.Contains(err.Error(), path) {
		t.Fatalf("CheckCopy with row 2 gone: %v, want an error naming the gap and the file", err)
	}
	junk := filepath.Join(t.TempDir(), "junk.db")
	os.WriteFile(junk, []byte(strings.Repeat("not a database ", 400)), 0o600)
	if _, err := CheckCopy(junk); err == nil || !strings.Contains(err.Error(), junk) {
		t.Fatalf("CheckCopy of a file that is no database: %v, want an error naming it", err)
	}
}
