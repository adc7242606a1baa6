package api_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"umbra/api"
	"umbra/api/umbrav1"
	"umbra/internal/testutil"
)

// auditLines reads the audit log as JSON objects.
func auditLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for line := range strings.Lines(string(b)) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

// TestAuditUnixPeer: calls on the unix socket are admin and audited by
// the caller's uid (SO_PEERCRED), read-only ones not at all.
func TestAuditUnixPeer(t *testing.T) {
	dir := t.TempDir()
	srv, logPath := newAuditedServer(t, dir)
	sock := filepath.Join(dir, "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- srv.Serve(ctx, l) }()
	defer func() { cancel(); <-done }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := umbrav1.NewUmbraClient(conn)
	if _, err := c.ListVolumes(ctx, &umbrav1.ListVolumesRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateSnapshotSet(ctx, &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"v"}, Id: "u1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DeleteSnapshots(ctx, &umbrav1.DeleteSnapshotsRequest{Volume: "v", Id: "nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("delete of a missing snapshot: %v", err)
	}
	lines := auditLines(t, logPath)
	who := fmt.Sprintf("unix:uid=%d", os.Getuid())
	want := []struct{ method, result string }{{"CreateSnapshotSet", "OK"}, {"DeleteSnapshots", "NotFound"}}
	if len(lines) != len(want) {
		t.Fatalf("%d audit lines, want %d (read-only calls are not audited): %v", len(lines), len(want), lines)
	}
	for i, w := range want {
		l := lines[i]
		if l["who"] != who || l["role"] != "admin" || l["method"] != "/umbra.v1.Umbra/"+w.method || l["result"] != w.result || l["time"] == nil {
			t.Errorf("line %d = %v, want %s %s by %s", i, l, w.method, w.result, who)
		}
		if _, ok := l["addr"]; ok {
			t.Errorf("line %d: a unix caller has no address: %v", i, l)
		}
	}
	if req, _ := lines[0]["request"].(map[string]any); req["id"] != "u1" {
		t.Errorf("the request summary lacks the snapshot id: %v", lines[0])
	}
	if lines[1]["error"] == nil {
		t.Errorf("a failed call's audit line lacks the error: %v", lines[1])
	}
	if fi, _ := os.Stat(logPath); fi.Mode().Perm() != 0o600 {
		t.Errorf("audit log mode %v, want 0600", fi.Mode().Perm())
	}
}

// TestAuditStreamRequest: a mutating stream (BackupStream) is audited
// with its request, secrets left out, and the TCP caller's address.
func TestAuditStreamRequest(t *testing.T) {
	dir := t.TempDir()
	srv, logPath := newAuditedServer(t, dir)
	tokens := filepath.Join(dir, "tokens")
	os.WriteFile(tokens, []byte("op-token-0123456789abcdef operator nightly\nview-token-0123456789abcd viewer dash\n"), 0o600)
	ids, err := api.LoadIdentities(tokens)
	if err != nil {
		t.Fatal(err)
	}
	ca := testutil.NewPKI(t)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		done <- srv.ServeTCP(ctx, l, &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "umbra", true)}, MinVersion: tls.VersionTLS12}, ids)
	}()
	defer func() { cancel(); <-done }()
	dial := func(tok string) umbrav1.UmbraClient {
		conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: ca.Pool})),
			grpc.WithPerRPCCredentials(token(tok)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return umbrav1.NewUmbraClient(conn)
	}
	backup := func(c umbrav1.UmbraClient) error {
		st, err := c.BackupStream(ctx, &umbrav1.BackupRequest{Repo: filepath.Join(dir, "repo"), Password: "hunter2hunter2"})
		if err != nil {
			return err
		}
		_, err = st.Recv()
		return err
	}
	if err := backup(dial("view-token-0123456789abcd")); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("viewer backup: %v", err)
	}
	if err := backup(dial("op-token-0123456789abcdef")); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("operator backup without volumes: %v", err)
	}
	b, _ := os.ReadFile(logPath)
	if strings.Contains(string(b), "hunter2") {
		t.Fatalf("the audit log holds a password:\n%s", b)
	}
	lines := auditLines(t, logPath)
	if len(lines) != 2 {
		t.Fatalf("want 2 audit lines:\n%s", b)
	}
	if l := lines[0]; l["who"] != "dash" || l["result"] != "PermissionDenied" {
		t.Errorf("refused stream: %v", l)
	}
	l2 := lines[1]
	if l2["who"] != "nightly" || l2["role"] != "operator" || l2["method"] != "/umbra.v1.Umbra/BackupStream" || l2["result"] != "InvalidArgument" {
		t.Errorf("stream call: %v", l2)
	}
	if req, _ := l2["request"].(map[string]any); req["repo"] != filepath.Join(dir, "repo") {
		t.Errorf("the stream's request is not in its audit line: %v", l2)
	}
	if addr, _ := l2["addr"].(string); !strings.HasPrefix(addr, "127.0.0.1:") {
		t.Errorf("a TCP caller's address is not recorded: %v", l2)
	}
}
