package cow

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"umbra/provider"
)

// A persistent snapshot's copy and its mapping record are made durable
// together; when the diff area's sync fails the record may be on disk
// and its data not. The snapshot must then be invalid on disk before the
// origin write goes ahead: after a power loss it may not read the bytes
// written over its commit point.
func TestStoreSyncFailureInvalidatesDurably(t *testing.T) {
	for seed := uint64(0); seed < 8; seed++ {
		ffs := newFaultFS()
		ffs.Put("/o", make([]byte, 16*4096))
		v, err := Open("v", "/o", Options{StorageDir: "/d", FS: ffs})
		if err != nil {
			t.Fatal(err)
		}
		before := bytes.Repeat([]byte{0xa5}, 4096)
		mustWrite(t, v, before, 0)
		if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "p", Persistent: true}); err != nil {
			t.Fatal(err)
		}
		ffs.syncErr = failOn("/store", syscall.EIO)
		mustWrite(t, v, bytes.Repeat([]byte{0x5a}, 4096), 0) // the origin is never failed
		if err := v.Flush(); err != nil {                    // the new bytes are on disk
			t.Fatal(err)
		}
		ffs.syncErr = nil
		v, sn := afterPowerLoss(t, v, ffs, seed, 1, before, "its diff area failed to sync")
		if !sn.Valid && sn.Reason == "" {
			t.Fatalf("seed %d: invalid without a reason", seed)
		}
		v.Close()
	}
}

// A diff area written by format version 1 (MAP records without a data
// checksum, each appended once its data was synced) opens with its
// snapshots intact, and is rewritten as version 2. testdata/v1-unclean
// was written by the engine of commit 223f99b: an origin of 16 random
// chunks, persistent snapshots old1 and old2 each followed by writes,
// and the files copied while the volume was open (an unclean stop, so
// the MAP records are the appended ones, not a checkpoint's); want holds
// each snapshot's SHA-256 at its commit.
func TestOpenVersion1Store(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join("testdata", "v1-unclean")
	for _, name := range []string{"origin", "diff/v.umbra/meta.log", "diff/v.umbra/store"} {
		b, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	wantB, err := os.ReadFile(filepath.Join(src, "want"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(wantB)), "\n") {
		f := strings.Fields(line)
		want[f[0]] = f[1]
	}
	logPath := filepath.Join(dir, "diff", "v.umbra", "meta.log")
	if h := readHeader(t, logPath); h.Version != 1 {
		t.Fatalf("fixture is version %d, want 1", h.Version)
	}
	opts := Options{ChunkSize: 4096, StorageDir: filepath.Join(dir, "diff")}
	check := func(v *Volume) {
		t.Helper()
		if errs := v.RecoveryErrors(); len(errs) > 0 {
			t.Fatalf("recovery errors: %v", errs)
		}
		list := v.Snapshots()
		if len(list) != len(want) {
			t.Fatalf("snapshots %+v, want %v", list, want)
		}
		for _, s := range list {
			if !s.Valid {
				t.Fatalf("snapshot %s invalid: %s", s.ID, s.Reason)
			}
			h, err := v.OpenSnapshot(s.ID)
			if err != nil {
				t.Fatal(err)
			}
			if got := hashOf(t, h, v.Size()); got != want[s.ID] {
				t.Fatalf("snapshot %s reads %s, want %s", s.ID, got[:12], want[s.ID][:12])
			}
			h.Close()
		}
	}
	v, err := Open("v", filepath.Join(dir, "origin"), opts)
	if err != nil {
		t.Fatal(err)
	}
	if v.replayVerified+v.replayDropped != 0 {
		t.Fatalf("a version 1 log has no checksummed records, replay found %d", v.replayVerified+v.replayDropped)
	}
	check(v)
	if h := readHeader(t, logPath); h.Version != metaVersion {
		t.Fatalf("rewritten at open as version %d, want %d", h.Version, metaVersion)
	}
	// Writes now append checksummed records to the rewritten log.
	mustWrite(t, v, bytes.Repeat([]byte{1}, 3*4096), 10*4096) // chunks no snapshot preserved yet
	abandon(v)
	v, err = Open("v", filepath.Join(dir, "origin"), opts)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if v.replayVerified != 3 || v.replayDropped != 0 {
		t.Fatalf("replay kept %d checksummed records and dropped %d, want 3 and 0", v.replayVerified, v.replayDropped)
	}
	check(v)
}

func readHeader(t *testing.T, path string) metaHeader {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := decodeMetaHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// When syncing the metadata log fails, the records appended since its
// last good sync may be lost, the mapping of a copy just made among
// them. The snapshots are then invalid, and that must hold after a power
// loss before the origin write goes ahead: the log is rewritten (a new
// file) with them invalid. When that cannot be done either, the write is
// refused, and so is every later one under the snapshots until it can:
// after a power loss the snapshot still reads its own bytes.
func TestMetaLogSyncFailureIsDurable(t *testing.T) {
	for _, rewriteFails := range []bool{false, true} {
		for seed := uint64(0); seed < 8; seed++ {
			ffs := newFaultFS()
			ffs.Put("/o", make([]byte, 16*4096))
			v, err := Open("v", "/o", Options{StorageDir: "/d", FS: ffs})
			if err != nil {
				t.Fatal(err)
			}
			before := bytes.Repeat([]byte{0xa5}, 4096)
			after := bytes.Repeat([]byte{0x5a}, 4096)
			mustWrite(t, v, before, 0)
			if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "p", Persistent: true}); err != nil {
				t.Fatal(err)
			}
			ffs.syncErr = failLogSyncOnce() // the log once, not the rewrite's new file
			if rewriteFails {
				ffs.syncErr = failOn("/meta.log", syscall.EIO)
			}
			_, err = v.WriteAt(after, 0)
			if rewriteFails {
				if err == nil {
					t.Fatalf("seed %d: a write went ahead with its snapshot's invalidation not durable", seed)
				}
				if _, err := v.WriteAt(after, 0); err == nil {
					t.Fatalf("seed %d: a second write to the chunk went ahead with its snapshot's invalidation not durable", seed)
				}
				if seed%2 == 1 { // the storage works again: the log is rewritten, writes go ahead
					ffs.syncErr = nil
					mustWrite(t, v, after, 0)
				}
			} else if err != nil {
				t.Fatalf("seed %d: %v", seed, err)
			}
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			if list := v.Snapshots(); len(list) != 1 || list[0].Valid || !strings.Contains(list[0].Reason, "meta.log") {
				t.Fatalf("seed %d: after the failed sync: %+v", seed, list)
			}
			ffs.syncErr = nil
			v, sn := afterPowerLoss(t, v, ffs, seed, 2, before, fmt.Sprintf("its metadata failed to sync (rewrite fails: %v)", rewriteFails))
			if !sn.Valid && !rewriteFails && !strings.Contains(sn.Reason, "meta.log") {
				t.Fatalf("seed %d: invalid for another reason: %q", seed, sn.Reason)
			}
			v.Close()
		}
	}
}

