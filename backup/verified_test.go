package backup_test

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"umbra/backup"
)

// damagedPair makes a repository with settings, backs up two volumes of
// size bytes drawn from seed ("a", then "b"), and flips one bit in the
// middle of the blob of a chunk that b uses and a does not: verify finds
// b damaged and a good. It returns that chunk; the repository closes at
// the end of the test.
func damagedPair(t *testing.T, set backup.Settings, seed uint64, size int) (repo *backup.Repo, a, b *backup.Image, victim backup.Hash) {
	t.Helper()
	root := filepath.Join(t.TempDir(), "repo")
	repo, err := backup.InitWith(context.Background(), root, set)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { repo.Close() })
	rng := rand.New(rand.NewPCG(seed, seed+1))
	a = backupAndRestore(t, repo, volumeData(rng, size), backup.Options{Volume: "a"})
	b = backupAndRestore(t, repo, volumeData(rng, size), backup.Options{Volume: "b"})
	xa, _ := repo.Image(a.ID)
	xb, _ := repo.Image(b.ID)
	for _, h := range xb.Chunks {
		if h != (backup.Hash{}) && !slices.Contains(xa.Chunks, h) {
			victim = h
			break
		}
	}
	if victim == (backup.Hash{}) {
		t.Fatal("no chunk in image b that image a lacks")
	}
	pack, off, n := backup.BlobLocation(repo, victim)
	path := filepath.Join(root, filepath.FromSlash(pack))
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	raw[off+n/2] ^= 0x10
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return repo, a, b, victim
}

// TestVerifyRecordsPerImage verifies some images of a repository,
// records what each verify found in the repository, and checks that a
// verify of some images reads only theirs, that a sampled verify never
// records an image good, and that deleting an image deletes its record.
func TestVerifyRecordsPerImage(t *testing.T) {
	ctx := context.Background()
	repo, a, b, victim := damagedPair(t, backup.Settings{Password: "correct horse"}, 81, 2<<20)
	states := func() map[string]backup.VerifyState {
		t.Helper()
		s, errs := repo.VerifyStates(ctx)
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		return s
	}
	if s := states(); len(s) != 0 {
		t.Fatalf("states before any verify: %v", s)
	}
	if rep := repo.VerifyWith(ctx, backup.VerifyOptions{}, nil); len(rep.BadImages) != 1 || len(states()) != 0 {
		t.Fatalf("a verify without Record: %+v, states %v", rep, states())
	}

	t1 := time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC)
	rep := repo.VerifyWith(ctx, backup.VerifyOptions{Images: []string{a.ID, "not-an-image"}, Record: true, Time: t1}, nil)
	if rep.Checked != 1 || rep.GoodImages != 1 || len(rep.BadImages) != 0 || len(rep.BadChunks) != 0 || rep.RecordError != "" {
		t.Fatalf("verify of %s alone: %+v", a.ID, rep)
	}
	if s := states(); len(s) != 1 || !s[a.ID].Time.Equal(t1) || s[a.ID].Result != backup.VerifyGood {
		t.Fatalf("states after verifying %s: %v", a.ID, s)
	}

	t2 := t1.Add(time.Hour)
	rep = repo.VerifyWith(ctx, backup.VerifyOptions{Images: []string{b.ID}, Record: true, Time: t2}, nil)
	if rep.Checked != 1 || !slices.Equal(rep.BadImages, []string{b.ID}) || len(rep.BadChunks) == 0 {
		t.Fatalf("verify of %s alone: %+v", b.ID, rep)
	}
	if s := states(); len(s) != 2 || !s[a.ID].Time.Equal(t1) || s[b.ID].Result != backup.VerifyDamaged || !s[b.ID].Time.Equal(t2) {
		t.Fatalf("states after verifying %s: %v", b.ID, s)
	}

	// A sample that picks every chunk of the damaged blob finds it, and
	// records it; it records nothing good.
	t3 := t2.Add(time.Hour)
	var seed uint64
	for seed = 1; ; seed++ {
		o := backup.VerifyOptions{Sample: 0.5, Seed: seed}
		if o.Picks(victim) {
			break
		}
	}
	rep = repo.VerifyWith(ctx, backup.VerifyOptions{Sample: 0.5, Seed: seed, Record: true, Time: t3}, nil)
	if rep.Checked != 2 || !slices.Equal(rep.BadImages, []string{b.ID}) {
		t.Fatalf("sampled verify: %+v", rep)
	}
	if s := states(); !s[a.ID].Time.Equal(t1) || s[b.ID].Result != backup.VerifyDamaged || !s[b.ID].Time.Equal(t3) || s[b.ID].Sample != 0.5 {
		t.Fatalf("states after a sampled verify: %v", s)
	}

	if _, err := repo.Delete(ctx, []string{b.ID}); err != nil {
		t.Fatal(err)
	}
	if s := states(); len(s) != 1 || s[a.ID].Result != backup.VerifyGood {
		t.Fatalf("states after deleting %s: %v", b.ID, s)
	}
}
