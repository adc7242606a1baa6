package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

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
	// cobra adds help and completion when the command runs; made now,
	// they are checked as the others are.
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	for _, c := range root.Commands() {
		if c.Name() == "help" {
			c.Args = func(cmd *cobra.Command, args []string) error {
				if found, rest, err := cmd.Root().Find(args); err != nil || found == nil || len(rest) > 0 {
					return usageError{fmt.Errorf("no help for %q: not a command (umbra --help lists them)", strings.Join(args, " "))}
				}
				return nil
			}
		}
	}
	strictArgs(root)
	return root
}

// strictArgs makes every bad use of c and the commands below it a usage
// error (exit code 2, one JSON object under --json): arguments a command
// does not take, and a command a group does not have — which cobra
// would answer with the group's help and exit code 0. A group named
// alone still prints its help, except under --json, where it is an error
// that names its commands.
func strictArgs(c *cobra.Command) {
	for _, sub := range c.Commands() {
		strictArgs(sub)
	}
	if c.HasSubCommands() && !c.Runnable() {
		c.Args = func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return nil
			}
			return usageError{fmt.Errorf("unknown command %q for %q; its commands: %s", args[0], cmd.CommandPath(), subNames(cmd))}
		}
		c.RunE = func(cmd *cobra.Command, args []string) error {
			if gflags.json {
				return usageError{fmt.Errorf("%s needs a command: %s (%s --help says what each does)", cmd.CommandPath(), subNames(cmd), cmd.CommandPath())}
			}
			return cmd.Help()
		}
		return
	}
	if check := c.Args; check != nil {
		c.Args = func(cmd *cobra.Command, args []string) error {
			err := check(cmd, args)
			if ue := (usageError{}); err == nil || errors.As(err, &ue) {
				return err
			}
			if path := cmd.CommandPath(); !strings.Contains(err.Error(), path) {
				err = fmt.Errorf("%s: %w", path, err)
			}
			return usageError{fmt.Errorf("%w (%s --help)", err, cmd.CommandPath())}
		}
	}
}

// subNames lists the commands of group c that are shown in its help.
func subNames(c *cobra.Command) string {
	var names []string
	for _, sub := range c.Commands() {
		if sub.IsAvailableCommand() {
			names = append(names, sub.Name())
		}
	}
	return strings.Join(names, ", ")
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
