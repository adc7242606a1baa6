// Package providertest is the conformance suite every provider passes (in
// the spirit of containerd's snapshots/testsuite): snapshots read their
// commit point after later writes, delete works at any position without
// changing what the others read, abort before and after commit leaves
// nothing, revert restores the volume, and bad names give typed errors.
package providertest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"umbra/provider"
)

// Volume is what the suite needs of a volume under test.
type Volume struct {
	Provider provider.Provider
	Name     string
	Size     int64
	// Write and Read access the live volume the way its users do.
	Write func(t *testing.T, off int64, p []byte)
	Read  func(t *testing.T, off int64, p []byte)
}

// Run runs the suite; newVolume makes a fresh volume for each case.
func Run(t *testing.T, newVolume func(t *testing.T) Volume) {
	t.Run("ReadsCommitPoint", func(t *testing.T) { readsCommitPoint(t, newVolume(t)) })
	t.Run("DeleteAnyPosition", func(t *testing.T) { deleteAny(t, newVolume(t)) })
	t.Run("Abort", func(t *testing.T) { abort(t, newVolume(t)) })
	t.Run("Revert", func(t *testing.T) { revert(t, newVolume(t)) })
	t.Run("Errors", func(t *testing.T) { errs(t, newVolume(t)) })
}

func create(t *testing.T, v Volume, id string) provider.Snapshot {
	t.Helper()
	ctx := context.Background()
	txn, err := v.Provider.Prepare(ctx, v.Name, provider.SnapshotOptions{ID: id, Persistent: true})
	if err != nil {
		t.Fatalf("prepare %s: %v", id, err)
	}
	if err := txn.PreCommit(ctx, 5*time.Second); err != nil {
		t.Fatalf("pre-commit %s: %v", id, err)
	}
	s, err := txn.Commit(ctx)
	if err != nil {
		t.Fatalf("commit %s: %v", id, err)
	}
	if err := txn.PostCommit(ctx); err != nil {
		t.Fatalf("post-commit %s: %v", id, err)
	}
	if s.ID != id || !s.Valid {
		t.Fatalf("committed %+v, want a valid %s", s, id)
	}
	return s
}

func content(t *testing.T, v Volume) []byte {
	b := make([]byte, v.Size)
	v.Read(t, 0, b)
	return b
}

func readSnap(t *testing.T, v Volume, id string) []byte {
	t.Helper()
	img, err := v.Provider.Open(context.Background(), v.Name, id)
	if err != nil {
		t.Fatalf("open %s: %v", id, err)
	}
	defer img.Close()
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil {
		t.Fatalf("read %s: %v", id, err)
	}
	return b
}

// scribble writes a distinct pattern over a few places.
func scribble(t *testing.T, v Volume, k int) {
	for i := int64(0); i < 5; i++ {
		off := (int64(k)*7919 + i*104729) * 4096 % (v.Size - 8192)
		v.Write(t, off, bytes.Repeat([]byte{byte(k*10 + int(i) + 1)}, 5000))
	}
}

func readsCommitPoint(t *testing.T, v Volume) {
	var views [][]byte
	for k := 0; k < 4; k++ {
		scribble(t, v, k)
		views = append(views, content(t, v))
		create(t, v, fmt.Sprintf("c%d", k))
	}
	scribble(t, v, 9)
	for k, want := range views {
		if got := readSnap(t, v, fmt.Sprintf("c%d", k)); !bytes.Equal(got, want) {
			t.Fatalf("snapshot c%d does not read its commit point", k)
		}
	}
	list, err := v.Provider.List(context.Background(), v.Name)
	if err != nil || len(list) != 4 {
		t.Fatalf("list: %d snapshots, %v", len(list), err)
	}
}

func deleteAny(t *testing.T, v Volume) {
	ctx := context.Background()
	views := map[string][]byte{}
	for k := 0; k < 5; k++ {
		scribble(t, v, k)
		id := fmt.Sprintf("d%d", k)
		views[id] = content(t, v)
		create(t, v, id)
	}
	for _, id := range []string{"d2", "d0", "d4"} { // middle, oldest, newest
		if err := v.Provider.Delete(ctx, v.Name, id); err != nil {
			t.Fatalf("delete %s: %v", id, err)
		}
		delete(views, id)
		for other, want := range views {
			if got := readSnap(t, v, other); !bytes.Equal(got, want) {
				t.Fatalf("after deleting %s, %s reads different bytes", id, other)
			}
		}
	}
	if _, err := v.Provider.Open(ctx, v.Name, "d2"); err == nil {
		t.Fatal("a deleted snapshot opened")
	}
}

func abort(t *testing.T, v Volume) {
	ctx := context.Background()
	txn, err := v.Provider.Prepare(ctx, v.Name, provider.SnapshotOptions{ID: "before"})
	if err != nil {
		t.Fatal(err)
	}
	if err := txn.Abort(ctx); err != nil {
		t.Fatal(err)
	}
	txn, err = v.Provider.Prepare(ctx, v.Name, provider.SnapshotOptions{ID: "after"})
	if err != nil {
		t.Fatal(err)
	}
	txn.PreCommit(ctx, 5*time.Second)
	if _, err := txn.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := txn.Abort(ctx); err != nil {
		t.Fatal(err)
	}
	if list, _ := v.Provider.List(ctx, v.Name); len(list) != 0 {
		t.Fatalf("aborts left %+v", list)
	}
	scribble(t, v, 3) // the volume is not held
}

func revert(t *testing.T, v Volume) {
	if !v.Provider.Capabilities().Revert {
		t.Skip("provider does not revert")
	}
	scribble(t, v, 1)
	want := content(t, v)
	create(t, v, "r1")
	scribble(t, v, 2)
	create(t, v, "r2")
	scribble(t, v, 3)
	if err := v.Provider.Revert(context.Background(), v.Name, "r1"); err != nil {
		t.Fatal(err)
	}
	if got := content(t, v); !bytes.Equal(got, want) {
		t.Fatal("revert did not restore the volume")
	}
	if _, err := v.Provider.Open(context.Background(), v.Name, "r2"); err == nil {
		t.Fatal("a snapshot later than the revert target survived")
	}
}

func errs(t *testing.T, v Volume) {
	ctx := context.Background()
	if err := v.Provider.Delete(ctx, v.Name, "missing"); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("delete missing: %v, want ErrNotFound", err)
	}
	if _, err := v.Provider.Open(ctx, v.Name, "missing"); !errors.Is(err, provider.ErrNotFound) {
		t.Fatalf("open missing: %v, want ErrNotFound", err)
	}
	if err := v.Provider.Supports(ctx, "no-such-volume"); err == nil {
		t.Fatal("supports an unknown volume")
	}
	if _, err := v.Provider.Prepare(ctx, v.Name, provider.SnapshotOptions{ID: "bad id/with slash"}); err == nil {
		t.Fatal("accepted a bad snapshot id")
	}
	create(t, v, "dup")
	if _, err := v.Provider.Prepare(ctx, v.Name, provider.SnapshotOptions{ID: "dup"}); err != nil {
		if !errors.Is(err, provider.ErrExists) {
			t.Fatalf("duplicate id at prepare: %v, want ErrExists", err)
		}
	} else {
		// Some providers find the duplicate only at commit.
		txn, _ := v.Provider.Prepare(ctx, v.Name, provider.SnapshotOptions{ID: "dup"})
		txn.PreCommit(ctx, time.Second)
		if _, err := txn.Commit(ctx); !errors.Is(err, provider.ErrExists) {
			t.Fatalf("duplicate id: %v, want ErrExists", err)
		}
		txn.Abort(ctx)
	}
}
