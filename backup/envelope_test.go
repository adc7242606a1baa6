package backup_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"umbra/backup"
)

// TestEveryBitFlipDetected flips every bit of one object of each kind a
// repository holds — config, key file, image record, chunk index,
// chunk-list segment, lock, pack — one at a time, and checks that the
// object's reader reports it damaged (ErrCorrupt) every time, in an
// unencrypted and an encrypted repository. Before format 7 an
// unencrypted image record had no checksum: most flips decoded to valid,
// different JSON.
func TestEveryBitFlipDetected(t *testing.T) {
	backup.SetScryptN(1 << 10)
	defer backup.SetSegmentChunks(backup.SetSegmentChunks(8))
	defer backup.SetSmallPacks(16<<10, 1)()
	for _, pw := range []string{"", "pw"} {
		t.Run("password="+pw, func(t *testing.T) {
			ctx := context.Background()
			dir := filepath.Join(t.TempDir(), "repo")
			repo, err := backup.InitWith(ctx, dir, backup.Settings{Password: pw})
			if err != nil {
				t.Fatal(err)
			}
			defer repo.Close()
			src := volumeData(rand.New(rand.NewPCG(71, 72)), 16*4096)
			backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
			unlock, err := repo.Lock(ctx, "test", false)
			if err != nil {
				t.Fatal(err)
			}
			defer unlock()
			kinds := []string{"config", "images/", "index/", "segments/", "locks/", "packs/"}
			if pw != "" {
				kinds = append(kinds, "keys/")
			}
			for _, kind := range kinds {
				name := kind
				if strings.HasSuffix(kind, "/") {
					names := backup.ObjectNames(repo, kind)
					if len(names) == 0 {
						t.Fatalf("no object under %s", kind)
					}
					name = names[0]
				}
				if err := backup.CheckObject(repo, name, pw); err != nil {
					t.Fatalf("%s as written: %v", name, err)
				}
				orig, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(name)))
				if err != nil {
					t.Fatal(err)
				}
				bits := len(orig) * 8
				if kind == "packs/" {
					// The pack's last 256 bytes: its trailer and the
					// trailer's length (verify checks the whole pack
					// against its name; the blobs' bits are not the point).
					bits = min(bits, 2048)
				}
				missed := 0
				for i := range bits {
					bit := i
					if kind == "packs/" {
						bit = len(orig)*8 - 1 - i
					}
					b := slices.Clone(orig)
					b[bit/8] ^= 1 << (bit % 8)
					restore := backup.Overlay(repo, name, b)
					err := backup.CheckObject(repo, name, pw)
					restore()
					if !errors.Is(err, backup.ErrCorrupt) {
						if missed++; missed <= 3 {
							t.Errorf("%s: bit %d flipped: %v, want ErrCorrupt", name, bit, err)
						}
					}
				}
				if missed > 0 {
					t.Errorf("%s: %d of %d flips not found", name, missed, bits)
				} else {
					t.Logf("%s: %d flips, all found", name, bits)
				}
			}
		})
	}
}

