package main

import (
	"encoding/json"
	"io"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

// globalFlags are shared by every verb.
type globalFlags struct {
	json bool
}

var gflags globalFlags

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "umbra",
		Short:         "Volume shadow copies for Linux: snapshots, writers, image backup",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version,
	}
	root.PersistentFlags().BoolVar(&gflags.json, "json", false, "print machine-readable JSON instead of text")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	for _, add := range verbs {
		root.AddCommand(add())
	}
	return root
}

// verbs is filled by each cmd_*.go file's init.
var verbs []func() *cobra.Command

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
