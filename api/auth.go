package api

import (
	"bufio"
	"context"
	"crypto/subtle"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Role is what a caller may do: a viewer lists, an operator also
// creates and exposes, an admin also changes storage, deletes and
// reverts. Callers on the unix socket (root or the service's user,
// checked with SO_PEERCRED) are admins; on TCP a caller is who its
// client certificate or bearer token says, and nobody else is served.
type Role int

const (
	RoleNone Role = iota
	RoleViewer
	RoleOperator
	RoleAdmin
)

func (r Role) String() string {
	return [...]string{"none", "viewer", "operator", "admin"}[r]
}

// ParseRole parses viewer, operator or admin.
func ParseRole(s string) (Role, error) {
	switch s {
	case "viewer":
		return RoleViewer, nil
	case "operator":
		return RoleOperator, nil
	case "admin":
		return RoleAdmin, nil
	}
	return RoleNone, fmt.Errorf("role %q: want viewer, operator or admin", s)
}

// methodRoles is the least role of each method; a method missing here
// needs admin (fail closed).
var methodRoles = map[string]Role{
	"ListVolumes": RoleViewer, "ListSnapshots": RoleViewer, "GetStorage": RoleViewer, "ListWriters": RoleViewer,
	"ListProviders": RoleViewer, "GetSupportedVersion": RoleViewer, "IsPathSupported": RoleViewer,
	"IsPathShadowCopied": RoleViewer, "ListShadowCopySets": RoleViewer, "GetShareMapping": RoleViewer,
	"ListShareMappings": RoleViewer, "Events": RoleViewer,

	"CreateSnapshotSet": RoleOperator, "Backup": RoleOperator, "BackupStream": RoleOperator,
	"SetContext": RoleOperator, "StartShadowCopySet": RoleOperator, "AddToShadowCopySet": RoleOperator,
	"PrepareShadowCopySet": RoleOperator, "CommitShadowCopySet": RoleOperator, "ExposeShadowCopySet": RoleOperator,
	"RecoveryCompleteShadowCopySet": RoleOperator, "AbortShadowCopySet": RoleOperator,
	"ExposeSnapshot": RoleOperator, "UnexposeSnapshot": RoleOperator,

	"SetStorage": RoleAdmin, "DeleteSnapshots": RoleAdmin, "RevertSnapshot": RoleAdmin, "DeleteShareMapping": RoleAdmin,
}

// needs returns the role a full method name ("/umbra.v1.Umbra/X") needs.
func needs(full string) Role {
	if r, ok := methodRoles[full[strings.LastIndexByte(full, '/')+1:]]; ok {
		return r
	}
	return RoleAdmin
}

// mutating reports whether a call changes something (and is audited).
func mutating(full string) bool { return needs(full) > RoleViewer }

// Identities maps bearer tokens and client certificate names to roles.
type Identities struct {
	tokens map[string]identity // by token
	certs  map[string]identity // by certificate common name
}

type identity struct {
	name string
	role Role
}

// LoadIdentities reads a tokens file: one identity per line,
//
//	token TOKEN ROLE NAME    a bearer token
//	cert  CN    ROLE         a client certificate's common name
//
// with # comments. The file holds secrets: it must not be readable by
// group or others.
func LoadIdentities(path string) (*Identities, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("tokens file %s is mode %#o: it holds secrets, make it 0600 (chmod 600 %s)", path, fi.Mode().Perm(), path)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	defer f.Close()
	ids := &Identities{tokens: map[string]identity{}, certs: map[string]identity{}}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		bad := func(why string) error { return fmt.Errorf("tokens file %s line %d: %s", path, n, why) }
		switch {
		case f[0] == "token" && len(f) == 4:
			r, err := ParseRole(f[2])
			if err != nil {
				return nil, bad(err.Error())
			}
			if len(f[1]) < 16 {
				return nil, bad("a token must be at least 16 characters")
			}
			ids.tokens[f[1]] = identity{name: f[3], role: r}
		case f[0] == "cert" && len(f) == 3:
			r, err := ParseRole(f[2])
			if err != nil {
				return nil, bad(err.Error())
			}
			ids.certs[f[1]] = identity{name: "cert:" + f[1], role: r}
		default:
			return nil, bad("want `token TOKEN ROLE NAME` or `cert COMMON-NAME ROLE`")
		}
	}
	return ids, sc.Err()
}

