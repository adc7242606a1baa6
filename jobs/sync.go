package jobs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"umbra/backup"
)

// A sync job copies the images of a repository (those of its volumes,
// or all) into another one, the offsite copy (what `umbra copy` does):
// only the chunks the target lacks move, images it has are skipped, and
// a run that was interrupted is finished by the next. The target must
// exist (`umbra copy --init` or `umbra repo init` makes it), so that a
// mistyped location fails instead of filling a new repository.
func init() {
	register(&Kind{Name: "sync", Check: checkSync, Run: runSync})
}

func checkSync(d *Def) error {
	if err := unused(d, "writers", "persistent", "full", "keep", "reverify_days", "sample"); err != nil {
		return err
	}
	if err := needRepo(d); err != nil {
		return err
	}
	if d.To == "" {
		return fieldErr(d, "to", "missing: give the repository to copy into, a directory or s3://HOST/BUCKET[/PREFIX]")
	}
	if !strings.Contains(d.To, "://") && !strings.HasPrefix(d.To, "/") {
		return fieldErr(d, "to", "%q: a local repository must be an absolute path", d.To)
	}
	if d.To == d.Repo {
		return fieldErr(d, "to", "%q is repo itself: give another repository", d.To)
	}
	seen := map[string]bool{}
	for _, v := range d.Volumes {
		if v == "" || seen[v] {
			return fieldErr(d, "volumes", "%q: empty or named twice", v)
		}
		seen[v] = true
	}
	return nil
}

// targetSettings are the secrets the target opens with, read at each
// run: the password from to_password_file or the service's
// $UMBRA_TO_PASSWORD, S3 credentials from UMBRA_TO_AWS_ACCESS_KEY_ID and
// UMBRA_TO_AWS_SECRET_ACCESS_KEY when set, else as the source's (as
// `umbra copy --to` takes them).
func targetSettings(d *Def) (backup.Settings, error) {
	set := backup.Settings{Password: os.Getenv("UMBRA_TO_PASSWORD"),
		Cred: backup.Credentials{AccessKey: os.Getenv("AWS_ACCESS_KEY_ID"), SecretKey: os.Getenv("AWS_SECRET_ACCESS_KEY")}}
	if k := os.Getenv("UMBRA_TO_AWS_ACCESS_KEY_ID"); k != "" {
		set.Cred = backup.Credentials{AccessKey: k, SecretKey: os.Getenv("UMBRA_TO_AWS_SECRET_ACCESS_KEY")}
	}
	if d.ToPasswordFile != "" {
		b, err := os.ReadFile(d.ToPasswordFile)
		if err != nil {
			return set, fieldErr(d, "to_password_file", "%w", err)
		}
		if set.Password = strings.TrimRight(string(b), "\r\n"); set.Password == "" {
			return set, fieldErr(d, "to_password_file", "%s is empty", d.ToPasswordFile)
		}
	}
	return set, nil
}

func runSync(ctx context.Context, env *Env, d *Def, out *Outcome) error {
	set, err := repoSettings(d)
	if err != nil {
		return err
	}
	tset, err := targetSettings(d)
	if err != nil {
		return err
	}
	src, err := backup.OpenWith(ctx, d.Repo, set)
	if err != nil {
		out.Detail = "nothing copied"
		return fmt.Errorf("open %s: %w", d.Repo, err)
	}
	defer src.Close()
	dst, err := backup.OpenWith(ctx, d.To, tset)
	if errors.Is(err, backup.ErrNoRepo) {
		err = fmt.Errorf("%w (or `umbra copy --from %s --to %s --init --all` once, which creates it with the source's chunk size and hash)", err, d.Repo, d.To)
	}
	if err != nil {
		out.Detail = "nothing copied"
		return fmt.Errorf("open %s: %w", d.To, err)
	}
	defer dst.Close()
	opts := backup.CopyOptions{Volumes: d.Volumes, All: len(d.Volumes) == 0}
	st, err := backup.Copy(ctx, src, dst, opts)
	out.Bytes = st.BytesWritten + st.BytesIndex
	n := map[string]int{}
	for _, ci := range st.Images {
		n[ci.Result]++
	}
	out.Detail = fmt.Sprintf("%d images copied, %d there already, %d same content, %d failed; %d chunks (%d bytes) moved, %d there",
		n[backup.CopyCopied], n[backup.CopyPresent], n[backup.CopySame], n[backup.CopyFailed], st.ChunksCopied, st.BytesCopied, st.ChunksPresent)
	if err != nil {
		return fmt.Errorf("sync %s to %s: %w", d.Repo, d.To, err)
	}
	return nil
}
