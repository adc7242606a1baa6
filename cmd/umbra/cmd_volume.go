package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"umbra/api/umbrav1"
)

func init() { verbs = append(verbs, newVolumeCmd, newStorageCmd) }

func newVolumeCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "volume", Short: "Volumes the service protects"}
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List volumes, whether they can be shadow-copied, and why not",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.ListVolumesResponse, error) {
				return c.ListVolumes(ctx, &umbrav1.ListVolumesRequest{})
			}, func(resp *umbrav1.ListVolumesResponse) error {
				w := table()
				fmt.Fprintln(w, "NAME\tSIZE\tCHUNK\tPROVIDER\tSNAPSHOTS\tIN USE BY\tSHADOW STORAGE\tLIVE RESTORE\tORIGIN")
				for _, v := range resp.Volumes {
					st := "none: " + v.WhyNot
					switch {
					case v.CanShadowCopy && v.Storage == nil:
						st = "kept by the " + v.Provider + " provider"
					case v.CanShadowCopy:
						st = fmt.Sprintf("%s used of %s in %s", human(v.Storage.UsedBytes), maxStr(v.Storage.MaxBytes), v.Storage.Dir)
					}
					users := strings.Join(v.Users, ", ")
					if users == "" {
						users = "-"
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", v.Name, human(v.Size), human(v.ChunkSize), v.Provider, v.Snapshots, users, st, liveStr(v.LiveRestore), v.Origin)
				}
				return w.Flush()
			})
		},
	})
	return cmd
}

func maxStr(n int64) string {
	if n == 0 {
		return "unlimited"
	}
	return human(n)
}

func newStorageCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "storage", Short: "Shadow storage associations (vssadmin add/resize/list shadowstorage)"}
	cmd.AddCommand(&cobra.Command{
		Use:   "list [VOLUME]",
		Short: "Show where each volume keeps its shadow copies, the limit, what is used and what is allocated",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vol := ""
			if len(args) == 1 {
				vol = args[0]
			}
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.GetStorageResponse, error) {
				return c.GetStorage(ctx, &umbrav1.GetStorageRequest{Volume: vol})
			}, func(resp *umbrav1.GetStorageResponse) error {
				w := table()
				fmt.Fprintln(w, "VOLUME\tDIR\tUSED\tALLOCATED\tMAX\tPOLICY")
				for _, s := range resp.Storage {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Volume, s.Dir, human(s.UsedBytes), human(s.AllocatedBytes), maxStr(s.MaxBytes), s.Policy)
				}
				return w.Flush()
			})
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "delete VOLUME",
		Short: "Remove a volume's shadow storage association and every shadow copy of the volume (vssadmin delete shadowstorage)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.DeleteStorageResponse, error) {
				return c.DeleteStorage(ctx, &umbrav1.DeleteStorageRequest{Volume: args[0]})
			}, func(resp *umbrav1.DeleteStorageResponse) error {
				fmt.Printf("%s: shadow storage association deleted, %d shadow copies with it\n", args[0], len(resp.Deleted))
				return nil
			})
		},
	})
	for _, verb := range []string{"add", "resize"} {
		var dir, maxSize, policy string
		c := &cobra.Command{
			Use:   verb + " VOLUME",
			Short: map[string]string{"add": "Set a volume's shadow storage directory, limit and policy", "resize": "Change the limit (shrinking below what is used applies the policy now)"}[verb],
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				max, err := parseSizeFlag("--max", maxSize, cmd.Flags().Changed("max"))
				if err != nil {
					return err
				}
				return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.SetStorageResponse, error) {
					return c.SetStorage(ctx, &umbrav1.SetStorageRequest{Volume: args[0], Dir: dir, MaxBytes: max, Policy: policy})
				}, func(resp *umbrav1.SetStorageResponse) error {
					s := resp.Storage
					fmt.Printf("%s: shadow storage %s, %s used (%s allocated) of %s, policy %s\n", s.Volume, s.Dir, human(s.UsedBytes), human(s.AllocatedBytes), maxStr(s.MaxBytes), s.Policy)
					if len(resp.Deleted) > 0 {
						fmt.Printf("deleted to fit: %s\n", strings.Join(resp.Deleted, ", "))
					}
					if len(resp.Invalidated) > 0 {
						fmt.Printf("invalidated to fit: %s\n", strings.Join(resp.Invalidated, ", "))
					}
					return nil
				})
			},
		}
		if verb == "add" {
			c.Flags().StringVar(&dir, "dir", "", "directory for the shadow storage")
		}
		c.Flags().StringVar(&maxSize, "max", "", "maximum size, e.g. 10G (default unlimited)")
		c.Flags().StringVar(&policy, "policy", "", "when full: delete-oldest or invalidate")
		cmd.AddCommand(c)
	}
	return cmd
}
