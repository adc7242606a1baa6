package api

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"umbra/api/umbrav1"
)

func TestLoadIdentities(t *testing.T) {
	const tok1, tok2 = "tok1-0123456789abcdef", "tok2-0123456789abcdef"
	for _, c := range []struct {
		name, file, text string
		want             map[string]Role // token or "cert:CN" → role
		err              string
	}{
		{name: "lines", file: "tokens", text: "# ops\n" + tok1 + " viewer alice\n\ntoken " + tok2 + " admin carol\ncert backup-host operator\n",
			want: map[string]Role{tok1: RoleViewer, tok2: RoleAdmin, "cert:backup-host": RoleOperator}},
		{name: "toml by name", file: "tokens.toml", text: "[[token]]\ntoken = \"" + tok1 + "\"\nrole = \"operator\"\nname = \"bob\"\n[[cert]]\ncn = \"h\"\nrole = \"viewer\"\n",
			want: map[string]Role{tok1: RoleOperator, "cert:h": RoleViewer}},
		{name: "toml by content", file: "tokens", text: "# identities\n[[token]]\ntoken = \"" + tok2 + "\"\nrole = \"admin\"\nname = \"root-job\"\n",
			want: map[string]Role{tok2: RoleAdmin}},
		{name: "short token", file: "tokens", text: "short viewer alice\n", err: "line 1: a token must be at least 16"},
		{name: "bad role", file: "tokens", text: tok1 + " root alice\n", err: `line 1: role "root"`},
		{name: "token without name", file: "tokens", text: "token " + tok1 + " viewer\n", err: "line 1: want `TOKEN ROLE NAME`"},
		{name: "duplicate token", file: "tokens", text: tok1 + " viewer alice\n" + tok1 + " admin mallory\n", err: "line 2: token of mallory is already the token of alice"},
		{name: "duplicate cert", file: "tokens", text: "cert h viewer\ncert h admin\n", err: `line 2: certificate "h" is named twice`},
		{name: "toml unknown key", file: "t.toml", text: "[[token]]\ntoken = \"" + tok1 + "\"\nrole = \"viewer\"\nname = \"a\"\nrights = \"all\"\n", err: "unknown keys"},
		{name: "toml without name", file: "t.toml", text: "[[token]]\ntoken = \"" + tok1 + "\"\nrole = \"viewer\"\n", err: "token 1: a token needs a name"},
		{name: "empty", file: "tokens", text: "# nobody yet\n", err: "has no identities"},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), c.file)
			if err := os.WriteFile(path, []byte(c.text), 0o600); err != nil {
				t.Fatal(err)
			}
			ids, err := LoadIdentities(path)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) || !strings.Contains(err.Error(), path) {
					t.Fatalf("got %v, want an error naming %s and saying %q", err, path, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if n := len(ids.tokens) + len(ids.certs); n != len(c.want) {
				t.Errorf("%d identities, want %d", n, len(c.want))
			}
			for key, role := range c.want {
				got, err := ids.who(bearerCtx(key))
				if cn, ok := strings.CutPrefix(key, "cert:"); ok {
					got, err = ids.certs[cn], nil // a verified chain needs a handshake: TestTCPAuth does it
				}
				if err != nil || got.role != role {
					t.Errorf("%s: role %v (%v), want %v", key, got.role, err, role)
				}
			}
		})
	}
}

func bearerCtx(tok string) context.Context {
	ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 4242}})
	return metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "bearer "+tok))
}

func TestTokensFileMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokens")
	os.WriteFile(path, []byte("tok1-0123456789abcdef viewer alice\n"), 0o640)
	_, err := LoadIdentities(path)
	if err == nil || !strings.Contains(err.Error(), "mode 0640") || !strings.Contains(err.Error(), "chmod 600 "+path) {
		t.Fatalf("a group-readable tokens file: %v", err)
	}
}

// TestUnixModeRefusesOtherPeers: the admin role of the unix socket comes
// from peerCheck, so the same interceptors never grant it to a TCP peer.
func TestUnixModeRefusesOtherPeers(t *testing.T) {
	var unixOnly *Identities
	ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.UnixAddr{Name: "uid=0", Net: "unix"}})
	if id, err := unixOnly.who(ctx); err != nil || id.role != RoleAdmin || id.name != "unix:uid=0" {
		t.Fatalf("unix peer: %v %v", id, err)
	}
	// Any other uid is refused per call (PermissionDenied, audited), as
	// is a unix address without one.
	other := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.UnixAddr{Name: "uid=65534", Net: "unix"}})
	if id, err := unixOnly.who(other); status.Code(err) != codes.PermissionDenied || id.role != RoleNone || id.name != "unix:uid=65534" || !strings.Contains(err.Error(), "uid 65534 may not use") {
		t.Fatalf("unix peer uid 65534: %v %v", id, err)
	}
	anon := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.UnixAddr{Name: "@", Net: "unix"}})
	if id, err := unixOnly.who(anon); err == nil || id.role != RoleNone {
		t.Fatalf("unix peer without a uid: %v %v", id, err)
	}
	if _, err := unixOnly.who(bearerCtx("anything-0123456789abc")); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("TCP peer on the unix listener: %v", err)
	}
	ids := &Identities{tokens: map[[32]byte]identity{}, certs: map[string]identity{}}
	ids.addToken("tok1-0123456789abcdef", "viewer", "alice")
	if _, err := ids.who(ctx); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("a unix peer address on the TCP listener was let in: %v", err)
	}
}

