package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"umbra/api/umbrav1"
)

func init() { verbs = append(verbs, newSetCmd, newSharesCmd) }

// printSet prints a shadow copy set.
func printSet(st *umbrav1.ShadowCopySet) error {
	if gflags.json {
		return printJSON(os.Stdout, st)
	}
	fmt.Printf("set %s  context %s  state %s", st.Id, st.Context, st.State)
	if st.Deadline != nil {
		fmt.Printf("  (aborted unless it moves on by %s)", st.Deadline.AsTime().Local().Format(time.TimeOnly))
	}
	fmt.Println()
	if st.Error != "" {
		fmt.Printf("  error: %s\n", st.Error)
	}
	w := table()
	for _, sc := range st.ShadowCopies {
		where := ""
		if m := sc.Mapping; m != nil {
			where = "nbd:" + m.NbdExport
			if m.MountDir != "" {
				where += "  dir:" + m.MountDir
			}
			if m.Path != "" {
				where += "  path:" + m.Path
			}
		}
		fmt.Fprintf(w, "  %s\t%s\t%s\t%s\t%s\n", sc.Id, sc.Path, sc.Volume, sc.Snapshot, where)
	}
	return w.Flush()
}

// setStep is a set verb that takes the set ID and returns the set.
func setStep(use, short string, fn func(ctx context.Context, c umbrav1.UmbraClient, req *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error), flags func(*cobra.Command, *umbrav1.SetRequest)) *cobra.Command {
	req := &umbrav1.SetRequest{}
	cmd := &cobra.Command{
		Use:   use + " SET",
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.SetId = args[0]
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				st, err := fn(ctx, c, req)
				if err != nil {
					return err
				}
				return printSet(st)
			})
		},
	}
	if flags != nil {
		flags(cmd, req)
	}
	return cmd
}

// newSetCmd drives shadow copy sets step by step, as an FSRVP client
// does (MS-FSRVP 3.1.4): start, add, prepare, commit, expose,
// recovery-complete — or abort.
func newSetCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "set", Short: "Shadow copy sets step by step, as FSRVP runs them (start, add, prepare, commit, expose, recovery-complete, abort)"}
	var sctx string
	var timeout time.Duration
	start := &cobra.Command{
		Use:   "start",
		Short: "Start a shadow copy set",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				st, err := c.StartShadowCopySet(ctx, &umbrav1.StartShadowCopySetRequest{Context: sctx, TimeoutMs: uint32(timeout.Milliseconds())})
				if err != nil {
					return err
				}
				return printSet(st)
			})
		},
	}
	start.Flags().StringVar(&sctx, "context", "", "backup or file_share_backup (auto-release), nas_rollback or app_rollback (persistent); default: the one `set context` set, else backup")
	start.Flags().DurationVar(&timeout, "timeout", 0, "abort the set if a step does not follow within this time (default: the service's, 180s)")
	add := &cobra.Command{
		Use:   "add SET PATH",
		Short: "Add the volume holding PATH (a share path, or a volume name) to the set",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.AddToShadowCopySetResponse, error) {
				return c.AddToShadowCopySet(ctx, &umbrav1.AddToShadowCopySetRequest{SetId: args[0], Path: args[1]})
			}, func(r *umbrav1.AddToShadowCopySetResponse) error {
				fmt.Printf("shadow copy %s of volume %s added to %s\n", r.ShadowCopyId, r.Volume, args[0])
				return nil
			})
		},
	}
	list := &cobra.Command{
		Use:   "list",
		Short: "List the shadow copy sets and their states",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.ListShadowCopySetsResponse, error) {
				return c.ListShadowCopySets(ctx, &umbrav1.ListShadowCopySetsRequest{})
			}, func(r *umbrav1.ListShadowCopySetsResponse) error {
				for _, st := range r.Sets {
					printSet(st)
				}
				return nil
			})
		},
	}
	setContext := &cobra.Command{
		Use:   "context CONTEXT",
		Short: "Set the context of sets started without --context (backup, file_share_backup, nas_rollback, app_rollback)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				if _, err := c.SetContext(ctx, &umbrav1.SetContextRequest{Context: args[0]}); err != nil {
					return err
				}
				return done(map[string]string{"context": args[0]}, "sets started without --context now use "+args[0])
			})
		},
	}
	supported := &cobra.Command{
		Use:   "path-supported PATH",
		Short: "Say whether PATH is on a volume that can be shadow-copied, and which (exit 3 if not)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				r, err := c.IsPathSupported(ctx, &umbrav1.PathRequest{Path: args[0]})
				if err != nil {
					return err
				}
				if gflags.json {
					printJSON(os.Stdout, r)
				} else if r.Supported {
					fmt.Printf("%s is on volume %s (%s)\n", args[0], r.Volume, r.Provider)
				}
				if !r.Supported {
					return notFoundError{fmt.Errorf("%s", r.WhyNot)}
				}
				return nil
			})
		},
	}
	version := &cobra.Command{
		Use:   "version",
		Short: "The FSRVP protocol versions the service supports",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.GetSupportedVersionResponse, error) {
				return c.GetSupportedVersion(ctx, &umbrav1.GetSupportedVersionRequest{})
			}, func(r *umbrav1.GetSupportedVersionResponse) error {
				fmt.Printf("FSRVP versions %d to %d\n", r.MinVersion, r.MaxVersion)
				return nil
			})
		},
	}
	cmd.AddCommand(start, add, list, setContext, supported, version,
		setStep("prepare", "Check that every volume of the set can be committed", func(ctx context.Context, c umbrav1.UmbraClient, r *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error) {
			return c.PrepareShadowCopySet(ctx, r)
		}, nil),
		setStep("commit", "Commit the set: writers frozen, one instant for every volume", func(ctx context.Context, c umbrav1.UmbraClient, r *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error) {
			return c.CommitShadowCopySet(ctx, r)
		}, func(cmd *cobra.Command, r *umbrav1.SetRequest) {
			cmd.Flags().BoolVar(&r.NoWriters, "no-writers", false, "do not freeze the writers (crash-consistent)")
		}),
		setStep("expose", "Expose the set's shadow copies (NBD exports, read-only mounted directories)", func(ctx context.Context, c umbrav1.UmbraClient, r *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error) {
			return c.ExposeShadowCopySet(ctx, r)
		}, func(cmd *cobra.Command, r *umbrav1.SetRequest) {
			cmd.Flags().BoolVar(&r.NoMount, "no-mount", false, "NBD exports only")
		}),
		setStep("recovery-complete", "Mark the set done: it stays until its share mappings are deleted", func(ctx context.Context, c umbrav1.UmbraClient, r *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error) {
			return c.RecoveryCompleteShadowCopySet(ctx, r)
		}, nil),
		setStep("abort", "Abort the set: unexpose and delete what it made", func(ctx context.Context, c umbrav1.UmbraClient, r *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error) {
			return c.AbortShadowCopySet(ctx, r)
		}, nil),
	)
	return cmd
}

