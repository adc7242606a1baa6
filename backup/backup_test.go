package backup_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
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
	// One segment per list (the default), and lists cut into many
	// segments that batches straddle.
	// With segment=7, packs of 256 KiB and an index object every 3
	// packs during each backup, too; with segment=1000, an encrypted
	// repository (a damaged sealed blob loses all its chunks).
	for _, seg := range []int64{0, 7, 1000} {
		t.Run(fmt.Sprint("segment=", seg), func(t *testing.T) {
			if seg > 0 {
				defer backup.SetSegmentChunks(backup.SetSegmentChunks(seg))
			}
			if seg == 7 {
				defer backup.SetSmallPacks(256<<10, 3)()
			}
			password := ""
			if seg == 1000 {
				password = "secret"
			}
			roundTripChain(t, seg, password)
		})
	}
}

func roundTripChain(t *testing.T, seg int64, password string) {
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
	repo, err := backup.InitWith(ctx, filepath.Join(dir, "repo"), backup.Settings{Password: password})
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
	var parent *backup.Image
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
	var ids []string
	for _, im := range imgs {
		ids = append(ids, im.id)
	}
	if seg > 0 {
		perImage := (v.Size()/4096 + seg - 1) / seg
		for _, id := range ids {
			if x, _ := repo.Image(id); int64(len(x.Segments)) != perImage {
				t.Fatalf("image %s has %d chunk list segments, want %d", id, len(x.Segments), perImage)
			}
		}
		// Shared: the segments stored are the images' segments, once each.
		if got, want := backup.ObjectNames(repo, "segments/"), backup.SegmentObjects(repo, ids...); !slices.Equal(got, want) || len(backup.ObjectNames(repo, "lists/")) > 0 {
			t.Fatalf("%d chunk list segments stored, want the images' %d", len(got), len(want))
		}
	}
	checkCorruption(t, repo, filepath.Join(dir, "repo"), ids)
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
	// A repository a newer Umbra wrote is refused, saying so.
	newer := filepath.Join(dir, "newer")
	repo, err := backup.Init(newer)
	if err != nil {
		t.Fatal(err)
	}
	repo.Close()
	cfg, _ := os.ReadFile(filepath.Join(newer, "config"))
	cfg = regexp.MustCompile(`"version": \d+`).ReplaceAll(cfg, []byte(`"version": 99`))
	os.WriteFile(filepath.Join(newer, "config"), cfg, 0o600)
	if _, err := backup.Open(newer); err == nil || !strings.Contains(err.Error(), "newer Umbra") {
		t.Fatalf("open a repository of format 99: %v", err)
	}
}

func FuzzDecodeChunkList(f *testing.F) {
	x := &backup.Image{ID: "v-1", Volume: "v", Snapshot: "s", Size: 3 * 4096, ChunkSize: 4096, Chunks: make([]backup.Hash, 3)}
	x.Chunks[1][0] = 7
	f.Add(x.EncodeChunkList())
	seg := &backup.Image{ID: "v-1", Volume: "v", Snapshot: "s", Size: 9 * 4096, ChunkSize: 4096, First: 4, Chunks: make([]backup.Hash, 3)}
	seg.Chunks[0][0] = 7
	f.Add(seg.EncodeChunkList())
	f.Add([]byte("UMBRAIDX"))
	f.Fuzz(func(t *testing.T, b []byte) {
		x, err := backup.DecodeChunkList(b)
		if err != nil {
			if !errors.Is(err, backup.ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if !bytes.Equal(x.EncodeChunkList(), b) {
			t.Fatal("index does not round-trip")
		}
	})
}

// TestPackEntriesBounded: chunks that compress to almost nothing do not
// pile up in one pack with an unbounded trailer: a pack lists at most
// maxPackEntries chunks (plus the rest of the group that reached it:
// groups of 16 chunks here), and the image restores.
func TestPackEntriesBounded(t *testing.T) {
	const limit, chunks = 64, 1024
	defer backup.SetPackEntries(limit)()
	defer backup.SetGroupRaw(16 * 4096)()
	ctx := context.Background()
	dir := t.TempDir()
	origin := filepath.Join(dir, "vol.img")
	want := make([]byte, chunks*4096)
	for i := range chunks { // distinct chunks, each its index repeated
		for k := 0; k < 4096; k += 8 {
			binary.LittleEndian.PutUint64(want[i*4096+k:], uint64(i)+1)
		}
	}
	if err := os.WriteFile(origin, want, 0o600); err != nil {
		t.Fatal(err)
	}
	v, err := cow.Open("vol", origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	s, _ := v.OpenSnapshot("s")
	repo, err := backup.Init(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	x, _, err := repo.Backup(ctx, s, backup.Options{Volume: "vol", Snapshot: "s"})
	if err != nil {
		t.Fatal(err)
	}
	packs := backup.ObjectNames(repo, "packs/")
	total := 0
	for _, p := range packs {
		n, err := backup.PackTrailerEntries(repo, p)
		if err != nil {
			t.Fatal(err)
		}
		if n > limit+15 {
			t.Fatalf("pack %s lists %d chunks, want at most %d", p, n, limit+15)
		}
		total += n
	}
	if total != chunks || len(packs) < chunks/(limit+15) {
		t.Fatalf("%d packs listing %d chunks, want %d chunks in at least %d packs", len(packs), total, chunks, chunks/(limit+15))
	}
	out := filepath.Join(dir, "restored.img")
	if err := repo.Restore(x.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
		t.Fatal("image does not restore byte-identical")
	}
}
