package cow

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"umbra/internal/owner"
	"umbra/internal/testutil"
	"umbra/provider"
)

// A regular-file origin is owned by one open volume: a second Open of the
// same file (another service, or the same one twice) is refused, names
// the file, and leaves the first volume's snapshot as it was.
func TestOpenRefusesOwnedOrigin(t *testing.T) {
	v, origin := newTestVolume(t, 1<<20, Options{})
	mustWrite(t, v, bytes.Repeat([]byte{1}, 4096), 0)
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s1"}); err != nil {
		t.Fatal(err)
	}
	_, err := Open("dup", origin, Options{StorageDir: filepath.Join(t.TempDir(), "other")})
	if !errors.Is(err, owner.ErrHeld) {
		t.Fatalf("second open of %s: got %v, want it refused as in use", origin, err)
	}
	if !strings.Contains(err.Error(), "volume file "+origin) {
		t.Errorf("error %q does not name the volume file", err)
	}
	s, err := v.OpenSnapshot("s1")
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, v, bytes.Repeat([]byte{2}, 4096), 0)
	if got := readAll(t, s, 4096); !bytes.Equal(got, bytes.Repeat([]byte{1}, 4096)) {
		t.Fatal("the first volume's snapshot changed")
	}
	// Closing the owner frees the file.
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := Open("again", origin, Options{StorageDir: filepath.Join(t.TempDir(), "other")})
	if err != nil {
		t.Fatalf("open after the owner closed: %v", err)
	}
	v2.Close()
}

// A shadow storage directory another process holds is refused at Open
// and by SetStorage; volumes of one process share theirs.
func TestStorageDirOwned(t *testing.T) {
	dir := t.TempDir()
	shared := filepath.Join(dir, "shared")
	a, _ := newTestVolume(t, 1<<20, Options{StorageDir: shared})
	b, _ := newTestVolume(t, 1<<20, Options{StorageDir: shared})
	_, _ = a, b

	held := filepath.Join(dir, "held")
	if err := os.Mkdir(held, 0o700); err != nil {
		t.Fatal(err)
	}
	testutil.HoldLock(t, held)
	origin := filepath.Join(dir, "c.img")
	if err := os.WriteFile(origin, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Open("c", origin, Options{StorageDir: held})
	if !errors.Is(err, owner.ErrHeld) || !strings.Contains(err.Error(), "shadow storage directory "+held) {
		t.Fatalf("open with a held storage directory: got %v, want it refused naming %s", err, held)
	}
	// The refused Open let the origin go.
	c, err := Open("c", origin, Options{StorageDir: filepath.Join(dir, "own")})
	if err != nil {
		t.Fatalf("open with its own storage: %v", err)
	}
	defer c.Close()
	if err := c.SetStorage(held, 0, ""); !errors.Is(err, owner.ErrHeld) {
		t.Fatalf("SetStorage to a held directory: got %v, want it refused", err)
	}
	if got := c.Storage().Dir; got != filepath.Join(dir, "own") {
		t.Fatalf("refused SetStorage changed the directory to %s", got)
	}
}
