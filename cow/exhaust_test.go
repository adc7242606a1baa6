package cow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"umbra/provider"
)

// fill writes a distinct pattern over the whole volume.
func fill(t *testing.T, v *Volume, b byte) []byte {
	t.Helper()
	p := bytes.Repeat([]byte{b}, int(v.Size()))
	for i := range p {
		p[i] ^= byte(i / 4096)
	}
	mustWrite(t, v, p, 0)
	return p
}

func TestLimitDeleteOldest(t *testing.T) {
	ctx := context.Background()
	v, _ := newTestVolume(t, 64*4096, Options{MaxStorage: 20 * 4096, Policy: PolicyDeleteOldest})
	fill(t, v, 1)
	var ids []string
	for i := 0; i < 4; i++ {
		s, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, s.ID)
		// 10 chunks each: the third snapshot's copies overflow 20 chunks.
		for c := 0; c < 10; c++ {
			mustWrite(t, v, []byte{byte(10 + i)}, int64(i*10+c)*4096)
		}
	}
	list := v.Snapshots()
	if len(list) == 4 {
		t.Fatal("no snapshot was deleted although the limit was exceeded")
	}
	if list[len(list)-1].ID != ids[3] {
		t.Fatalf("the newest snapshot was deleted: %+v", list)
	}
	if used := v.Storage().Used; used > 20*4096 {
		t.Fatalf("used %d over the limit", used)
	}
	for _, s := range list {
		if !s.Valid {
			t.Fatalf("%s invalid under delete-oldest: %s", s.ID, s.Reason)
		}
	}
}

func TestLimitInvalidate(t *testing.T) {
	ctx := context.Background()
	v, _ := newTestVolume(t, 64*4096, Options{MaxStorage: 8 * 4096, Policy: PolicyInvalidate})
	orig := fill(t, v, 1)
	old, _ := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "old"})
	for c := 0; c < 6; c++ { // 6 copies, all for "old"
		mustWrite(t, v, []byte{9}, int64(c)*4096)
	}
	v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "new"})
	// "old" has its own copies of chunks 0-5: only "new" needs these.
	// Two fit under the limit, four do not.
	for c := 0; c < 6; c++ {
		if _, err := v.WriteAt([]byte{8}, int64(c)*4096); err != nil {
			t.Fatalf("origin write failed because of a snapshot problem: %v", err)
		}
	}
	byID := map[string]provider.Snapshot{}
	for _, s := range v.Snapshots() {
		byID[s.ID] = s
	}
	if byID["new"].Valid || !strings.Contains(byID["new"].Reason, "limit") {
		t.Fatalf("new should be invalid for the limit: %+v", byID["new"])
	}
	if !byID["old"].Valid {
		t.Fatalf("old needed none of the failed chunks but is invalid: %s", byID["old"].Reason)
	}
	h, _ := v.OpenSnapshot("new")
	if _, err := h.ReadAt(make([]byte, 1), 0); !errors.Is(err, provider.ErrSnapshotInvalid) {
		t.Fatalf("read of invalid snapshot: %v", err)
	}
	ho, _ := v.OpenSnapshot(old.ID)
	if got := readAll(t, ho, v.Size()); !bytes.Equal(got, orig) {
		t.Fatal("the valid snapshot reads wrong bytes")
	}
	if used := v.Storage().Used; used > 8*4096 {
		t.Fatalf("used %d over the limit", used)
	}
}

func TestStoreIOErrorInvalidates(t *testing.T) {
	ctx := context.Background()
	ffs, v := faultVolume(t, "")
	mustWrite(t, v, bytes.Repeat([]byte{5}, 16*4096), 0)
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	ffs.writeErr = failOn("store", syscall.EIO)
	if _, err := v.WriteAt([]byte{1}, 0); err != nil {
		t.Fatalf("origin write failed because the diff area did: %v", err)
	}
	// Until the diff-area write has failed (it may run after the origin
	// write returns), the snapshot reads its bytes from memory.
	h, err := v.OpenSnapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1)
	if _, err := h.ReadAt(got, 0); err == nil && got[0] != 5 {
		t.Fatalf("snapshot reads %d, want the preserved 5", got[0])
	}
	// The listing reports the outcome of writes made before it.
	s := v.Snapshots()[0]
	ffs.writeErr = nil
	if s.Valid || !strings.Contains(s.Reason, "input/output error") || !strings.Contains(s.Reason, "/d/v.umbra/store") {
		t.Fatalf("after EIO on the diff area: %+v", s)
	}
	if _, err := h.ReadAt(got, 0); err == nil {
		t.Fatal("invalid snapshot still reads")
	}
	v.ReadAt(got, 0)
	if got[0] != 1 {
		t.Fatal("origin write lost")
	}
}

