package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"umbra/api/umbrav1"
)

func init() { verbs = append(verbs, newWritersCmd) }

func newWritersCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "writers", Short: "Writers: applications quiesced around snapshots"}
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List writers and their state (vssadmin list writers)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) (*umbrav1.ListWritersResponse, error) {
				return c.ListWriters(ctx, &umbrav1.ListWritersRequest{})
			}, func(resp *umbrav1.ListWritersResponse) error {
				w := table()
				fmt.Fprintln(w, "WRITER\tSTATE\tLAST PHASE\tUPDATED\tLAST ERROR")
				for _, wr := range resp.Writers {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", wr.Name, wr.State, wr.LastPhase, wr.Updated.AsTime().Local().Format(time.DateTime), wr.LastError)
				}
				return w.Flush()
			})
		},
	})
	return cmd
}