// A persistent snapshot deleted while the log's sync failed is gone in
// memory, its slots free for other copies, and must not come back after
// a power loss over them.
func TestFailedDeleteStaysGone(t *testing.T) {
	for seed := uint64(0); seed < 8; seed++ {
		ffs := newFaultFS()
		ffs.Put("/o", make([]byte, 16*4096))
		v, err := Open("v", "/o", Options{StorageDir: "/d", FS: ffs})
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		for _, id := range []string{"p1", "p2"} {
			if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: id, Persistent: true}); err != nil {
				t.Fatal(err)
			}
		}
		mustWrite(t, v, bytes.Repeat([]byte{1}, 4096), 0) // a copy p2 owns
		ffs.syncErr = failLogSyncOnce()
		if err := v.DeleteSnapshot("p2"); err == nil {
			t.Fatal("deleting a snapshot whose record failed to sync reported no error")
		}
		v = reopenAfterPowerLoss(t, v, ffs, seed, 4)
		for _, s := range v.Snapshots() {
			if s.ID == "p2" {
				t.Fatalf("seed %d: the snapshot deleted in memory is back after a power loss: %+v", seed, s)
			}
		}
		v.Close()
	}
}

// A persistent snapshot whose creation failed because the log's sync
// did is not created, and must not appear after a power loss either:
// its record may have reached the disk, and nothing written since was
// preserved for it.
func TestFailedCreateStaysGone(t *testing.T) {
	for seed := uint64(0); seed < 8; seed++ {
		ffs := newFaultFS()
		ffs.Put("/o", make([]byte, 16*4096))
		v, err := Open("v", "/o", Options{StorageDir: "/d", FS: ffs})
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "p1", Persistent: true}); err != nil {
			t.Fatal(err)
		}
		ffs.syncErr = failLogSyncOnce()
		if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "p2", Persistent: true}); err == nil {
			t.Fatal("creating a snapshot whose record failed to sync succeeded")
		}
		v = reopenAfterPowerLoss(t, v, ffs, seed, 3)
		for _, s := range v.Snapshots() {
			if s.ID == "p2" {
				t.Fatalf("seed %d: the snapshot whose creation failed is there after a power loss: %+v", seed, s)
			}
		}
		v.Close()
	}
}

