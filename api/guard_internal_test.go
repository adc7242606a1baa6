package api

import (
	"context"
	"log/slog"
	"net"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// TestPanicIsAnError: a handler that panics, unary or streaming, gives
// its caller an Internal error, and the service goes on serving (it
// carries the volumes' writes; a bug in one call must not stop them).
func TestPanicIsAnError(t *testing.T) {
	s := &Server{log: slog.New(slog.DiscardHandler)}
	g := grpc.NewServer(s.interceptors(nil)...)
	calls := 0
	g.RegisterService(&grpc.ServiceDesc{
		ServiceName: "test.Panics",
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: "Boom", Handler: func(_ any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			in := new(emptypb.Empty)
			if err := dec(in); err != nil {
				return nil, err
			}
			return ic(ctx, in, &grpc.UnaryServerInfo{FullMethod: "/test.Panics/Boom"}, func(context.Context, any) (any, error) {
				calls++
				if calls == 1 {
					panic("boom")
				}
				return &emptypb.Empty{}, nil
			})
		}}},
		Streams: []grpc.StreamDesc{{StreamName: "Stream", ServerStreams: true, Handler: func(any, grpc.ServerStream) error {
			var m map[string]int
			m["x"]++ // a nil-map write: a runtime panic, not a panic call
			return nil
		}}},
	}, struct{}{})
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(peerCheck{l, nil})
	defer g.Stop()
	cc, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx := context.Background()
	err = cc.Invoke(ctx, "/test.Panics/Boom", &emptypb.Empty{}, &emptypb.Empty{})
	if status.Code(err) != codes.Internal {
		t.Fatalf("a panicking call: %v, want Internal", err)
	}
	st, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/test.Panics/Stream")
	if err != nil {
		t.Fatal(err)
	}
	st.SendMsg(&emptypb.Empty{})
	st.CloseSend()
	if err := st.RecvMsg(&emptypb.Empty{}); status.Code(err) != codes.Internal {
		t.Fatalf("a panicking stream: %v, want Internal", err)
	}
	if err := cc.Invoke(ctx, "/test.Panics/Boom", &emptypb.Empty{}, &emptypb.Empty{}); err != nil {
		t.Fatalf("the next call after a panic: %v", err)
	}
}
