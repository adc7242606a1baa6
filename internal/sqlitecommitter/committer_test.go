package sqlitecommitter

import (
	"database/sql"
	"path/filepath"
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
