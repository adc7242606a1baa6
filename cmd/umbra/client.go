package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"umbra/api/umbrav1"
)

// apiSocketPath is --api-socket or the default beside the NBD socket.
func apiSocketPath() string {
	if gflags.apiSocket != "" {
		return gflags.apiSocket
	}
	return filepath.Join(defaultRuntimeDir(), "umbra.sock")
}

// errUnreachable marks a service that does not answer (exit code 4).
var errUnreachable = errors.New("the Umbra service is not reachable")

// client dials the service's API.
func client(ctx context.Context) (umbrav1.UmbraClient, func(), error) {
	path := apiSocketPath()
	if _, err := os.Stat(path); err != nil {
		return nil, nil, fmt.Errorf("%w at %s: start it with `umbra serve` or give --api-socket (%v)", errUnreachable, path, err)
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, fmt.Errorf("%w at %s: %v", errUnreachable, path, err)
	}
	return umbrav1.NewUmbraClient(conn), func() { conn.Close() }, nil
}

// call runs fn against the API with a timeout and turns gRPC errors into
// errors with exit codes.
func call(parent context.Context, fn func(ctx context.Context, c umbrav1.UmbraClient) error) error {
	ctx, cancel := context.WithTimeout(parent, 5*time.Minute)
	defer cancel()
	return callCtx(ctx, fn)
}

// callCtx is call without the timeout, for work as long as a backup.
func callCtx(ctx context.Context, fn func(ctx context.Context, c umbrav1.UmbraClient) error) error {
	c, done, err := client(ctx)
	if err != nil {
		return err
	}
	defer done()
	err = fn(ctx, c)
	if st, ok := status.FromError(err); ok && err != nil {
		switch st.Code() {
		case codes.Unavailable:
			return fmt.Errorf("%w: %s", errUnreachable, st.Message())
		case codes.NotFound:
			return notFoundError{errors.New(st.Message())}
		case codes.InvalidArgument:
			return usageError{errors.New(st.Message())}
		case codes.Canceled:
			return context.Canceled
		default:
			return errors.New(st.Message())
		}
	}
	return err
}

// notFoundError marks a missing volume or snapshot (exit code 3).
type notFoundError struct{ err error }

func (e notFoundError) Error() string { return e.err.Error() }
func (e notFoundError) Unwrap() error { return e.err }

func table() *tabwriter.Writer { return tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0) }

func human(n int64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return fmt.Sprintf("%dB", n)
	}
	f, i := float64(n), -1
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	return fmt.Sprintf("%.1f%ciB", f, units[i])
}
