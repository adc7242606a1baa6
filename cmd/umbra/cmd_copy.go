package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"umbra/backup"
)

func init() { verbs = append(verbs, newCopyCmd) }

func newCopyCmd() *cobra.Command {
	var from, to repoFlags
	var volumes []string
	var all, initTarget bool
	cmd := &cobra.Command{
		Use:   "copy --from REPO --to REPO [IMAGE... | --volume NAME... | --all]",
		Short: "Copy images into another repository (local or S3, another key or none), moving only the chunks it lacks; rerun an interrupted copy to finish it",
		Long: `Copy images from one backup repository into another, keeping their IDs.
Only the chunks the target lacks are stored; every chunk is checked when read
and again as stored, and an image is listed in the target only once all of it
is there, so an interrupted copy leaves no image behind and running it again
moves only what is still missing. Images the target has (the same ID, or the
same chunks) are skipped and reported as such.

Between two unencrypted repositories with the same hash, chunks the target
has are not even read; otherwise (an encrypted repository names chunks with
its own key) every chunk is read and hashed again.

The source's password comes from --from-password-file or $UMBRA_PASSWORD,
the target's from --to-password-file or $UMBRA_TO_PASSWORD. S3 credentials
come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; a target in another
account takes UMBRA_TO_AWS_ACCESS_KEY_ID and UMBRA_TO_AWS_SECRET_ACCESS_KEY.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			n := 0
			for _, b := range []bool{len(args) > 0, len(volumes) > 0, all} {
				if b {
					n++
				}
			}
			if n != 1 {
				return usageError{errors.New("name the images to copy: image IDs, --volume NAME or --all (one of them)")}
			}
			if from.location == "" || to.location == "" {
				return usageError{errors.New("--from REPO and --to REPO are required")}
			}
			ctx := cmd.Context()
			src, err := from.open(ctx)
			if err != nil {
				return fmt.Errorf("source: %w", err)
			}
			defer src.Close()
			dst, err := to.open(ctx)
			var nf notFoundError
			if errors.As(err, &nf) && initTarget {
				var where string
				var set backup.Settings
				where, set, err = to.settings()
				if err == nil {
					c := src.Config()
					set.ChunkSize, set.Hash, set.Level = c.ChunkSize, c.Hash, c.Level
					dst, err = backup.InitWith(ctx, where, set)
				}
			} else if errors.As(err, &nf) {
				return notFoundError{fmt.Errorf("target: %w; or give --init to create it with the source's chunk size and hash", err)}
			}
			if err != nil {
				return fmt.Errorf("target: %w", err)
			}
			defer dst.Close()
			pr := newProgress("copy")
			opts := backup.CopyOptions{Images: args, Volumes: volumes, All: all,
				Progress: func(id string, done, total int64) { pr.update(id, done, total) }}
			st, err := backup.Copy(ctx, src, dst, opts)
			pr.finish()
			if len(st.Images) == 0 && err != nil {
				return err
			}
			if gflags.json {
				if perr := printJSON(os.Stdout, st); err == nil {
					err = perr
				}
				return err
			}
			w := table()
			fmt.Fprintln(w, "IMAGE\tVOLUME\tRESULT\tSIZE\tMOVED\tWRITTEN\tTIME\tNOTE")
			for _, ci := range st.Images {
				note := ci.Error
				if ci.SameAs != "" {
					note = "same chunks as " + ci.SameAs
				}
				if ci.Result == backup.CopyPresent {
					note = "the target has it"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", ci.ID, ci.Volume, ci.Result, human(ci.Size), human(ci.BytesCopied), human(ci.BytesWritten),
					(time.Duration(ci.Seconds * float64(time.Second))).Round(time.Millisecond), note)
			}
			if ferr := w.Flush(); err == nil {
				err = ferr
			}
			how := "chunks the target lacked were read"
			if st.Rehashed {
				how = "every chunk was read and hashed again (the repositories name chunks differently)"
			}
			fmt.Printf("%d chunks (%s) copied, %d were there; %s read, %s written; %s; %v\n", st.ChunksCopied, human(st.BytesCopied), st.ChunksPresent,
				human(st.BytesRead), human(st.BytesWritten+st.BytesIndex), how, (time.Duration(st.Seconds * float64(time.Second))).Round(time.Millisecond))
			return err
		},
	}
	from.addAs(cmd, "from", "source", "UMBRA_PASSWORD", "")
	to.addAs(cmd, "to", "target", "UMBRA_TO_PASSWORD", "UMBRA_TO_AWS_")
	cmd.Flags().StringSliceVar(&volumes, "volume", nil, "copy every image of this volume (repeat, or comma-separated, for several)")
	cmd.Flags().BoolVar(&all, "all", false, "copy every image")
	cmd.Flags().BoolVar(&initTarget, "init", false, "create the target when there is none, with the source's chunk size and hash (encrypted when it has a password)")
	return cmd
}
