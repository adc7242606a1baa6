package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

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

// client dials the service's API: the unix socket, or --api over TLS.
func client(ctx context.Context) (umbrav1.UmbraClient, func(), error) {
	if gflags.api != "" {
		return remoteClient()
	}
	if gflags.token != "" || gflags.ca != "" || gflags.cert != "" || gflags.key != "" {
		return nil, nil, usageError{errors.New("--token, --ca, --cert and --key are for a remote service: give --api HOST:PORT too (the unix socket needs none)")}
	}
	path := apiSocketPath()
	if _, err := os.Stat(path); err != nil {
		return nil, nil, fmt.Errorf("%w at %s: start it with `umbra serve` or give --api-socket (%v)", errUnreachable, path, err)
	}
	// Connecting needs write permission on the socket: without it the
	// service is there but refuses this user, which is exit 5, not 4.
	if err := unix.Access(path, unix.W_OK); errors.Is(err, unix.EACCES) {
		return nil, nil, accessError{fmt.Errorf("permission denied on the API socket %s (uid %d): it admits root and the service's own user, and the members of its group when the service was given one (umbra serve --api-socket-group); run the command as one of them (e.g. with sudo), or add this user to that group", path, os.Getuid())}
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
		case codes.Unauthenticated, codes.PermissionDenied:
			return accessError{errors.New(st.Message())}
		case codes.Canceled:
			return context.Canceled
		default:
			return errors.New(st.Message())
		}
	}
	return err
}

// accessError marks a call refused for who made it (exit code 5).
type accessError struct{ err error }

func (e accessError) Error() string { return e.err.Error() }
func (e accessError) Unwrap() error { return e.err }

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

// remoteClient dials --api over TLS with a client certificate or a
// bearer token.
func remoteClient() (umbrav1.UmbraClient, func(), error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if gflags.ca != "" {
		pem, err := os.ReadFile(gflags.ca)
		if err != nil {
			return nil, nil, usageError{fmt.Errorf("--ca: %w", err)}
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, nil, usageError{fmt.Errorf("--ca %s: no PEM certificate in it", gflags.ca)}
		}
	}
	if gflags.cert != "" {
		c, err := tls.LoadX509KeyPair(gflags.cert, gflags.key)
		if err != nil {
			return nil, nil, usageError{fmt.Errorf("--cert/--key: %w", err)}
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg))}
	token := gflags.token
	if token == "" {
		token = os.Getenv("UMBRA_TOKEN")
	}
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(token)))
	}
	conn, err := grpc.NewClient("dns:///"+gflags.api, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("%w at %s: %v", errUnreachable, gflags.api, err)
	}
	return umbrav1.NewUmbraClient(conn), func() { conn.Close() }, nil
}

// bearer sends a token with every call (TLS only).
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

// show calls one API method (rpc, through call) and prints its answer:
// as JSON with --json, else with text.
func show[R proto.Message](ctx context.Context, rpc func(ctx context.Context, c umbrav1.UmbraClient) (R, error), text func(R) error) error {
	return call(ctx, func(ctx context.Context, c umbrav1.UmbraClient) error {
		r, err := rpc(ctx, c)
		if err != nil {
			return err
		}
		if gflags.json {
			return printJSON(os.Stdout, r)
		}
		return text(r)
	})
}
