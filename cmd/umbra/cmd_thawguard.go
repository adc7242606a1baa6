package main

import (
	"time"

	"github.com/spf13/cobra"

	"umbra/writer/fsfreeze"
)

func init() { verbs = append(verbs, newThawGuardCmd) }

// newThawGuardCmd is the guard process the fsfreeze writer starts at each
// freeze: if the service dies with filesystems frozen, the guard thaws
// them at the deadline.
func newThawGuardCmd() *cobra.Command {
	var after time.Duration
	cmd := &cobra.Command{
		Use:    "thaw-guard --after DURATION MOUNT...",
		Short:  "Thaw frozen filesystems after a deadline (started by the fsfreeze writer)",
		Hidden: true,
		Args:   cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return fsfreeze.RunGuard(after, args)
		},
	}
	cmd.Flags().DurationVar(&after, "after", fsfreeze.DefaultGuard, "how long filesystems may stay frozen")
	return cmd
}
