package main

import (
	"fmt"
	"os"
	"runtime/debug"

	"github.com/spf13/cobra"

	"umbra/backup"
)

func init() { verbs = append(verbs, newPruneCmd, newStatsCmd) }

// walkPace sets the collector's pace for a command that walks the whole
// repository (verify, prune, images delete, stats): its heap is a live
// part that does not grow with the repository and short-lived garbage
// (chunk-list segments, pack trailers, index pages), so collecting at
// half the live heap instead of all of it keeps the peak down: verify's
// 61 → 48 MiB at 1 Mi chunks and 69 → 52 at 4 Mi, prune's 80 → 70 and
// 88 → 74, for 1–2 % of CPU in the collector instead of 1 %
// (docs/benchmarks.md, 2026-12-07). umbra mount paces its bounded
// caches the same way. GOGC, when set, wins.
func walkPace() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(50)
	}
}

func newPruneCmd() *cobra.Command {
	var rf repoFlags
	var p backup.Policy
	var dry bool
	cmd := rf.command(&cobra.Command{
		Use:   "prune",
		Short: "Remove the images no keep rule keeps (per volume) and free the space only they used",
		Args:  cobra.NoArgs,
	}, func(cmd *cobra.Command, _ []string, r *backup.Repo) error {
		walkPace()
		rep, err := r.Prune(cmd.Context(), p, dry)
		if err != nil {
			if err == backup.ErrNoPolicy {
				return usageError{err}
			}
			return err
		}
		if gflags.json {
			return printJSON(os.Stdout, rep)
		}
		verb := "removed"
		if dry {
			verb = "would remove"
		}
		for _, id := range rep.Removed {
			fmt.Printf("%s %s\n", verb, id)
		}
		fmt.Printf("kept %d images, %s %d", len(rep.Kept), verb, len(rep.Removed))
		if !dry {
			fmt.Printf("; %d packs deleted, %d repacked, %s freed", rep.PacksDeleted, rep.PacksRepacked, human(rep.BytesFreed))
		}
		fmt.Println()
		return nil
	})
	f := cmd.Flags()
	f.IntVar(&p.Last, "keep-last", 0, "keep the newest N images")
	f.IntVar(&p.Hourly, "keep-hourly", 0, "keep the newest image of each of the last N hours that have one")
	f.IntVar(&p.Daily, "keep-daily", 0, "keep the newest image of each of the last N days that have one")
	f.IntVar(&p.Weekly, "keep-weekly", 0, "keep the newest image of each of the last N weeks that have one")
	f.IntVar(&p.Monthly, "keep-monthly", 0, "keep the newest image of each of the last N months that have one")
	f.BoolVar(&dry, "dry-run", false, "only say what would be removed")
	return cmd
}

func newStatsCmd() *cobra.Command {
	var rf repoFlags
	cmd := rf.command(&cobra.Command{
		Use:   "stats",
		Short: "What a backup repository holds: images, unique chunks, stored bytes, dedup",
		Args:  cobra.NoArgs,
	}, func(cmd *cobra.Command, _ []string, r *backup.Repo) error {
		walkPace()
		st := r.Stats(cmd.Context())
		if gflags.json {
			return printJSON(os.Stdout, st)
		}
		w := table()
		fmt.Fprintf(w, "repository\t%s\n", st.Location)
		encoder := "C library"
		if st.Encoder == "go" {
			encoder = "pure Go: this binary was built without cgo"
		}
		fmt.Fprintf(w, "format\t%d: chunks %s named by %d bytes of %s, zstd %s (%s), encryption %s\n", st.Format, human(int64(st.ChunkSize)), st.HashBytes, st.Hash, st.Level, encoder, st.Encryption)
		fmt.Fprintf(w, "images\t%d of %d volumes, %s in all\n", st.Images, st.Volumes, human(st.ImageBytes))
		fmt.Fprintf(w, "chunk lists\t%d segments, %d stored (images share the ones they have in common)\n", st.ListSegments, st.ListObjects)
		fmt.Fprintf(w, "unique chunks\t%d in %d packs, %s raw, %s stored\n", st.Chunks, st.Packs, human(st.RawBytes), human(st.StoredBytes))
		fmt.Fprintf(w, "dedup+compression\t%.1fx\n", st.DedupRatio)
		return w.Flush()
	})
	return cmd
}
