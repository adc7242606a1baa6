package jobs

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"umbra/backup"
)

// A verify job re-reads a repository's chunks and checks them against
// their hashes (what `umbra verify` does). With reverify_days, a run
// when every image was verified within that many days does nothing; the
// catalog keeps when each image was last found good. With sample, a
// run checks that fraction of the chunks, picked afresh each run (the
// seed is in the run's detail: `umbra verify --sample F --seed S`
// repeats it), a cheap check between full ones.
func init() {
	register(&Kind{Name: "verify", Check: checkVerify, Run: runVerify})
}

func checkVerify(d *Def) error {
	if err := unused(d, "volumes", "writers", "persistent", "full", "keep", "to", "to_password_file"); err != nil {
		return err
	}
	if err := needRepo(d); err != nil {
		return err
	}
	if d.ReverifyDays < 0 {
		return fieldErr(d, "reverify_days", "%d: want 0 (every run verifies every image) or more", d.ReverifyDays)
	}
	if d.Sample < 0 || d.Sample > 1 {
		return fieldErr(d, "sample", "%g: want a fraction of the chunks above 0 and below 1, e.g. 0.05 (0 or 1: all of them)", d.Sample)
	}
	if d.Sample > 0 && d.Sample < 1 && d.ReverifyDays > 0 {
		return fieldErr(d, "reverify_days", "a sampled verify checks no image whole, so it keeps no verify times: use reverify_days in a full verify job")
	}
	return nil
}

func runVerify(ctx context.Context, env *Env, d *Def, out *Outcome) error {
	set, err := repoSettings(d)
	if err != nil {
		return err
	}
	r, err := backup.OpenWith(ctx, d.Repo, set)
	if err != nil {
		return fmt.Errorf("open %s: %w", d.Repo, err)
	}
	defer r.Close()
	repoID := r.Config().ID
	list, _ := r.Images() // unreadable records are verify's to report
	now := env.Now()
	if d.ReverifyDays > 0 && env.Verified != nil && len(list) > 0 {
		due := 0
		for _, x := range list {
			if t, ok := env.Verified.Verified(repoID, x.ID); !ok || now.Sub(t) >= time.Duration(d.ReverifyDays)*24*time.Hour {
				due++
			}
		}
		if due == 0 {
			out.Detail = fmt.Sprintf("nothing due: all %d images verified within %d days", len(list), d.ReverifyDays)
			return nil
		}
	}
	opts := backup.VerifyOptions{Sample: d.Sample, Seed: rand.Uint64()}
	sampled := d.Sample > 0 && d.Sample < 1
	rep := r.VerifyWith(ctx, opts, nil)
	if err := ctx.Err(); err != nil {
		return err
	}
	bad := map[string]bool{}
	for _, id := range append(append([]string{}, rep.BadImages...), rep.Unreadable...) {
		bad[id] = true
	}
	var good []string
	for _, x := range list {
		if !bad[x.ID] {
			good = append(good, x.ID)
		}
	}
	if env.Verified != nil && len(good) > 0 && !sampled {
		if err := env.Verified.SetVerified(repoID, good, now); err != nil {
			env.Log.Warn("verify: recording verify times", "job", d.Name, "err", err)
		}
	}
	out.Detail = fmt.Sprintf("%d packs, %d chunks, %d images good", rep.Packs, rep.Chunks, rep.GoodImages)
	if sampled {
		out.Detail = fmt.Sprintf("sample %g (seed %d): %d chunks, %d images good", d.Sample, opts.Seed, rep.Chunks, rep.GoodImages)
	}
	var problems []string
	if n := len(rep.BadChunks); n > 0 {
		problems = append(problems, fmt.Sprintf("%d bad chunks", n))
	}
	if n := len(rep.BadPacks); n > 0 {
		problems = append(problems, fmt.Sprintf("bad packs: %s", strings.Join(first(rep.BadPacks, 3), "; ")))
	}
	if n := len(rep.BadImages); n > 0 {
		problems = append(problems, fmt.Sprintf("damaged images: %s", strings.Join(first(rep.BadImages, 10), ", ")))
	}
	if n := len(rep.BadIndexes); n > 0 {
		problems = append(problems, fmt.Sprintf("bad indexes: %s", strings.Join(first(rep.BadIndexes, 3), "; ")))
	}
	if n := len(rep.Unreadable); n > 0 {
		problems = append(problems, fmt.Sprintf("unreadable images: %s", strings.Join(first(rep.Unreadable, 10), ", ")))
	}
	if len(problems) > 0 {
		return fmt.Errorf("repository %s is damaged: %s (see `umbra verify --repo %s`, then `umbra repair`)", d.Repo, strings.Join(problems, "; "), d.Repo)
	}
	return nil
}

// first is at most n of list, with how many more there are.
func first(list []string, n int) []string {
	if len(list) <= n {
		return list
	}
	return append(list[:n:n], fmt.Sprintf("and %d more", len(list)-n))
}
