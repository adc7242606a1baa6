package backup_test

import (
	"context"
	"slices"
	"testing"

	"umbra/backup"
)

// TestVerifySample damages one blob and checks that a full verify and a
// sample whose seed picks a damaged chunk both find it, that a sample
// whose seed picks none of the blob's chunks finds nothing, and that a
// sample checks exactly the chunks its seed picks.
func TestVerifySample(t *testing.T) {
	for _, tc := range []struct {
		name     string
		settings backup.Settings
	}{{"plain", backup.Settings{}}, {"encrypted", backup.Settings{Password: "correct horse"}}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			repo, a, b, victim := damagedPair(t, tc.settings, 71, 4<<20)
			used := map[backup.Hash]bool{}
			for _, x := range []*backup.Image{a, b} {
				full, err := repo.Image(x.ID)
				if err != nil {
					t.Fatal(err)
				}
				for _, h := range full.Chunks {
					if h != (backup.Hash{}) {
						used[h] = true
					}
				}
			}

			full := repo.Verify()
			if len(full.BadChunks) == 0 || !slices.Equal(full.BadImages, []string{b.ID}) || len(full.BadPacks) != 1 {
				t.Fatalf("full verify: %+v, want damaged chunks, %s broken and its pack named", full, b.ID)
			}
			if full.Chunks != len(used) || full.Sample != 0 {
				t.Fatalf("full verify checked %d chunks (sample %v), the images use %d", full.Chunks, full.Sample, len(used))
			}
			var bad []backup.Hash // the damaged chunks, as hashes
			for _, h := range backup.BlobChunks(repo, victim) {
				if slices.Contains(full.BadChunks, h.String()) {
					bad = append(bad, h)
				}
			}
			inBlob := backup.BlobChunks(repo, victim)
			var hit, miss uint64
			for seed := uint64(1); seed < 100000 && (hit == 0 || miss == 0); seed++ {
				o := backup.VerifyOptions{Sample: 0.1, Seed: seed}
				if hit == 0 && slices.ContainsFunc(bad, o.Picks) {
					hit = seed
				}
				// A blob holds hundreds of chunks, all lost when a sealed
				// one is damaged: a sample small enough to miss them.
				if small := (backup.VerifyOptions{Sample: 0.001, Seed: seed}); miss == 0 && !slices.ContainsFunc(inBlob, small.Picks) {
					miss = seed
				}
			}
			if hit == 0 || miss == 0 {
				t.Fatalf("no seed found: hit %d miss %d (%d chunks in the blob, %d bad, %d used)", hit, miss, len(inBlob), len(bad), len(used))
			}

			opts := backup.VerifyOptions{Sample: 0.1, Seed: hit}
			rep := repo.VerifyWith(ctx, opts, nil)
			picked := 0
			for h := range used {
				if opts.Picks(h) {
					picked++
				}
			}
			if rep.Chunks != picked || rep.Sample != 0.1 || rep.Seed != hit {
				t.Fatalf("sample: %d chunks checked (sample %v seed %d), the seed picks %d", rep.Chunks, rep.Sample, rep.Seed, picked)
			}
			if picked < len(used)/20 || picked > len(used)/5 {
				t.Fatalf("a 10%% sample picked %d of %d chunks", picked, len(used))
			}
			if !slices.Equal(rep.BadImages, []string{b.ID}) || rep.GoodImages != 1 || len(rep.BadChunks) == 0 {
				t.Fatalf("sample that picks a damaged chunk: %+v, want %s broken", rep, b.ID)
			}
			for _, c := range rep.BadChunks {
				if !slices.Contains(full.BadChunks, c) {
					t.Fatalf("sample names chunk %s, which the full verify found intact", c)
				}
			}
			if len(rep.BadPacks) != 0 {
				t.Fatalf("sample named packs, which it does not read whole: %v", rep.BadPacks)
			}

			clean := repo.VerifyWith(ctx, backup.VerifyOptions{Sample: 0.001, Seed: miss}, nil)
			if len(clean.BadImages)+len(clean.BadChunks)+len(clean.BadPacks) != 0 || clean.GoodImages != 2 {
				t.Fatalf("sample that misses the damaged blob: %+v, want nothing found", clean)
			}
			if again := repo.VerifyWith(ctx, opts, nil); !slices.Equal(again.BadChunks, rep.BadChunks) || again.Chunks != rep.Chunks {
				t.Fatalf("the same seed checked other chunks: %+v, then %+v", rep, again)
			}
			if all := repo.VerifyWith(ctx, backup.VerifyOptions{Sample: 1, Seed: 7}, nil); !slices.Equal(all.BadChunks, full.BadChunks) || all.Chunks != full.Chunks || all.Sample != 0 {
				t.Fatalf("sample 1: %+v, want the full verify %+v", all, full)
			}
		})
	}
}
