package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"umbra/api/umbrav1"
	"umbra/backup"
)

func init() {
	verbs = append(verbs, newBackupCmd, newRepoCmd, newImagesCmd, newRestoreCmd, newVerifyCmd)
}

func newBackupCmd() *cobra.Command {
	var rf repoFlags
	var writers, full bool
	cmd := &cobra.Command{
		Use:   "backup VOLUME...",
		Short: "Take a snapshot set and write an image of each volume into the repository (incremental when it can)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			where, set, err := rf.settings()
			if err != nil {
				return err
			}
			req := &umbrav1.BackupRequest{Volumes: args, Repo: where, Writers: writers, Full: full,
				Password: set.Password, S3AccessKey: set.Cred.AccessKey, S3SecretKey: set.Cred.SecretKey}
			pr := newProgress("backup")
			var resp *umbrav1.BackupResponse
			err = callCtx(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				stream, err := c.BackupStream(ctx, req)
				if err != nil {
					return err
				}
				for {
					ev, err := stream.Recv()
					if err == io.EOF {
						return nil
					}
					if err != nil {
						return err
					}
					if p := ev.GetProgress(); p != nil {
						pr.update(p.Volume, p.Done, p.Total)
					}
					if d := ev.GetDone(); d != nil {
						resp = d
					}
				}
			})
			pr.finish()
			if err != nil {
				return err
			}
			if resp == nil {
				return errors.New("the service ended the backup without a result; see its log")
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
		},
	}
	rf.add(cmd)
	cmd.Flags().BoolVar(&writers, "writers", true, "freeze the writers whose data is on the volumes (application-consistent)")
	cmd.Flags().BoolVar(&full, "full", false, "read every chunk even when change tracking allows less")
	return cmd
}

func newRepoCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "repo", Short: "Backup repositories"}
	var rf repoFlags
	var chunk, level string
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create a backup repository (encrypted when a password is given)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			n, err := parseSizeFlag("--chunk-size", chunk, cmd.Flags().Changed("chunk-size"))
			if err != nil {
				return err
			}
			if cmd.Flags().Changed("chunk-size") {
				if err := checkChunkSize("--chunk-size", n, repoMinChunk, repoMaxChunk); err != nil {
					return err
				}
			}
			where, set, err := rf.settings()
			if err != nil {
				return err
			}
			set.ChunkSize = int(n)
			set.Level = level
			r, err := backup.InitWith(cmd.Context(), where, set)
			if err != nil {
				return err
			}
			defer r.Close()
			if gflags.json {
				return printJSON(os.Stdout, r.Config())
			}
			c := r.Config()
			fmt.Printf("created repository %s (chunks %s, %s, zstd %s, encryption %s)\n", where, human(int64(c.ChunkSize)), c.Hash, c.Level, c.Encryption)
			return nil
		},
	}
	rf.add(initCmd)
	initCmd.Flags().StringVar(&chunk, "chunk-size", "", "chunk size, a power of two from 4K to 4M (default 4K; see docs/benchmarks.md)")
	initCmd.Flags().StringVar(&level, "compression", "fastest", "zstd level for new data: fastest (zstd 1), default (3; ~10 % smaller, ~40 % slower) or better (7; smaller still, ~3x slower)")
	var urf repoFlags
	var all bool
	unlockCmd := urf.command(&cobra.Command{
		Use:   "unlock",
		Short: "Remove stale locks (of operations that ended or processes that are gone, on this host; of another host, not refreshed for 30 minutes); --all removes every lock",
		Args:  cobra.NoArgs,
	}, func(cmd *cobra.Command, _ []string, r *backup.Repo) error {
		n, err := r.Unlock(cmd.Context(), all)
		if err != nil {
			return err
		}
		if gflags.json {
			return printJSON(os.Stdout, map[string]int{"removed": n})
		}
		fmt.Printf("removed %d locks\n", n)
		return nil
	})
	unlockCmd.Flags().BoolVar(&all, "all", false, "remove live locks too (only when no umbra process uses the repository)")
	cmd.AddCommand(initCmd, unlockCmd, newRepoRepairCmd())
	return cmd
}

// listedImage is an image as `images list --json` writes it: its record
// and, when a verify checked it, what the last one found.
type listedImage struct {
	*backup.Image
	Verified *backup.VerifyState `json:"verified,omitempty"`
}

