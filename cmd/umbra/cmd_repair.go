package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"umbra/backup"
)

// newRepoRepairCmd is `umbra repo repair`.
func newRepoRepairCmd() *cobra.Command {
	var rf repoFlags
	var dry bool
	cmd := rf.command(&cobra.Command{
		Use:   "repair",
		Short: "Rebuild the index from the packs, rewrite what damaged packs still hold, drop damaged image records, and name the images that stay broken",
		Args:  cobra.NoArgs,
	}, func(cmd *cobra.Command, _ []string, r *backup.Repo) error {
		rep, err := r.Repair(cmd.Context(), dry)
		if err != nil {
			return err
		}
		if gflags.json {
			if err := printJSON(os.Stdout, rep); err != nil {
				return err
			}
		} else {
			would := ""
			if dry {
				would = "would be "
			}
			fmt.Printf("%d packs read; the new index %snames %d chunks and replaces %d index objects\n", rep.Packs, would, rep.Chunks, len(rep.IndexesReplaced))
			for _, p := range rep.DamagedPacks {
				fmt.Printf("damaged pack %s: what still reads %srewritten, the pack %sdeleted\n", p, would, would)
			}
			if rep.LostChunks > 0 {
				fmt.Printf("%d chunks the index named read from no pack\n", rep.LostChunks)
			}
			for _, id := range rep.RemovedRecords {
				fmt.Printf("damaged record of image %s %sremoved\n", id, would)
			}
			for _, id := range rep.BrokenImages {
				fmt.Printf("broken image %s: it needs chunks no pack holds\n", id)
			}
		}
		if len(rep.BrokenImages) > 0 {
			return fmt.Errorf("%d images stay broken (%s): restore the others; a backup of the same data stores the lost chunks again and mends them, "+
				"else delete them with `umbra images delete` and take a full backup (`umbra backup --full`) of their volumes", len(rep.BrokenImages), strings.Join(rep.BrokenImages, " "))
		}
		return nil
	})
	cmd.Flags().BoolVar(&dry, "dry-run", false, "only say what repair would do")
	return cmd
}
