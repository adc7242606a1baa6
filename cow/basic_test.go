package cow

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"umbra/provider"
)

// newTestVolume makes a sparse origin of size bytes and opens it.
func newTestVolume(t *testing.T, size int64, opts Options) (*Volume, string) {
	t.Helper()
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin.img")
	if err := os.WriteFile(origin, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(origin, size); err != nil {
		t.Fatal(err)
	}
	if opts.StorageDir == "" {
		opts.StorageDir = filepath.Join(dir, "diff")
	}
	v, err := Open("vol0", origin, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v, origin
}

func mustWrite(t *testing.T, w interface {
	WriteAt([]byte, int64) (int, error)
}, b []byte, off int64) {
	t.Helper()
	if _, err := w.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func readAll(t *testing.T, r interface {
	ReadAt([]byte, int64) (int, error)
}, size int64) []byte {
	t.Helper()
	b := make([]byte, size)
	if _, err := r.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSnapshotChain(t *testing.T) {
	ctx := context.Background()
	const size = 1 << 20
	v, _ := newTestVolume(t, size, Options{ChunkSize: 4096})
	model := make([]byte, size)
	write := func(b byte, off, n int64) {
		p := bytes.Repeat([]byte{b}, int(n))
		mustWrite(t, v, p, off)
		copy(model[off:], p)
	}
	write(1, 0, size)
	var views [][]byte
	var ids []string
	for i := 0; i < 5; i++ {
		s, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, s.ID)
		views = append(views, append([]byte(nil), model...))
		write(byte(10+i), int64(i)*7000+100, 9000)
		write(byte(20+i), 3000, 100)
	}
	check := func() {
		t.Helper()
		for i, id := range ids {
			if id == "" {
				continue
			}
			s, err := v.OpenSnapshot(id)
			if err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, s, size); !bytes.Equal(got, views[i]) {
				t.Fatalf("snapshot %s differs from its commit point", id)
			}
		}
		if got := readAll(t, v, size); !bytes.Equal(got, model) {
			t.Fatal("origin differs from model")
		}
	}
	check()
	if err := v.DeleteSnapshot(ids[2]); err != nil {
		t.Fatal(err)
	}
	ids[2] = ""
	check()
	if err := v.DeleteSnapshot(ids[0]); err != nil {
		t.Fatal(err)
	}
	ids[0] = ""
	check()
	if err := v.Revert(ids[1]); err != nil {
		t.Fatal(err)
	}
	model = append([]byte(nil), views[1]...)
	ids[3], ids[4] = "", ""
	check()
	if _, err := v.OpenSnapshot("nope"); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("open unknown snapshot: %v", err)
	}
}

func TestPersistentReopen(t *testing.T) {
	ctx := context.Background()
	const size = 256 << 10
	dir := t.TempDir()
	origin := filepath.Join(dir, "o.img")
	os.WriteFile(origin, bytes.Repeat([]byte{7}, size), 0o600)
	opts := Options{ChunkSize: 4096, StorageDir: filepath.Join(dir, "diff")}
	v, err := Open("v", origin, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "p1", Persistent: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "n1"}); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, v, bytes.Repeat([]byte{9}, 10000), 5000)
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v, err = Open("v", origin, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if errs := v.RecoveryErrors(); len(errs) > 0 {
		t.Fatal(errs)
	}
	snaps := v.Snapshots()
	if len(snaps) != 1 || snaps[0].ID != "p1" || !snaps[0].Valid {
		t.Fatalf("after reopen: %+v", snaps)
	}
	s, _ := v.OpenSnapshot("p1")
	if got := readAll(t, s, size); !bytes.Equal(got, bytes.Repeat([]byte{7}, size)) {
		t.Fatal("persistent snapshot changed across reopen")
	}
	_, reliable, err := v.Changed("p1", "")
	if err != nil || !reliable {
		t.Fatalf("changed after clean reopen: reliable=%v err=%v", reliable, err)
	}
}