// A persistent copy lands in space the diff area has already written
// (zeros ahead of it), as does its mapping record in the log: written
// over such space, neither grows its file or allocates a block, so the
// group's fdatasyncs commit no journal transaction (see zeroBatch).
// Holes or fallocated (unwritten) space would not do: SEEK_DATA reports
// those as holes on ext4.
func TestPersistentCopiesLandInWrittenSpace(t *testing.T) {
	const chunk = 4096
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin")
	if err := os.WriteFile(origin, bytes.Repeat([]byte{7}, 64*chunk), 0o600); err != nil {
		t.Fatal(err)
	}
	v, err := Open("v", origin, Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "p", Persistent: true}); err != nil {
		t.Fatal(err)
	}
	for c := int64(0); c < 3; c++ {
		mustWrite(t, v, make([]byte, 100), c*chunk+1)
	}
	want := zeroBatch / chunk
	if r := dataRanges(t, v, chunk); len(r) != 1 || r[0][0] != 0 || r[0][1] < want {
		t.Fatalf("diff area's written space in slots: %v, want [0, >=%d) (3 copies and zeros ahead)", r, want)
	}
	v.mu.RLock()
	lf := v.log.f.(osFile)
	off := v.log.off
	v.mu.RUnlock()
	fi, err := lf.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size()-off < 4096 {
		t.Fatalf("log is %d bytes for records ending at %d: no zeros ahead", fi.Size(), off)
	}
	if h, err := unix.Seek(int(lf.Fd()), 0, unix.SEEK_HOLE); err != nil || h != fi.Size() {
		t.Fatalf("log has a hole at %d (size %d, %v)", h, fi.Size(), err)
	}
}

// afterPowerLoss loses power under v (unsynced writes kept or not as
// seed and stream choose), opens the volume again and returns it with
// its one snapshot "p"; if that snapshot is still valid, it must read
// before at offset 0 (what the origin held at its commit), not the
// bytes written after it — what failed is said in the message.
func afterPowerLoss(t *testing.T, v *Volume, ffs *faultFS, seed, stream uint64, before []byte, failed string) (*Volume, provider.Snapshot) {
	t.Helper()
	v = reopenAfterPowerLoss(t, v, ffs, seed, stream)
	list := v.Snapshots()
	if len(list) != 1 {
		t.Fatalf("seed %d: after power loss: %+v", seed, list)
	}
	if list[0].Valid {
		h, err := v.OpenSnapshot("p")
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(before))
		if _, err := h.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		h.Close()
		if !bytes.Equal(got, before) {
			t.Fatalf("seed %d: snapshot valid after %s, and reads %x... written after it", seed, failed, got[:4])
		}
	}
	return v, list[0]
}

// reopenAfterPowerLoss loses power under v (which unsynced writes are
// kept chosen by seed and stream) and opens the volume again.
func reopenAfterPowerLoss(t *testing.T, v *Volume, ffs *faultFS, seed, stream uint64) *Volume {
	t.Helper()
	ffs.Crash(rand.New(rand.NewPCG(seed, stream)))
	abandon(v)
	v, err := Open("v", "/o", Options{StorageDir: "/d", FS: ffs})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// failLogSyncOnce fails the first sync of meta.log (not of the new file
// a rewrite makes), then lets every sync through.
func failLogSyncOnce() func(string) error {
	failed := false
	return func(p string) error {
		if !failed && strings.Contains(p, "/meta.log") {
			failed = true
			return syscall.EIO
		}
		return nil
	}
}
