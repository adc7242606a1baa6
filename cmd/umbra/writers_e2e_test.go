package main

import (
	"database/sql"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	_ "modernc.org/sqlite"

	"umbra/internal/testutil"
)

// TestSQLiteWriterNoDatabase: a configured --sqlite-writer database that
// does not exist yet on a mounted volume does not abort the set: the
// writer does not participate (writers list says so), the filesystem is
// still frozen, and once the database exists it takes part.
func TestSQLiteWriterNoDatabase(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.NeedFUSE(t)
	testutil.Need(t, "losetup", "mkfs.ext4")
	dir := t.TempDir()
	fuseDir := filepath.Join(dir, "fuse")
	mnt := filepath.Join(dir, "mnt")
	db := filepath.Join(mnt, "app", "app.db")
	s := startService(t, dir, []string{"v"}, "--fuse-dir", fuseDir, "--sqlite-writer", db)
	file := filepath.Join(fuseDir, "v")
	waitFile(t, file, "the volume's FUSE file")
	dev := testutil.Losetup(t, file, false, true)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	os.Mkdir(mnt, 0o755)
	testutil.Run(t, "mount", dev, mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })

	out := s.ok("snapshot", "create", "v", "--writers", "--id", "s1", "--json")
	if !strings.Contains(out, "fsfreeze") || strings.Contains(out, "sqlite:") {
		t.Fatalf("writers of the set without a database (want fsfreeze, not sqlite):\n%s", out)
	}
	state := func() string {
		var l struct {
			Writers []struct{ Name, State string }
		}
		if err := json.Unmarshal([]byte(s.ok("writers", "list", "--json")), &l); err != nil {
			t.Fatal(err)
		}
		for _, w := range l.Writers {
			if w.Name == "sqlite:"+db {
				return w.State
			}
		}
		t.Fatalf("writers list has no sqlite:%s", db)
		return ""
	}
	if st := state(); st != "not participating" {
		t.Fatalf("sqlite writer's state %q, want not participating", st)
	}
	if _, err := os.Stat(db); err == nil {
		t.Fatal("the writer created the database")
	}

	os.Mkdir(filepath.Dir(db), 0o755)
	h, err := sql.Open("sqlite", "file:"+db+"?_pragma=journal_mode(WAL)")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Exec("CREATE TABLE t (x)"); err != nil {
		t.Fatal(err)
	}
	h.Close()
	out = s.ok("snapshot", "create", "v", "--writers", "--id", "s2", "--json")
	if !strings.Contains(out, "sqlite:"+db) {
		t.Fatalf("writers of the set with the database:\n%s", out)
	}
	if st := state(); st != "stable" {
		t.Fatalf("sqlite writer's state after taking part %q, want stable", st)
	}
}
