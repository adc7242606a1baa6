package main

import (
	"encoding/json"
	"fmt"
	"io"

	"google.golang.org/protobuf/proto"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

// globalFlags are shared by every verb.
type globalFlags struct {
	json      bool
	apiSocket string
	api       string // TCP HOST:PORT of a remote service
	token     string
	ca        string
	cert, key string
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
	root.PersistentFlags().StringVar(&gflags.apiSocket, "api-socket", "", "the service's API socket (default /run/umbra/umbra.sock as root, else $XDG_RUNTIME_DIR/umbra/umbra.sock)")
	root.PersistentFlags().StringVar(&gflags.api, "api", "", "a remote service's API, HOST:PORT over TLS (instead of the unix socket)")
	root.PersistentFlags().StringVar(&gflags.token, "token", "", "bearer token for --api (default $UMBRA_TOKEN)")
	root.PersistentFlags().StringVar(&gflags.ca, "ca", "", "CA certificate that signs the --api server's certificate (default: the system's)")
	root.PersistentFlags().StringVar(&gflags.cert, "cert", "", "client certificate for --api (with --key)")
	root.PersistentFlags().StringVar(&gflags.key, "key", "", "client key for --api")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	for _, add := range verbs {
		root.AddCommand(add())
	}
	return root
}

// verbs is filled by each cmd_*.go file's init.
var verbs []func() *cobra.Command

// printJSON writes v as indented JSON (API messages with their proto
// field names and RFC 3339 times).
func printJSON(w io.Writer, v any) error {
	if m, ok := v.(proto.Message); ok {
		b, err := protoJSON(m, "  ", true)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// printJSONLine writes one API message as compact JSON on one line.
func printJSONLine(w io.Writer, m proto.Message) error {
	b, err := protoJSON(m, "", false)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}
