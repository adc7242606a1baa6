package api_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
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

type token string

func (tk token) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(tk)}, nil
}
func (token) RequireTransportSecurity() bool { return true }

// TestTCPAuth: the API on TCP serves nobody unauthenticated, enforces
// roles for tokens and client certificates, fails closed, and audits.
func TestTCPAuth(t *testing.T) {
	dir := t.TempDir()
	srv, _ := newAuditedServer(t, dir)

	tokens := filepath.Join(dir, "tokens")
	os.WriteFile(tokens, []byte("# test identities\ntoken viewer-token-0123456789 viewer alice\ntoken operator-token-012345678 operator bob\n"+
		"token admin-token-0123456789ab admin carol\ncert backup-host viewer\n"), 0o644)
	if _, err := api.LoadIdentities(tokens); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("a world-readable tokens file was accepted: %v", err)
	}
	os.Chmod(tokens, 0o600)
	ids, err := api.LoadIdentities(tokens)
	if err != nil {
		t.Fatal(err)
	}
	ca := testutil.NewPKI(t)
	cfg := &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "umbra-server", true)}, ClientCAs: ca.Pool,
		ClientAuth: tls.VerifyClientCertIfGiven, MinVersion: tls.VersionTLS12}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.ServeTCP(ctx, l, cfg, ids)

	dial := func(tok string, cert *tls.Certificate) umbrav1.UmbraClient {
		tc := &tls.Config{RootCAs: ca.Pool, MinVersion: tls.VersionTLS12}
		if cert != nil {
			tc.Certificates = []tls.Certificate{*cert}
		}
		opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tc))}
		if tok != "" {
			opts = append(opts, grpc.WithPerRPCCredentials(token(tok)))
		}
		conn, err := grpc.NewClient(l.Addr().String(), opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return umbrav1.NewUmbraClient(conn)
	}
	code := func(err error) codes.Code { return status.Code(err) }
	create := func(c umbrav1.UmbraClient, id string) error {
		_, err := c.CreateSnapshotSet(ctx, &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"v"}, Id: id})
		return err
	}
	del := func(c umbrav1.UmbraClient, id string) error {
		_, err := c.DeleteSnapshots(ctx, &umbrav1.DeleteSnapshotsRequest{Volume: "v", Id: id})
		return err
	}
	list := func(c umbrav1.UmbraClient) error {
		_, err := c.ListVolumes(ctx, &umbrav1.ListVolumesRequest{})
		return err
	}

	if err := list(dial("", nil)); code(err) != codes.Unauthenticated {
		t.Fatalf("no token: %v", err)
	}
	if err := list(dial("not-a-known-token-at-all", nil)); code(err) != codes.Unauthenticated {
		t.Fatalf("unknown token: %v", err)
	}
	plain, _ := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer plain.Close()
	if _, err := umbrav1.NewUmbraClient(plain).ListVolumes(ctx, &umbrav1.ListVolumesRequest{}); err == nil {
		t.Fatal("a plain-text client was served")
	}
	viewer, operator, admin := dial("viewer-token-0123456789", nil), dial("operator-token-012345678", nil), dial("admin-token-0123456789ab", nil)
	if err := list(viewer); err != nil {
		t.Fatalf("viewer list: %v", err)
	}
	if err := create(viewer, "s1"); code(err) != codes.PermissionDenied {
		t.Fatalf("viewer create: %v", err)
	}
	if err := create(operator, "s1"); err != nil {
		t.Fatalf("operator create: %v", err)
	}
	if err := del(operator, "s1"); code(err) != codes.PermissionDenied {
		t.Fatalf("operator delete: %v", err)
	}
	if err := del(admin, "s1"); err != nil {
		t.Fatalf("admin delete: %v", err)
	}
	// A method the role table does not name needs admin (fail closed):
	// the FSRVP set calls are named; a viewer cannot start one.
	if _, err := viewer.StartShadowCopySet(ctx, &umbrav1.StartShadowCopySetRequest{}); code(err) != codes.PermissionDenied {
		t.Fatalf("viewer start set: %v", err)
	}
	cert := ca.Issue(t, "backup-host", false)
	if err := list(dial("", &cert)); err != nil {
		t.Fatalf("client certificate with the viewer role: %v", err)
	}
	if err := create(dial("", &cert), "s2"); code(err) != codes.PermissionDenied {
		t.Fatalf("viewer certificate create: %v", err)
	}
	stranger := ca.Issue(t, "stranger", false)
	if err := list(dial("", &stranger)); code(err) != codes.PermissionDenied {
		t.Fatalf("certificate without a role: %v", err)
	}

	b, _ := os.ReadFile(filepath.Join(dir, "audit.log"))
	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("audit line %q: %v", l, err)
		}
		lines = append(lines, m)
	}
	want := []struct{ who, method, result string }{
		{"alice", "CreateSnapshotSet", "PermissionDenied"},
		{"bob", "CreateSnapshotSet", "OK"},
		{"bob", "DeleteSnapshots", "PermissionDenied"},
		{"carol", "DeleteSnapshots", "OK"},
	}
	for _, w := range want {
		found := false
		for _, l := range lines {
			if l["who"] == w.who && strings.HasSuffix(l["method"].(string), "/"+w.method) && l["result"] == w.result {
				found = true
			}
		}
		if !found {
			t.Errorf("no audit line for %+v in\n%s", w, b)
		}
	}
	for _, l := range lines {
		if strings.HasSuffix(l["method"].(string), "/ListVolumes") && l["result"] == "OK" {
			t.Errorf("a read-only call that was served was audited: %v", l)
		}
		if l["who"] == "" {
			t.Errorf("an audit line without who: %v", l)
		}
	}
	refused := 0
	for _, l := range lines {
		if l["who"] == "anonymous" || l["who"] == "cert:stranger" || l["who"] == "unknown-token" {
			refused++
		}
	}
	if refused < 3 {
		t.Errorf("refused calls are not all audited:\n%s", b)
	}
}
