package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"umbra/api/umbrav1"
)

func init() { verbs = append(verbs, newEventsCmd) }

// newEventsCmd follows the service's events until interrupted.
func newEventsCmd() *cobra.Command {
	var kinds []string
	cmd := &cobra.Command{
		Use:   "events",
		Short: "Follow what the service does: snapshots, set states, exposures, storage, writer failures, backup progress (Ctrl-C stops)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			err := callCtx(ctx, func(ctx context.Context, c umbrav1.UmbraClient) error {
				stream, err := c.Events(ctx, &umbrav1.EventsRequest{Kinds: kinds})
				if err != nil {
					return err
				}
				for {
					ev, err := stream.Recv()
					if err == io.EOF || ctx.Err() != nil {
						return nil
					}
					if err != nil {
						return err
					}
					if gflags.json {
						printJSONLine(os.Stdout, ev)
						continue
					}
					fmt.Printf("%s %-17s", ev.Time.AsTime().Local().Format(time.TimeOnly), ev.Kind)
					for _, f := range []struct{ k, v string }{{"job", ev.Job}, {"volume", ev.Volume}, {"snapshot", ev.Snapshot}, {"set", ev.SetId}, {"state", ev.State}} {
						if f.v != "" {
							fmt.Printf(" %s=%s", f.k, f.v)
						}
					}
					if ev.Total > 0 {
						fmt.Printf(" %s/%s", human(ev.Done), human(ev.Total))
					}
					if ev.Message != "" {
						fmt.Printf(" %s", ev.Message)
					}
					if ev.Dropped > 0 {
						fmt.Printf(" (%d events missed)", ev.Dropped)
					}
					fmt.Println()
				}
			})
			if ctx.Err() != nil {
				return nil
			}
			return err
		},
	}
	cmd.Flags().StringSliceVar(&kinds, "kind", nil, "only these kinds (snapshot_created, snapshot_deleted, snapshot_reverted, set_state, exposed, unexposed, storage_changed, writer_failed, backup_progress, backup_done, job_started, job_succeeded, job_failed, job_missed, job_interrupted, live_restore_started, live_restore_waiting, live_restore_resumed, live_restore_done)")
	return cmd
}
