// Command writer is an example Umbra writer: it registers a directory as
// its component and, at freeze, writes and fsyncs a marker file there so
// the snapshot shows the application's state at the freeze; it prints
// every phase.
//
//	go run ./examples/writer --socket /run/umbra/writers.sock --dir /mnt/data
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"umbra/writer"
	"umbra/writer/sdk"
)

func main() {
	socket := flag.String("socket", "/run/umbra/writers.sock", "the service's writer socket")
	dir := flag.String("dir", ".", "directory this application keeps its data in")
	name := flag.String("name", "example-writer", "writer name")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	abs, _ := filepath.Abs(*dir)
	say := func(phase string) sdk.Phase {
		return func(ctx context.Context, s writer.Set) error {
			fmt.Printf("%s %s %s\n", time.Now().Format(time.TimeOnly), phase, s.ID)
			return nil
		}
	}
	err := sdk.Run(ctx, *socket, sdk.Writer{
		Name:       *name,
		Components: []string{abs},
		Freeze: func(ctx context.Context, s writer.Set) error {
			fmt.Printf("%s freeze %s\n", time.Now().Format(time.TimeOnly), s.ID)
			f, err := os.Create(filepath.Join(abs, "frozen-at"))
			if err != nil {
				return err
			}
			defer f.Close()
			fmt.Fprintln(f, s.ID)
			return f.Sync()
		},
		Thaw:         say("thaw"),
		PostSnapshot: say("post-snapshot"),
		Abort:        say("abort"),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "writer:", err)
		os.Exit(1)
	}
}
