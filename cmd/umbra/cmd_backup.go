package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"umbra/api/umbrav1"
	"umbra/backup"
)

func init() {
	verbs = append(verbs, newBackupCmd, newRepoCmd, newImagesCmd, newRestoreCmd, newVerifyCmd)
}

// repoFlag adds --repo, defaulting to STATE/repo.
func repoFlag(cmd *cobra.Command, dst *string) {
	cmd.Flags().StringVar(dst, "repo", filepath.Join(defaultStateDir(), "repo"), "backup repository directory")
}

func newBackupCmd() *cobra.Command {
	var repo string
	var writers, full bool
	cmd := &cobra.Command{
		Use:   "backup VOLUME...",
		Short: "Take a snapshot set and write an image of each volume into the repository (incremental when it can)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			abs, err := filepath.Abs(repo)
			if err != nil {
				return usageError{err}
			}
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				resp, err := c.Backup(ctx, &umbrav1.BackupRequest{Volumes: args, Repo: abs, Writers: writers, Full: full})
				if err != nil {
					return err
				}
				if gflags.json {
					return printJSON(os.Stdout, resp)
				}
				w := table()
				fmt.Fprintln(w, "VOLUME\tIMAGE\tKIND\tREAD\tNEW\tWRITTEN\tTIME\tNOTE")
				for _, im := range resp.Images {
					kind := "full"
					if im.Incremental {
						kind = "incremental"
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", im.Volume, im.Image, kind, human(im.BytesRead), human(im.BytesNew),
						human(im.BytesWritten), (time.Duration(im.Seconds * float64(time.Second))).Round(time.Millisecond), im.WhyFull)
				}
				return w.Flush()
			})
		},
	}
	repoFlag(cmd, &repo)
	cmd.Flags().BoolVar(&writers, "writers", true, "freeze the writers whose data is on the volumes (application-consistent)")
	cmd.Flags().BoolVar(&full, "full", false, "read every chunk even when change tracking allows less")
	return cmd
}

func newRepoCmd() *cobra.Command {
	var repo string
	cmd := &cobra.Command{Use: "repo", Short: "Backup repositories"}
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create a backup repository",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := backup.Init(repo)
			if err != nil {
				return err
			}
			r.Close()
			if gflags.json {
				return printJSON(os.Stdout, map[string]string{"repo": repo})
			}
			fmt.Printf("created repository %s\n", repo)
			return nil
		},
	}
	repoFlag(initCmd, &repo)
	cmd.AddCommand(initCmd)
	return cmd
}

func openRepo(path string) (*backup.Repo, error) {
	r, err := backup.Open(path)
	if err != nil {
		return nil, notFoundError{err}
	}
	return r, nil
}

func newImagesCmd() *cobra.Command {
	var repo string
	cmd := &cobra.Command{Use: "images", Short: "Images in a backup repository"}
	list := &cobra.Command{
		Use:   "list",
		Short: "List images, oldest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := openRepo(repo)
			if err != nil {
				return err
			}
			defer r.Close()
			images, errs := r.Images()
			for _, e := range errs {
				fmt.Fprintln(os.Stderr, "umbra: damaged index:", e)
			}
			if gflags.json {
				return printJSON(os.Stdout, images)
			}
			w := table()
			fmt.Fprintln(w, "IMAGE\tVOLUME\tCREATED\tSIZE\tPARENT")
			for _, x := range images {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", x.ID, x.Volume, x.Created.Local().Format(time.DateTime), human(x.Size), x.Parent)
			}
			return w.Flush()
		},
	}
	repoFlag(list, &repo)
	cmd.AddCommand(list)
	return cmd
}

func newRestoreCmd() *cobra.Command {
	var repo, to string
	cmd := &cobra.Command{
		Use:   "restore IMAGE --to PATH|DEVICE",
		Short: "Write an image to a file or device, verifying every chunk (zero chunks stay holes in files)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return usageError{fmt.Errorf("--to PATH is required")}
			}
			r, err := openRepo(repo)
			if err != nil {
				return err
			}
			defer r.Close()
			start := time.Now()
			if err := r.Restore(args[0], to, nil); err != nil {
				return err
			}
			if gflags.json {
				return printJSON(os.Stdout, map[string]any{"image": args[0], "to": to, "seconds": time.Since(start).Seconds()})
			}
			fmt.Printf("restored %s to %s in %v\n", args[0], to, time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	repoFlag(cmd, &repo)
	cmd.Flags().StringVar(&to, "to", "", "file or block device to write")
	return cmd
}

func newVerifyCmd() *cobra.Command {
	var repo string
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Re-hash every chunk and name the images a damaged chunk breaks",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := openRepo(repo)
			if err != nil {
				return err
			}
			defer r.Close()
			rep := r.Verify()
			if gflags.json {
				printJSON(os.Stdout, rep)
			} else {
				fmt.Printf("%d chunks checked, %d images good\n", rep.Chunks, rep.GoodImages)
				for _, c := range rep.BadChunks {
					fmt.Printf("damaged chunk %s\n", c)
				}
				for _, id := range rep.BadImages {
					fmt.Printf("broken image %s\n", id)
				}
				for _, e := range rep.BadIndexes {
					fmt.Printf("damaged index: %s\n", e)
				}
			}
			if len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes) > 0 {
				return fmt.Errorf("the repository %s is damaged: %d images broken", repo, len(rep.BadImages))
			}
			return nil
		},
	}
	repoFlag(cmd, &repo)
	return cmd
}
