package backup_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"umbra/backup"
	"umbra/cow"
	"umbra/provider"
)

// TestRoundTripChain: full then incremental images of a COW volume under
// writes, each read from a snapshot with the engine's change tracking,
// each restoring byte-identical on its own.
func TestRoundTripChain(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	origin := filepath.Join(dir, "vol.img")
	os.WriteFile(origin, nil, 0o600)
	os.Truncate(origin, 8<<20)
	v, err := cow.Open("vol", origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	r := rand.New(rand.NewPCG(1, 2))
	block := make([]byte, 4096)
	scribble := func(n int) {
		for i := 0; i < n; i++ {
			for k := range block {
				block[k] = byte(r.Uint32())
			}
			v.WriteAt(block[:1+r.IntN(4096)], r.Int64N(v.Size()-4096))
		}
	}
	scribble(500)
	repo, err := backup.Init(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	type img struct {
		id   string
		want []byte
	}
	var imgs []img
	var prevSnap string
	var parent *backup.Index
	for k := 0; k < 6; k++ {
		snapID := "b" + string(rune('0'+k))
		if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: snapID}); err != nil {
			t.Fatal(err)
		}
		s, _ := v.OpenSnapshot(snapID)
		want := make([]byte, v.Size())
		s.ReadAt(want, 0)
		opts := backup.Options{Volume: "vol", Snapshot: snapID, Parent: parent}
		if prevSnap != "" {
			bm, reliable, err := v.Changed(prevSnap, snapID)
			if err != nil || !reliable {
				t.Fatal(err)
			}
			opts.Changed = bm
		}
		scribble(50) // writes go on while the image is read
		x, st, err := repo.Backup(ctx, s, opts)
		if err != nil {
			t.Fatal(err)
		}
		if k > 0 && (!st.Incremental || st.Read > 1<<20) {
			t.Fatalf("image %d: incremental=%v read %d bytes for ~50 changed blocks", k, st.Incremental, st.Read)
		}
		imgs = append(imgs, img{x.ID, want})
		if prevSnap != "" {
			v.DeleteSnapshot(prevSnap)
		}
		prevSnap, parent = snapID, x
		scribble(50)
	}
	for _, im := range imgs {
		out := filepath.Join(dir, "restored.img")
		if err := repo.Restore(im.id, out, nil); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(out)
		if !bytes.Equal(got, im.want) {
			t.Fatalf("image %s does not restore byte-identical", im.id)
		}
	}
	if rep := repo.Verify(); len(rep.BadImages) > 0 || rep.GoodImages != len(imgs) {
		t.Fatalf("verify: %+v", rep)
	}

	// Corruption: flip one bit of one chunk used only by the newest image;
	// verify names exactly the images that use it; an older one restores.
	last, _ := repo.Image(imgs[len(imgs)-1].id)
	first, _ := repo.Image(imgs[0].id)
	inFirst := map[backup.Hash]bool{}
	for _, h := range first.Chunks {
		inFirst[h] = true
	}
	var victim backup.Hash
	for _, h := range last.Chunks {
		if h != (backup.Hash{}) && !inFirst[h] {
			victim = h
			break
		}
	}
	path := filepath.Join(dir, "repo", "chunks", victim.String()[:2], victim.String())
	b, _ := os.ReadFile(path)
	b[len(b)/2] ^= 1
	os.WriteFile(path, b, 0o600)
	rep := repo.Verify()
	if len(rep.BadChunks) != 1 || rep.BadChunks[0] != victim.String() {
		t.Fatalf("verify after a bit flip: %+v", rep)
	}
	for _, id := range rep.BadImages {
		x, _ := repo.Image(id)
		uses := false
		for _, h := range x.Chunks {
			uses = uses || h == victim
		}
		if !uses {
			t.Fatalf("verify blames %s, which does not use the damaged chunk", id)
		}
	}
	if err := repo.Restore(imgs[len(imgs)-1].id, filepath.Join(dir, "bad.img"), nil); !errors.Is(err, backup.ErrCorrupt) {
		t.Fatalf("restore through a damaged chunk: %v, want ErrCorrupt", err)
	}
	if err := repo.Restore(imgs[0].id, filepath.Join(dir, "ok.img"), nil); err != nil {
		t.Fatalf("an unaffected image does not restore: %v", err)
	}
	// A truncated index is named, and the others still list.
	idx := filepath.Join(dir, "repo", "images", imgs[1].id+".idx")
	ib, _ := os.ReadFile(idx)
	os.WriteFile(idx, ib[:len(ib)/2], 0o600)
	list, errs := repo.Images()
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), imgs[1].id) || len(list) != len(imgs)-1 {
		t.Fatalf("truncated index: %d listed, errors %v", len(list), errs)
	}
}

func TestRepoErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := backup.Open(filepath.Join(dir, "none")); !errors.Is(err, backup.ErrNoRepo) {
		t.Fatalf("open a missing repository: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "x"), nil, 0o600)
	if _, err := backup.Init(dir); err == nil {
		t.Fatal("init in a non-empty directory succeeded")
	}
}

func FuzzDecodeIndex(f *testing.F) {
	x := &backup.Index{ID: "v-1", Volume: "v", Snapshot: "s", Size: 3 * 4096, Chunks: make([]backup.Hash, 3)}
	x.Chunks[1][0] = 7
	f.Add(x.Encode())
	f.Add([]byte("UMBRAIDX"))
	f.Fuzz(func(t *testing.T, b []byte) {
		x, err := backup.DecodeIndex(b)
		if err != nil {
			if !errors.Is(err, backup.ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if !bytes.Equal(x.Encode(), b) {
			t.Fatal("index does not round-trip")
		}
	})
}
