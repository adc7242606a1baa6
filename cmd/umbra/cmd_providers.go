package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"umbra/api/umbrav1"
)

func init() { verbs = append(verbs, newProvidersCmd) }

func newProvidersCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "providers", Short: "Snapshot providers (vssadmin list providers)"}
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List the providers and what each supports",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.ListProvidersResponse, error) {
				return c.ListProviders(ctx, &umbrav1.ListProvidersRequest{})
			}, func(resp *umbrav1.ListProvidersResponse) error {
				yes := func(b bool) string {
					if b {
						return "yes"
					}
					return "no"
				}
				w := table()
				fmt.Fprintln(w, "PROVIDER\tKIND\tCOMMIT\tREVERT\tTRACKING\tLIMIT\tBLOCK IMAGE\tNOTES")
				for _, p := range resp.Providers {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, p.Kind, p.CommitCost, yes(p.Revert), yes(p.Tracking), yes(p.StorageLimit), yes(p.BlockImage), p.Notes)
				}
				return w.Flush()
			})
		},
	})
	return cmd
}