// TestEnvelopeUpgrade: a repository whose objects predate the envelope
// (format 6 and older) is read as it is; its next backup wraps every
// metadata object before it writes format 7 into the config, and from
// then on an object without the envelope is damaged.
func TestEnvelopeUpgrade(t *testing.T) {
	backup.SetScryptN(1 << 10)
	for _, pw := range []string{"", "pw"} {
		t.Run("password="+pw, func(t *testing.T) {
			ctx := context.Background()
			dir := filepath.Join(t.TempDir(), "repo")
			set := backup.Settings{Password: pw}
			legacy := backup.SetLegacyObjects()
			repo, err := backup.InitFormat5(ctx, dir, set)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(73, 74))
			src := volumeData(rng, 16*4096)
			old := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
			repo.Close()
			legacy()
			if cfg, _ := os.ReadFile(filepath.Join(dir, "config")); strings.Contains(string(cfg), "checksum") || !strings.Contains(string(cfg), `"version": 6`) {
				t.Fatalf("the older writer's config: %s", cfg)
			}
			rec, _ := os.ReadFile(filepath.Join(dir, "images", old.ID))
			if strings.HasPrefix(string(rec), "UMBRAOBJ") {
				t.Fatal("the older writer wrapped its image record")
			}

			repo, err = backup.OpenWith(ctx, dir, set)
			if err != nil {
				t.Fatalf("open a format 6 repository: %v", err)
			}
			defer repo.Close()
			if rep := repo.Verify(); rep.GoodImages != 1 || len(rep.BadImages)+len(rep.BadIndexes)+len(rep.BadPacks) > 0 {
				t.Fatalf("verify a format 6 repository: %+v", rep)
			}
			copy(src, make([]byte, 4096))
			backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
			if v := repo.Config().Version; v != 8 {
				t.Fatalf("format after a backup: %d, want 8", v)
			}
			for _, prefix := range []string{"images/", "index/", "keys/"} {
				for _, n := range backup.ObjectNames(repo, prefix) {
					b, _ := os.ReadFile(filepath.Join(dir, filepath.FromSlash(n)))
					if !strings.HasPrefix(string(b), "UMBRAOBJ") {
						t.Errorf("%s not wrapped after the upgrade", n)
					}
				}
			}
			again, err := backup.OpenWith(ctx, dir, set)
			if err != nil {
				t.Fatalf("open after the upgrade: %v", err)
			}
			defer again.Close()
			if rep := again.Verify(); rep.GoodImages != 2 || len(rep.BadImages)+len(rep.BadIndexes)+len(rep.BadPacks) > 0 {
				t.Fatalf("verify after the upgrade: %+v", rep)
			}
			// Format 7: an object without the envelope is damaged.
			os.WriteFile(filepath.Join(dir, "images", old.ID), rec, 0o600)
			if err := backup.CheckObject(again, "images/"+old.ID, pw); !errors.Is(err, backup.ErrCorrupt) {
				t.Fatalf("an unwrapped record in a format 7 repository: %v", err)
			}
		})
	}
}

// TestVerifyPackTrailer: verify reports a pack whose trailer has a
// flipped bit, though every chunk the images need still reads (before,
// it passed, and once the index was lost prune could not re-index the
// pack).
func TestVerifyPackTrailer(t *testing.T) {
	repo, dir := newRepo(t)
	backupAndRestore(t, repo, volumeData(rand.New(rand.NewPCG(75, 76)), 64*4096), backup.Options{Volume: "v"})
	packs := backup.ObjectNames(repo, "packs/")
	p := filepath.Join(dir, filepath.FromSlash(packs[0]))
	b, _ := os.ReadFile(p)
	b[len(b)-12] ^= 0x04 // in the trailer's last blob entry
	os.WriteFile(p, b, 0o600)
	rep := repo.Verify()
	if len(rep.BadPacks) != 1 || !strings.Contains(rep.BadPacks[0], strings.TrimPrefix(packs[0][strings.LastIndex(packs[0], "/"):], "/")) || rep.GoodImages != 1 {
		t.Fatalf("verify after a flipped trailer bit: %+v", rep)
	}
}

// TestDamagedKeyFile: a truncated key file is reported as damaged, not
// as a wrong password; with a second, whole key the right password
// still opens the repository, and a wrong one is told as such with the
// damaged key named.
func TestDamagedKeyFile(t *testing.T) {
	backup.SetScryptN(1 << 10)
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "repo")
	set := backup.Settings{Password: "right"}
	repo, err := backup.InitWith(ctx, dir, set)
	if err != nil {
		t.Fatal(err)
	}
	repo.Close()
	keys, _ := filepath.Glob(filepath.Join(dir, "keys", "*"))
	whole, _ := os.ReadFile(keys[0])
	os.WriteFile(keys[0], whole[:len(whole)/2], 0o600)
	_, err = backup.OpenWith(ctx, dir, set)
	if !errors.Is(err, backup.ErrCorrupt) || errors.Is(err, backup.ErrWrongPassword) || !strings.Contains(err.Error(), filepath.Base(keys[0])) {
		t.Fatalf("open with a truncated key file: %v; want it named as damaged, not a wrong password", err)
	}
	os.WriteFile(filepath.Join(dir, "keys", "0000second"), whole, 0o600)
	r, err := backup.OpenWith(ctx, dir, set)
	if err != nil {
		t.Fatalf("open with one whole key of two: %v", err)
	}
	r.Close()
	if _, err := backup.OpenWith(ctx, dir, backup.Settings{Password: "wrong"}); !errors.Is(err, backup.ErrWrongPassword) || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("a wrong password with a damaged key beside: %v", err)
	}
}
