package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"umbra/api/umbrav1"
)

func init() { verbs = append(verbs, newSnapshotCmd) }

func newSnapshotCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "snapshot", Short: "Create, list, delete and revert shadow copies"}
	cmd.AddCommand(newSnapshotCreateCmd(), newSnapshotListCmd(), newSnapshotDeleteCmd(), newSnapshotRevertCmd(),
		newSnapshotExposeCmd(), newSnapshotUnexposeCmd())
	return cmd
}

func newSnapshotCreateCmd() *cobra.Command {
	var persistent, writers bool
	var id string
	var hold, freeze time.Duration
	cmd := &cobra.Command{
		Use:   "create VOLUME...",
		Short: "Commit one shadow copy of each volume at one instant (a snapshot set)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				resp, err := c.CreateSnapshotSet(ctx, &umbrav1.CreateSnapshotSetRequest{
					Volumes: args, Persistent: persistent, Id: id, HoldTimeoutMs: hold.Milliseconds(),
					Writers: writers, FreezeTimeoutMs: freeze.Milliseconds(),
				})
				if err != nil {
					return err
				}
				if gflags.json {
					return printJSON(os.Stdout, resp)
				}
				fmt.Printf("snapshot set %s committed (writes held %v", resp.SetId, time.Duration(resp.HoldMicros)*time.Microsecond)
				if writers {
					fmt.Printf(", writers %v frozen %v", resp.Writers, time.Duration(resp.FreezeMicros)*time.Microsecond)
				}
				fmt.Println(")")
				printSnapshots(resp.Snapshots)
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&persistent, "persistent", false, "survive restarts and unclean stops (costs an fsync per preserved chunk)")
	cmd.Flags().StringVar(&id, "id", "", "snapshot id in every volume (default snap-N)")
	cmd.Flags().DurationVar(&hold, "hold-timeout", 10*time.Second, "longest time writes may be held for the commit")
	cmd.Flags().BoolVar(&writers, "writers", false, "application-consistent: freeze the writers whose data is on the volumes (fsfreeze, SQLite, hooks)")
	cmd.Flags().DurationVar(&freeze, "freeze-timeout", 60*time.Second, "longest time writers may stay frozen")
	return cmd
}

func printSnapshots(list []*umbrav1.Snapshot) {
	w := table()
	fmt.Fprintln(w, "VOLUME\tID\tCREATED\tKIND\tSTATE\tDIFF\tEXPORT\tIN USE BY")
	for _, s := range list {
		kind := "auto-release"
		if s.Persistent {
			kind = "persistent"
		}
		state, export := "valid", s.Export
		switch {
		case s.State == "backup-base":
			state = "backup-base (not readable)"
		case !s.Valid:
			state = "INVALID: " + s.Reason
		}
		if export == "" {
			export = "-"
		}
		users := "-"
		if len(s.Users) > 0 {
			users = strings.Join(s.Users, ", ")
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Volume, s.Id, s.Created.AsTime().Local().Format(time.DateTime), kind, state, human(s.DiffBytes), export, users)
	}
	w.Flush()
}

func newSnapshotListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list [VOLUME]",
		Short: "List shadow copies (of one volume or all)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vol := ""
			if len(args) == 1 {
				vol = args[0]
			}
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.ListSnapshotsResponse, error) {
				return c.ListSnapshots(ctx, &umbrav1.ListSnapshotsRequest{Volume: vol})
			}, func(resp *umbrav1.ListSnapshotsResponse) error {
				printSnapshots(resp.Snapshots)
				return nil
			})
		},
	}
}

func newSnapshotDeleteCmd() *cobra.Command {
	var oldest, all, force bool
	var set string
	cmd := &cobra.Command{
		Use: "delete VOLUME [ID] [--oldest|--all] | delete --set SET",
		Long: "Delete shadow copies. A shadow copy in use (exposed, read through a loop device over its FUSE file, " +
			"or by an NBD client) is refused, naming its users, and nothing is deleted; --force deletes anyway and says what it cut off.",
		Short: "Delete a shadow copy, the oldest, or all of a volume; or every shadow copy of a set",
		Args:  cobra.RangeArgs(0, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &umbrav1.DeleteSnapshotsRequest{Oldest: oldest, All: all, SetId: set, Force: force}
			if len(args) == 0 && set == "" {
				return usageError{fmt.Errorf("name a VOLUME, or give --set")}
			}
			if len(args) > 0 {
				req.Volume = args[0]
			}
			if len(args) == 2 {
				req.Id = args[1]
			}
			n := 0
			for _, b := range []bool{req.Id != "", oldest, all, set != ""} {
				if b {
					n++
				}
			}
			if n != 1 {
				return usageError{fmt.Errorf("give exactly one of ID, --oldest, --all or --set")}
			}
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.DeleteSnapshotsResponse, error) {
				return c.DeleteSnapshots(ctx, req)
			}, func(resp *umbrav1.DeleteSnapshotsResponse) error {
				for _, sn := range resp.Snapshots {
					fmt.Printf("deleted %s\n", sn)
				}
				for _, c := range resp.CutOff {
					fmt.Printf("cut off %s\n", c)
				}
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&oldest, "oldest", false, "delete the oldest shadow copy")
	cmd.Flags().BoolVar(&all, "all", false, "delete every shadow copy of the volume")
	cmd.Flags().StringVar(&set, "set", "", "delete every shadow copy of this snapshot set (vssadmin delete shadows /shadow=SET)")
	cmd.Flags().BoolVar(&force, "force", false, "delete even shadow copies in use: unexpose them, and their readers' reads fail from then on")
	return cmd
}

func newSnapshotRevertCmd() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "revert VOLUME ID",
		Short: "Roll a volume back to a shadow copy (later ones are deleted); unmount it first",
		Long: "Roll a volume back to a shadow copy; later shadow copies are deleted. It is refused while the\n" +
			"volume is in use (an NBD client connected, its FUSE file open, e.g. by a loop device): unmount the\n" +
			"filesystem, detach the loop device (umount, losetup -d) and disconnect clients first, or --force.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				if _, err := c.RevertSnapshot(ctx, &umbrav1.RevertSnapshotRequest{Volume: args[0], Id: args[1], Force: force}); err != nil {
					return err
				}
				if gflags.json {
					return printJSON(os.Stdout, map[string]string{"volume": args[0], "reverted_to": args[1]})
				}
				fmt.Printf("%s reverted to %s\n", args[0], args[1])
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "revert even while clients use the volume (what they have cached goes stale)")
	return cmd
}
