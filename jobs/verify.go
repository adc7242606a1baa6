package jobs

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"umbra/backup"
)

// A verify job re-reads a repository's chunks and checks them against
// their hashes (what `umbra verify` does), and records in the
// repository what it found for each image it checked (`umbra images
// list` shows it). With reverify_days, a run checks only the images
// never verified, found damaged, or last verified that many days ago or
// more, as Proxmox Backup Server's verify jobs do. With sample, a run
// checks that fraction of the chunks, picked afresh each run (the seed
// is in the run's detail: `umbra verify --sample F --seed S` repeats
// it), a cheap check between full ones; it records the damage it finds,
// never an image as good.
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
		return fieldErr(d, "reverify_days", "a sampled verify never records an image as verified good, so every image would be due every run: use reverify_days in a full verify job")
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
	now := env.Now()
	opts := backup.VerifyOptions{Sample: d.Sample, Seed: rand.Uint64(), Record: true, Time: now}
	sampled := d.Sample > 0 && d.Sample < 1
	if d.ReverifyDays > 0 {
		due, total, err := dueImages(ctx, r, now, time.Duration(d.ReverifyDays)*24*time.Hour)
		if err != nil {
			return err
		}
		if len(due) == 0 {
			out.Detail = fmt.Sprintf("nothing due: all %d images verified good within %d days", total, d.ReverifyDays)
			return nil
		}
		opts.Images = due
	}
	rep := r.VerifyWith(ctx, opts, nil)
	if err := ctx.Err(); err != nil {
		return err
	}
	if rep.RecordError != "" {
		env.Log.Warn("verify: recording what it found", "job", d.Name, "err", rep.RecordError)
	}
	out.Detail = fmt.Sprintf("%d packs, %d chunks, %d images good", rep.Packs, rep.Chunks, rep.GoodImages)
	if opts.Images != nil {
		out.Detail = fmt.Sprintf("%d images due, %d packs, %d chunks, %d images good", rep.Checked, rep.Packs, rep.Chunks, rep.GoodImages)
	}
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

// dueImages are the images of r a verify with reverify age must check:
// never verified (or whose record does not read), found damaged, or
// verified good age ago or longer; total is how many images r holds.
func dueImages(ctx context.Context, r *backup.Repo, now time.Time, age time.Duration) (due []string, total int, err error) {
	list, errs := r.Images()
	for _, e := range errs {
		var re *backup.RecordError
		if !errors.As(e, &re) {
			return nil, 0, fmt.Errorf("list the images of %s: %w", r.Location(), e)
		}
		due = append(due, re.ID) // verify reports it
	}
	states, _ := r.VerifyStates(ctx) // one that does not read: never verified
	for _, x := range list {
		s, ok := states[x.ID]
		if !ok || s.Result != backup.VerifyGood || now.Sub(s.Time) >= age {
			due = append(due, x.ID)
		}
	}
	return due, len(list) + len(errs), nil
}