// who authenticates a call: admin on the unix socket; on TCP the
// verified client certificate or the bearer token; else nobody.
func (ids *Identities) who(ctx context.Context) (identity, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return identity{}, status.Error(codes.Unauthenticated, "no peer")
	}
	if a, unix := p.Addr.(*net.UnixAddr); unix {
		return identity{name: "unix:" + a.Name, role: RoleAdmin}, nil
	}
	if ids == nil {
		return identity{}, status.Error(codes.Unauthenticated, "this listener has no identities")
	}
	if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 {
		cn := ti.State.VerifiedChains[0][0].Subject.CommonName
		if id, ok := ids.certs[cn]; ok {
			return id, nil
		}
		return identity{name: "cert:" + cn}, status.Errorf(codes.PermissionDenied, "client certificate %q has no role in the tokens file", cn)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		tok, ok := strings.CutPrefix(v, "Bearer ")
		if !ok {
			continue
		}
		for t, id := range ids.tokens {
			if subtle.ConstantTimeCompare([]byte(t), []byte(tok)) == 1 {
				return id, nil
			}
		}
		return identity{name: "unknown-token"}, status.Error(codes.Unauthenticated, "unknown bearer token")
	}
	return identity{name: "anonymous"}, status.Error(codes.Unauthenticated, "give a client certificate or a bearer token (umbra --token or UMBRA_TOKEN)")
}

// Audit appends one JSON line per mutating call: who, what, result.
type Audit struct {
	mu sync.Mutex // serializes lines
	f  *os.File
}

// OpenAudit opens (appending) the audit log at path.
func OpenAudit(path string) (*Audit, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	return &Audit{f: f}, nil
}

// Close closes the log.
func (a *Audit) Close() error { return a.f.Close() }

type auditLine struct {
	Time    time.Time       `json:"time"`
	Who     string          `json:"who"`
	Role    string          `json:"role"`
	Method  string          `json:"method"`
	Request json.RawMessage `json:"request,omitempty"`
	Result  string          `json:"result"`
	Error   string          `json:"error,omitempty"`
}

// secretFields are never written to the audit log.
var secretFields = []string{"password", "s3_secret_key", "s3_access_key"}

func (a *Audit) log(id identity, method string, req any, err error) {
	if a == nil {
		return
	}
	line := auditLine{Time: time.Now().UTC(), Who: id.name, Role: id.role.String(), Method: method, Result: status.Code(err).String()}
	if err != nil {
		line.Error = status.Convert(err).Message()
	}
	if m, ok := req.(proto.Message); ok {
		m = proto.Clone(m)
		r := m.ProtoReflect()
		for _, f := range secretFields {
			if fd := r.Descriptor().Fields().ByName(protoreflect.Name(f)); fd != nil && r.Has(fd) {
				r.Clear(fd)
			}
		}
		if b, err := (protojson.MarshalOptions{UseProtoNames: true}).Marshal(m); err == nil {
			line.Request = b
		}
	}
	b, _ := json.Marshal(line)
	a.mu.Lock()
	defer a.mu.Unlock()
	a.f.Write(append(b, '\n'))
}

// Interceptors authorize every call by role and audit the mutating ones.
func (s *Server) interceptors(ids *Identities) []grpc.ServerOption {
	check := func(ctx context.Context, method string) (identity, error) {
		id, err := ids.who(ctx)
		if err != nil {
			return id, err
		}
		if need := needs(method); id.role < need {
			return id, status.Errorf(codes.PermissionDenied, "%s (%s) may not call %s: it needs the %s role", id.name, id.role, method, need)
		}
		return id, nil
	}
	unary := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		id, err := check(ctx, info.FullMethod)
		if err == nil {
			var resp any
			resp, err = h(ctx, req)
			if mutating(info.FullMethod) {
				s.Audit.log(id, info.FullMethod, req, err)
			}
			return resp, err
		}
		s.Audit.log(id, info.FullMethod, req, err) // every refused call
		return nil, err
	}
	stream := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		id, err := check(ss.Context(), info.FullMethod)
		refused := err != nil
		if !refused {
			err = h(srv, ss)
		}
		if refused || mutating(info.FullMethod) {
			s.Audit.log(id, info.FullMethod, nil, err)
		}
		return err
	}
	return []grpc.ServerOption{grpc.UnaryInterceptor(unary), grpc.StreamInterceptor(stream)}
}

// ServeTCP serves the API on a TCP listener, TLS only, every call
// authenticated by ids (client certificate or bearer token).
func (s *Server) ServeTCP(ctx context.Context, l net.Listener, cfg *tls.Config, ids *Identities) error {
	if cfg == nil || ids == nil {
		return fmt.Errorf("the API on TCP needs TLS and a tokens file")
	}
	g := grpc.NewServer(append(s.interceptors(ids), grpc.Creds(credentials.NewTLS(cfg)))...)
	s.register(g)
	stop := context.AfterFunc(ctx, g.GracefulStop)
	defer stop()
	return g.Serve(l)
}