func TestMissingStoreAndDamagedMeta(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	origin := filepath.Join(dir, "o")
	os.WriteFile(origin, bytes.Repeat([]byte{3}, 16*4096), 0o600)
	opts := Options{StorageDir: filepath.Join(dir, "d")}
	v, err := Open("v", origin, opts)
	if err != nil {
		t.Fatal(err)
	}
	v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "p", Persistent: true})
	mustWrite(t, v, []byte{9}, 0)
	v.Close()

	store := filepath.Join(dir, "d", "v.umbra", "store")
	os.Remove(store)
	v, err = Open("v", origin, opts)
	if err != nil {
		t.Fatal(err)
	}
	errs := v.RecoveryErrors()
	if len(errs) == 0 || !strings.Contains(errs[0].Error(), store) {
		t.Fatalf("missing store: recovery errors %v do not name %s", errs, store)
	}
	if s := v.Snapshots(); len(s) != 1 || s[0].Valid {
		t.Fatalf("snapshot with a missing store: %+v", s)
	}
	mustWrite(t, v, []byte{4}, 4096) // origin still usable
	v.Close()

	meta := filepath.Join(dir, "d", "v.umbra", "meta.log")
	os.WriteFile(meta, []byte("not a metadata log at all, damaged......................................"), 0o600)
	v, err = Open("v", origin, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	errs = v.RecoveryErrors()
	if len(errs) == 0 || !strings.Contains(errs[0].Error(), meta) {
		t.Fatalf("damaged meta: recovery errors %v do not name %s", errs, meta)
	}
	mustWrite(t, v, []byte{4}, 4096)
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "again", Persistent: true}); err != nil {
		t.Fatalf("new snapshot after damage: %v", err)
	}
}

// TestManySnapshots: 520 live snapshots; a write preserves one copy
// however many are alive; each reads its own commit point; deleting in
// random order keeps the rest exact.
func TestManySnapshots(t *testing.T) {
	ctx := context.Background()
	const n = 520
	v, _ := newTestVolume(t, 1024*4096, Options{})
	views := map[string][]byte{}
	cur := make([]byte, v.Size())
	var ids []string
	for i := 0; i < n; i++ {
		s, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, s.ID)
		if i%8 == 0 {
			views[s.ID] = append([]byte(nil), cur...)
		}
		before := v.Storage().Used
		off := int64(i%1024) * 4096
		mustWrite(t, v, []byte{byte(i), byte(i >> 8)}, off)
		cur[off], cur[off+1] = byte(i), byte(i>>8)
		if d := v.Storage().Used - before; d > 4096 {
			t.Fatalf("one write under %d snapshots preserved %d bytes", i+1, d)
		}
	}
	check := func() {
		for id, want := range views {
			h, err := v.OpenSnapshot(id)
			if err != nil {
				continue
			}
			if got := readAll(t, h, v.Size()); !bytes.Equal(got, want) {
				t.Fatalf("snapshot %s wrong", id)
			}
		}
	}
	check()
	perm := randPerm(len(ids))
	for k, i := range perm[:n-10] {
		if err := v.DeleteSnapshot(ids[i]); err != nil {
			t.Fatal(err)
		}
		delete(views, ids[i])
		if k%97 == 0 {
			check()
		}
	}
	check()
}

func randPerm(n int) []int {
	p := make([]int, n)
	for i := range p {
		p[i] = (i * 7919) % n
	}
	return p
}

// TestDiffAreaOnFullFilesystem puts the diff area on a tiny ext4 on a loop
// device and fills it, under both policies.
func TestDiffAreaOnFullFilesystem(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a loop device")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("needs mkfs.ext4 (e2fsprogs)")
	}
	for _, policy := range []Policy{PolicyDeleteOldest, PolicyInvalidate} {
		t.Run(string(policy), func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			img := filepath.Join(dir, "tiny.img")
			os.WriteFile(img, nil, 0o600)
			os.Truncate(img, 4<<20)
			if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", img).CombinedOutput(); err != nil {
				t.Fatalf("mkfs: %v %s", err, out)
			}
			mnt := filepath.Join(dir, "mnt")
			os.Mkdir(mnt, 0o755)
			if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
				t.Skipf("cannot loop-mount here: %v %s", err, out)
			}
			t.Cleanup(func() { exec.Command("umount", mnt).Run() })
			origin := filepath.Join(dir, "origin")
			os.WriteFile(origin, nil, 0o600)
			os.Truncate(origin, 8<<20)
			v, err := Open("v", origin, Options{StorageDir: mnt, Policy: policy})
			if err != nil {
				t.Fatal(err)
			}
			defer v.Close()
			want := fill(t, v, 2)
			for i := 0; i < 3; i++ {
				if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: fmt.Sprint("s", i)}); err != nil {
					t.Fatal(err)
				}
				p := bytes.Repeat([]byte{byte(0x40 + i)}, int(v.Size()))
				if _, err := v.WriteAt(p, 0); err != nil {
					t.Fatalf("origin write failed on a full diff area: %v", err)
				}
				want = p
			}
			if got := readAll(t, v, v.Size()); !bytes.Equal(got, want) {
				t.Fatal("origin content wrong after diff-area exhaustion")
			}
			list := v.Snapshots()
			switch policy {
			case PolicyDeleteOldest:
				if len(list) == 3 {
					t.Fatalf("8 MiB of copies fit a 4 MiB filesystem? %+v", list)
				}
			case PolicyInvalidate:
				bad := 0
				for _, s := range list {
					if !s.Valid {
						bad++
						if !strings.Contains(s.Reason, "full") {
							t.Fatalf("reason %q does not say the filesystem is full", s.Reason)
						}
					}
				}
				if bad == 0 {
					t.Fatal("no snapshot invalidated on a full filesystem")
				}
			}
			for _, s := range list {
				if !s.Valid {
					continue
				}
				h, _ := v.OpenSnapshot(s.ID)
				if _, err := h.ReadAt(make([]byte, v.Size()), 0); err != nil {
					t.Fatalf("valid snapshot %s unreadable: %v", s.ID, err)
				}
			}
		})
	}
}
