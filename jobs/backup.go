package jobs

import (
	"context"
	"fmt"
	"strings"

	"umbra/api/umbrav1"
	"umbra/backup"
)

// A backup job backs its volumes up as one snapshot set into a
// repository (what `umbra backup` does, in the service), then, with keep
// rules, prunes the repository as `umbra prune` does.
func init() {
	register(&Kind{Name: "backup", Check: checkBackup, Run: runBackup})
}

func checkBackup(d *Def) error {
	if err := unused(d, "persistent", "reverify_days", "sample", "to", "to_password_file"); err != nil {
		return err
	}
	if err := needVolumes(d); err != nil {
		return err
	}
	if err := needRepo(d); err != nil {
		return err
	}
	k := d.Keep
	switch {
	case k.Yearly != 0:
		return fieldErr(d, "keep.yearly", "prune has no yearly rule: keep monthly = 12 * years")
	case k.MinAge != "":
		return fieldErr(d, "keep.min_age", "prune has no min_age rule")
	case k.Count != 0:
		return fieldErr(d, "keep.count", "prune keeps the newest images with keep.last")
	}
	for _, f := range []struct {
		name string
		n    int
	}{{"last", k.Last}, {"hourly", k.Hourly}, {"daily", k.Daily}, {"weekly", k.Weekly}, {"monthly", k.Monthly}} {
		if f.n < 0 {
			return fieldErr(d, "keep."+f.name, "%d: want 0 or more", f.n)
		}
	}
	return nil
}

func (k Keep) policy() backup.Policy {
	return backup.Policy{Last: k.Last, Hourly: k.Hourly, Daily: k.Daily, Weekly: k.Weekly, Monthly: k.Monthly}
}

func runBackup(ctx context.Context, env *Env, d *Def, out *Outcome) error {
	set, err := repoSettings(d)
	if err != nil {
		return err
	}
	resp, err := env.API.Backup(ctx, &umbrav1.BackupRequest{Volumes: d.Volumes, Repo: d.Repo, Writers: d.Writers, Full: d.Full,
		Password: set.Password, S3AccessKey: set.Cred.AccessKey, S3SecretKey: set.Cred.SecretKey})
	if err != nil {
		out.Detail = "no image made"
		return fmt.Errorf("backup %s into %s: %w", strings.Join(d.Volumes, ","), d.Repo, err)
	}
	var images []string
	for _, im := range resp.Images {
		out.Bytes += im.BytesWritten
		images = append(images, im.Volume+" "+im.Image)
	}
	out.Detail = "images " + strings.Join(images, ", ")
	if d.Keep.empty() {
		return nil
	}
	r, err := backup.OpenWith(ctx, d.Repo, set)
	if err != nil {
		return fmt.Errorf("prune: open %s: %w", d.Repo, err)
	}
	defer r.Close()
	rep, err := r.Prune(ctx, d.Keep.policy(), false)
	out.Detail += fmt.Sprintf("; prune kept %d, removed %d, freed %d bytes", len(rep.Kept), len(rep.Removed), rep.BytesFreed)
	if err != nil {
		return fmt.Errorf("prune %s: %w", d.Repo, err)
	}
	return nil
}