func newImagesCmd() *cobra.Command {
	var rf repoFlags
	cmd := &cobra.Command{Use: "images", Short: "Images in a backup repository"}
	list := rf.command(&cobra.Command{
		Use:   "list",
		Short: "List images, oldest first",
		Args:  cobra.NoArgs,
	}, func(cmd *cobra.Command, _ []string, r *backup.Repo) error {
		images, errs := r.Images()
		for _, e := range errs {
			fmt.Fprintln(os.Stderr, "umbra: damaged image record:", e)
		}
		states, serrs := r.VerifyStates(cmd.Context())
		for _, e := range serrs {
			fmt.Fprintln(os.Stderr, "umbra: unreadable verify record (the image counts as not verified):", e)
		}
		if gflags.json {
			out := make([]listedImage, 0, len(images))
			for _, x := range images {
				li := listedImage{Image: x}
				if s, ok := states[x.ID]; ok {
					li.Verified = &s
				}
				out = append(out, li)
			}
			return printJSON(os.Stdout, out)
		}
		w := table()
		fmt.Fprintln(w, "IMAGE\tVOLUME\tCREATED\tSIZE\tKIND\tNEW\tPARENT\tVERIFIED")
		for _, x := range images {
			kind, added := "full", ""
			if x.Parent != "" {
				kind = "incremental"
			}
			if x.Stats != nil {
				added = human(x.Stats.Compressed + x.Stats.Index)
			}
			verified := "never"
			if s, ok := states[x.ID]; ok {
				verified = s.Time.Local().Format(time.DateTime) + " " + s.Result
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", x.ID, x.Volume, x.Created.Local().Format(time.DateTime), human(x.Size), kind, added, x.Parent, verified)
		}
		return w.Flush()
	})
	var drf repoFlags
	del := drf.command(&cobra.Command{
		Use:   "delete IMAGE...",
		Short: "Delete images (damaged ones too) and free the space only they used",
		Args:  cobra.MinimumNArgs(1),
	}, func(cmd *cobra.Command, args []string, r *backup.Repo) error {
		walkPace()
		rep, err := r.Delete(cmd.Context(), args)
		if err != nil {
			return err
		}
		if gflags.json {
			return printJSON(os.Stdout, rep)
		}
		for _, id := range rep.Removed {
			fmt.Printf("deleted %s\n", id)
		}
		fmt.Printf("%d images left; %d packs deleted, %d repacked, %s freed\n", len(rep.Kept), rep.PacksDeleted, rep.PacksRepacked, human(rep.BytesFreed))
		return nil
	})
	cmd.AddCommand(list, del)
	return cmd
}

func newRestoreCmd() *cobra.Command {
	var rf repoFlags
	var to, volume, rate string
	var force, live bool
	cmd := &cobra.Command{
		Use:   "restore IMAGE --to PATH|DEVICE [--live]",
		Short: "Write an image to a file or device, verifying every chunk (zero chunks stay holes in files)",
		Long: `Write an image to a file or device, verifying every chunk (zero chunks stay holes in files).

With --live the running service makes the target a volume at once (NBD
export and FUSE file like any volume): reads of chunks not restored yet
fetch them from the repository first, writes are the target's own, and
the rest is restored in the background. Progress, state and ETA are in
umbra volume list. The restore survives a restart of the service; run the
same command again to change --rate.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return usageError{fmt.Errorf("--to PATH is required")}
			}
			if live {
				return restoreLive(cmd, &rf, args[0], to, volume, rate, force)
			}
			if volume != "" || rate != "" {
				return usageError{fmt.Errorf("--volume and --rate go with --live")}
			}
			if err := checkRestoreTarget(to, force); err != nil {
				return err
			}
			// A restore's heap is the index plus short-lived batch and
			// blob buffers: collecting at half the live heap instead of
			// all of it keeps the peak down at no cost in time.
			if os.Getenv("GOGC") == "" {
				debug.SetGCPercent(50)
			}
			r, err := rf.open(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Close()
			start := time.Now()
			pr := newProgress("restore")
			err = r.RestoreContext(cmd.Context(), args[0], to, func(done, total int64) { pr.update(args[0], done, total) })
			pr.finish()
			if err != nil {
				return err
			}
			if gflags.json {
				return printJSON(os.Stdout, map[string]any{"image": args[0], "to": to, "seconds": time.Since(start).Seconds()})
			}
			fmt.Printf("restored %s to %s in %v\n", args[0], to, time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	rf.add(cmd)
	cmd.Flags().StringVar(&to, "to", "", "file or block device to write")
	cmd.Flags().BoolVar(&force, "force", false, "overwrite a file that exists, or a block device that holds data")
	cmd.Flags().BoolVar(&live, "live", false, "make the target a volume of the running service at once, restored in the background")
	cmd.Flags().StringVar(&volume, "volume", "", "with --live: the volume's name (default: the image's volume)")
	cmd.Flags().StringVar(&rate, "rate", "", "with --live: bound the background restore to this many bytes a second (e.g. 100M; default: none)")
	return cmd
}

// restoreLive asks the service to restore image live into to.
func restoreLive(cmd *cobra.Command, rf *repoFlags, image, to, volume, rate string, force bool) error {
	var bps int64
	if rate != "" {
		n, err := parseSize(rate)
		if err != nil {
			return usageError{fmt.Errorf("--rate %q: %w", rate, err)}
		}
		bps = n
	}
	where, set, err := rf.settings()
	if err != nil {
		return err
	}
	if !strings.Contains(where, "://") {
		if where, err = filepath.Abs(where); err != nil {
			return err
		}
	}
	abs, err := filepath.Abs(to)
	if err != nil {
		return err
	}
	// The service keeps the password in memory only, and where it came
	// from to read it again after a restart.
	var pwFile string
	if rf.passwordFile != "" {
		if pwFile, err = filepath.Abs(rf.passwordFile); err != nil {
			return err
		}
	}
	req := &umbrav1.RestoreLiveRequest{Repo: where, Password: set.Password, PasswordFile: pwFile, S3AccessKey: set.Cred.AccessKey, S3SecretKey: set.Cred.SecretKey,
		Image: image, Target: abs, Volume: volume, Rate: bps, Force: force}
	return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.RestoreLiveResponse, error) {
		return c.RestoreLive(ctx, req)
	}, func(resp *umbrav1.RestoreLiveResponse) error {
		v := resp.Volume
		fmt.Printf("volume %s: %s restored live from %s (%s); follow it with umbra volume list\n", v.Name, abs, image, liveStr(v.LiveRestore))
		return nil
	})
}

// liveStr is a live restore's progress in a few words.
func liveStr(p *umbrav1.LiveRestore) string {
	if p == nil {
		return "-"
	}
	pct := 100.0
	if p.Size > 0 {
		pct = float64(p.Restored) * 100 / float64(p.Size)
	}
	s := fmt.Sprintf("%s %.1f%% of %s", p.State, pct, human(p.Size))
	if p.EtaSeconds > 0 {
		s += fmt.Sprintf(", ETA %v", time.Duration(p.EtaSeconds)*time.Second)
	}
	if p.Error != "" {
		s += ": " + p.Error
	}
	return s
}

// checkRestoreTarget refuses, without --force, to overwrite what a
// restore's target holds: a regular file that is not empty, or a block
// device whose first MiB is not all zero (a filesystem, a partition
// table, an LVM label: as mkfs asks before it overwrites one). A device
// in use is refused by the restore itself, --force or not.
func checkRestoreTarget(to string, force bool) error {
	fi, err := os.Stat(to)
	if err != nil || force {
		return nil // a missing target is created; other errors are the restore's to report
	}
	switch {
	case fi.Mode().IsRegular() && fi.Size() > 0:
		return usageError{fmt.Errorf("--to %s: the file exists and holds %s: give --force to overwrite it, or another path", to, human(fi.Size()))}
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		f, err := os.Open(to)
		if err != nil {
			return fmt.Errorf("--to %s: %w", to, err)
		}
		defer f.Close()
		buf := make([]byte, 1<<20)
		n, err := io.ReadFull(f, buf)
		if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
			return fmt.Errorf("--to %s: %w", to, err)
		}
		for _, c := range buf[:n] {
			if c != 0 {
				return usageError{fmt.Errorf("--to %s: the device holds data (its first MiB is not zero: a filesystem or a partition table?): give --force to overwrite it", to)}
			}
		}
	}
	return nil
}

func newVerifyCmd() *cobra.Command {
	var rf repoFlags
	var sample float64
	var seed uint64
	cmd := rf.command(&cobra.Command{
		Use:   "verify",
		Short: "Re-hash every chunk and name the images a damaged chunk breaks",
		Long: `Re-hash every chunk and name the images a damaged chunk breaks.

--sample F checks a fraction F (0 < F < 1) of the chunks the images use,
each read alone from its pack, instead of every chunk and every pack
whole: a cheaper check to run often, a full one now and then. The
chunks are picked by --seed (random when not given, and printed): the
same seed picks the same chunks.`,
		Args: cobra.NoArgs,
		PreRunE: func(cmd *cobra.Command, _ []string) error {
			if sample <= 0 || sample > 1 {
				return usageError{fmt.Errorf("--sample %v: give a fraction above 0 and at most 1 (e.g. --sample 0.1; 1 checks everything)", sample)}
			}
			if cmd.Flags().Changed("seed") && sample == 1 {
				return usageError{errors.New("--seed picks the chunks of a sample: give --sample too (e.g. --sample 0.1 --seed 42)")}
			}
			if !cmd.Flags().Changed("seed") {
				seed = rand.Uint64()
			}
			return nil
		},
	}, func(cmd *cobra.Command, _ []string, r *backup.Repo) error {
		walkPace()
		opts := backup.VerifyOptions{Sample: sample, Seed: seed, Record: true}
		pr := newProgress("verify")
		rep := r.VerifyWith(cmd.Context(), opts, func(done, total int64) { pr.update("packs", done, total) })
		pr.finish()
		if gflags.json {
			printJSON(os.Stdout, rep)
		} else {
			if rep.Sample > 0 {
				fmt.Printf("sample of %g of the chunks, seed %d (--seed %d checks the same chunks again)\n", rep.Sample, rep.Seed, rep.Seed)
			}
			fmt.Printf("%d chunks in %d packs checked, %d images good\n", rep.Chunks, rep.Packs, rep.GoodImages)
			for _, c := range rep.BadChunks {
				fmt.Printf("damaged chunk %s\n", c)
			}
			for _, id := range rep.BadImages {
				fmt.Printf("broken image %s\n", id)
			}
			for _, e := range rep.BadIndexes {
				fmt.Printf("damaged index: %s\n", e)
			}
			for _, e := range rep.BadPacks {
				fmt.Printf("damaged pack: %s\n", e)
			}
		}
		if rep.RecordError != "" {
			fmt.Fprintf(os.Stderr, "umbra: what verify found is not recorded for `umbra images list`: %s\n", rep.RecordError)
		}
		if len(rep.BadIndexes) > len(rep.Unreadable) || len(rep.BadPacks) > 0 {
			return fmt.Errorf("the repository %s is damaged: %d images broken, %d index objects or records and %d packs damaged; "+
				"run `umbra repo repair --repo %s` (--dry-run first to see what it does): it rebuilds the index from the packs, rewrites what damaged packs still hold and names the images that stay broken",
				rf.location, len(rep.BadImages), len(rep.BadIndexes)-len(rep.Unreadable), len(rep.BadPacks), rf.location)
		}
		if len(rep.BadChunks)+len(rep.BadImages) > 0 {
			return fmt.Errorf("the repository %s is damaged: %d images broken; restore the others; `umbra repo repair --repo %s` drops what cannot be read and names what it breaks; "+
				"take a full backup (`umbra backup --full`) of the volumes whose images broke", rf.location, len(rep.BadImages), rf.location)
		}
		if len(rep.Unreadable) > 0 {
			return fmt.Errorf("the storage of %s did not return %d image records (%s); nothing found damaged: check the storage and run verify again", rf.location, len(rep.Unreadable), strings.Join(rep.Unreadable, " "))
		}
		return nil
	})
	cmd.Flags().Float64Var(&sample, "sample", 1, "fraction of the chunks to check, e.g. 0.1 (1: all, and every pack whole)")
	cmd.Flags().Uint64Var(&seed, "seed", 0, "with --sample: picks the chunks (default: random, printed)")
	return cmd
}