func printMapping(m *umbrav1.ShareMapping) error {
	if gflags.json {
		return printJSON(os.Stdout, m)
	}
	fmt.Printf("%s@%s  nbd:%s", m.Volume, m.Snapshot, m.NbdExport)
	if m.MountDir != "" {
		fmt.Printf("  dir:%s (%s)", m.MountDir, m.Fstype)
	}
	if m.Path != "" {
		fmt.Printf("  path:%s", m.Path)
	}
	if m.SetId != "" {
		fmt.Printf("  set:%s/%s share:%s", m.SetId, m.ShadowCopyId, m.SharePath)
	}
	fmt.Println()
	return nil
}

// newSharesCmd lists and removes share mappings (exposed shadow copies).
func newSharesCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "shares", Short: "Share mappings: which shadow copy is exposed where"}
	list := &cobra.Command{
		Use:   "list",
		Short: "List exposed shadow copies",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.ListShareMappingsResponse, error) {
				return c.ListShareMappings(ctx, &umbrav1.ListShareMappingsRequest{})
			}, func(r *umbrav1.ListShareMappingsResponse) error {
				for _, m := range r.Mappings {
					printMapping(m)
				}
				return nil
			})
		},
	}
	get := &cobra.Command{
		Use:   "get SET SHADOW-COPY",
		Short: "Where a shadow copy of a set is exposed",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				m, err := c.GetShareMapping(ctx, &umbrav1.ShareMappingRequest{SetId: args[0], ShadowCopyId: args[1]})
				if err != nil {
					return err
				}
				return printMapping(m)
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete SET SHADOW-COPY",
		Short: "Unexpose a shadow copy of a set and delete it",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				if _, err := c.DeleteShareMapping(ctx, &umbrav1.ShareMappingRequest{SetId: args[0], ShadowCopyId: args[1]}); err != nil {
					return err
				}
				return done(map[string]string{"set_id": args[0], "shadow_copy_id": args[1], "deleted": "true"}, "unexposed and deleted "+args[1]+" of set "+args[0])
			})
		},
	}
	cmd.AddCommand(list, get, del)
	return cmd
}

func newSnapshotExposeCmd() *cobra.Command {
	var dir string
	var noMount bool
	cmd := &cobra.Command{
		Use:   "expose VOLUME ID",
		Short: "Expose a shadow copy read-only: its filesystem mounted (and always its NBD export VOLUME@ID)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				m, err := c.ExposeSnapshot(ctx, &umbrav1.ExposeSnapshotRequest{Volume: args[0], Id: args[1], Dir: dir, NoMount: noMount})
				if err != nil {
					return err
				}
				return printMapping(m)
			})
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "mount point, an absolute path (default STATE/exposed/VOLUME@ID)")
	cmd.Flags().BoolVar(&noMount, "no-mount", false, "record the NBD export only")
	return cmd
}

func newSnapshotUnexposeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "unexpose VOLUME ID",
		Short: "Unmount and forget an exposure (the shadow copy stays)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				if _, err := c.UnexposeSnapshot(ctx, &umbrav1.UnexposeSnapshotRequest{Volume: args[0], Id: args[1]}); err != nil {
					return err
				}
				return done(map[string]string{"volume": args[0], "id": args[1], "unexposed": "true"}, "unexposed "+args[0]+"@"+args[1])
			})
		},
	}
}

// done reports a verb's result: v as JSON with --json, else text.
func done(v any, text string) error {
	if gflags.json {
		return printJSON(os.Stdout, v)
	}
	fmt.Println(text)
	return nil
}