// TestRoleTable pins the roles the issue names and that a method the
// table does not know needs admin.
func TestRoleTable(t *testing.T) {
	for method, want := range map[string]Role{
		"ListVolumes": RoleViewer, "ListSnapshots": RoleViewer, "GetStorage": RoleViewer, "ListWriters": RoleViewer,
		"ListProviders": RoleViewer, "GetShareMapping": RoleViewer, "Events": RoleViewer,
		"CreateSnapshotSet": RoleOperator, "Backup": RoleOperator, "BackupStream": RoleOperator,
		"ExposeSnapshot": RoleOperator, "ExposeShadowCopySet": RoleOperator,
		"SetStorage": RoleAdmin, "DeleteStorage": RoleAdmin, "DeleteSnapshots": RoleAdmin, "RevertSnapshot": RoleAdmin,
		"ListJobs": RoleViewer, "GetJob": RoleViewer, "JobHistory": RoleViewer, "RunJob": RoleOperator, "SetJobEnabled": RoleOperator,
		"AddJob": RoleOperator, "RemoveJob": RoleOperator,
		"NoSuchMethod": RoleAdmin, "": RoleAdmin,
	} {
		if got := needs("/umbra.v1.Umbra/" + method); got != want {
			t.Errorf("%s needs %v, want %v", method, got, want)
		}
	}
	if got := needs("/grpc.reflection.v1.ServerReflection/ListVolumes"); got != RoleAdmin {
		t.Errorf("another service's method needs %v, want admin", got)
	}
}

// TestSocketGroup: a unix peer whose groups, read from the socket when
// it connected, include the socket group is an operator, named in the
// audit by uid, user and group; one outside it is refused; the group
// comes from the kernel (SO_PEERGROUPS), here this process's own.
func TestSocketGroup(t *testing.T) {
	grp := &SocketGroup{Name: "umbra-fsrvp", GID: 4242}
	var unixOnly *Identities
	in := peerName(65534, []uint32{100, 4242}, grp)
	if in != "uid=65534 group=umbra-fsrvp" {
		t.Fatalf("peer name of a member: %q", in)
	}
	ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.UnixAddr{Name: in, Net: "unix"}})
	if id, err := unixOnly.who(ctx); err != nil || id.role != RoleOperator || id.name != "unix:"+in {
		t.Fatalf("member of the socket group: %v %v", id, err)
	}
	for _, out := range []string{peerName(65534, []uint32{100, 4243}, grp), peerName(65534, []uint32{4242}, nil)} {
		if strings.Contains(out, "group=") {
			t.Fatalf("peer name of a non-member: %q", out)
		}
		ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.UnixAddr{Name: out, Net: "unix"}})
		if id, err := unixOnly.who(ctx); status.Code(err) != codes.PermissionDenied || id.role != RoleNone || !strings.Contains(err.Error(), "--api-socket-group") {
			t.Fatalf("non-member %q: %v %v", out, id, err)
		}
	}

	// The kernel's view of a real peer: this process's groups.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	got, err := peerGroups(fds[0], uint32(os.Getgid()))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.Getgroups()
	want = append(want, os.Getgid())
	for _, g := range want {
		if !slices.Contains(got, uint32(g)) {
			t.Fatalf("peer groups %v lack %d (process groups %v)", got, g, want)
		}
	}
}

// TestOperatorMayDeleteSambaSnapshot: an operator may delete one
// snapshot named as `umbra samba create` names them, and nothing else;
// a viewer not even that.
func TestOperatorMayDeleteSambaSnapshot(t *testing.T) {
	del := "/umbra.v1.Umbra/DeleteSnapshots"
	gmt := "GMT-2026.12.07-05.00.00"
	for _, c := range []struct {
		role   Role
		method string
		req    *umbrav1.DeleteSnapshotsRequest
		want   bool
	}{
		{RoleOperator, del, &umbrav1.DeleteSnapshotsRequest{Volume: "v", Id: gmt, Force: true}, true},
		{RoleViewer, del, &umbrav1.DeleteSnapshotsRequest{Volume: "v", Id: gmt}, false},
		{RoleOperator, del, &umbrav1.DeleteSnapshotsRequest{Volume: "v", Id: "nightly"}, false},
		{RoleOperator, del, &umbrav1.DeleteSnapshotsRequest{Volume: "v", Id: gmt, All: true}, false},
		{RoleOperator, del, &umbrav1.DeleteSnapshotsRequest{Volume: "v", Id: gmt, Oldest: true}, false},
		{RoleOperator, del, &umbrav1.DeleteSnapshotsRequest{Id: gmt, SetId: "s"}, false},
		{RoleOperator, "/umbra.v1.Umbra/RevertSnapshot", &umbrav1.DeleteSnapshotsRequest{Volume: "v", Id: gmt}, false},
	} {
		if got := operatorMay(c.role, c.method, c.req); got != c.want {
			t.Errorf("%v %s %v: %v, want %v", c.role, c.method, c.req, got, c.want)
		}
	}
}
