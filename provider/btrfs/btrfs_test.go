package btrfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"umbra/internal/owner"
	"umbra/internal/testutil"
	"umbra/provider"
)

func TestSubvolumes(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.btrfs", "btrfs")
	ctx := context.Background()
	dir := t.TempDir()
	img := filepath.Join(dir, "b.img")
	testutil.SparseFile(t, img, 256<<20)
	dev := testutil.Losetup(t, img, false, false)
	testutil.Run(t, "mkfs.btrfs", "-q", "-f", dev)
	mnt := testutil.Mount(t, dev, dir)
	vol := filepath.Join(mnt, "data")
	testutil.Run(t, "btrfs", "subvolume", "create", vol)
	os.WriteFile(filepath.Join(vol, "f"), []byte("one"), 0o644)

	p := New()
	defer p.Close()
	if err := p.Add(filepath.Join(mnt, "not-a-subvolume"), filepath.Join(mnt, ".snaps")); err == nil {
		t.Fatal("a plain path was accepted as a subvolume")
	}
	// One owner: a snapshot directory another process (service) holds is
	// refused, named.
	held := filepath.Join(mnt, ".held")
	os.Mkdir(held, 0o700)
	testutil.HoldLock(t, held)
	if err := p.Add(vol, held); !errors.Is(err, owner.ErrHeld) || !strings.Contains(err.Error(), held) {
		t.Fatalf("add with a held snapshot directory: got %v, want it refused naming %s", err, held)
	}
	if err := p.Add(vol, filepath.Join(mnt, ".snaps")); err != nil {
		t.Fatal(err)
	}
	snap := func(id string) provider.Snapshot {
		txn, err := p.Prepare(ctx, vol, provider.SnapshotOptions{ID: id})
		if err != nil {
			t.Fatal(err)
		}
		txn.PreCommit(ctx, time.Second)
		s, err := txn.Commit(ctx)
		if err != nil {
			t.Fatal(err)
		}
		txn.PostCommit(ctx)
		return s
	}
	s1 := snap("s1")
	os.WriteFile(filepath.Join(vol, "f"), []byte("two"), 0o644)
	if b, _ := os.ReadFile(filepath.Join(s1.Path, "f")); string(b) != "one" {
		t.Fatalf("snapshot reads %q", b)
	}
	if err := os.WriteFile(filepath.Join(s1.Path, "g"), nil, 0o644); err == nil {
		t.Fatal("the snapshot is writable")
	}
	snap("s2")
	if _, err := p.Open(ctx, vol, "s1"); !errors.Is(err, provider.ErrNotSupported) {
		t.Fatalf("open: %v, want ErrNotSupported", err)
	}
	if err := p.Revert(ctx, vol, "s1"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(vol, "f")); string(b) != "one" {
		t.Fatalf("after revert the volume reads %q", b)
	}
	list, _ := p.List(ctx, vol)
	if len(list) != 1 || list[0].ID != "s1" {
		t.Fatalf("after revert: %+v", list)
	}
	// Abort after commit removes the snapshot.
	txn, _ := p.Prepare(ctx, vol, provider.SnapshotOptions{ID: "tmp"})
	txn.PreCommit(ctx, time.Second)
	txn.Commit(ctx)
	txn.Abort(ctx)
	if err := p.Delete(ctx, vol, "tmp"); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("aborted snapshot still there: %v", err)
	}
	if err := p.Delete(ctx, vol, "s1"); err != nil {
		t.Fatal(err)
	}
}
