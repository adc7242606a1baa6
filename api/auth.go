package api

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"reflect"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/BurntSushi/toml"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"umbra/api/umbrav1"
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
	"ListJobs": RoleViewer, "GetJob": RoleViewer, "JobHistory": RoleViewer,

	"CreateSnapshotSet": RoleOperator, "Backup": RoleOperator, "BackupStream": RoleOperator,
	"SetContext": RoleOperator, "StartShadowCopySet": RoleOperator, "AddToShadowCopySet": RoleOperator,
	"PrepareShadowCopySet": RoleOperator, "CommitShadowCopySet": RoleOperator, "ExposeShadowCopySet": RoleOperator,
	"RecoveryCompleteShadowCopySet": RoleOperator, "AbortShadowCopySet": RoleOperator,
	"ExposeSnapshot": RoleOperator, "UnexposeSnapshot": RoleOperator,
	"RunJob": RoleOperator, "SetJobEnabled": RoleOperator, "AddJob": RoleOperator, "RemoveJob": RoleOperator,

	"SetStorage": RoleAdmin, "DeleteStorage": RoleAdmin, "DeleteSnapshots": RoleAdmin, "RevertSnapshot": RoleAdmin, "DeleteShareMapping": RoleAdmin,
	"RestoreLive": RoleAdmin,
}

// needs returns the role a full method name ("/umbra.v1.Umbra/X") needs.
func needs(full string) Role {
	name, ok := strings.CutPrefix(full, "/"+umbrav1.Umbra_ServiceDesc.ServiceName+"/")
	if r, known := methodRoles[name]; ok && known {
		return r
	}
	return RoleAdmin
}

// sambaSnapshotPrefix starts the name of each snapshot `umbra samba
// create` takes (vfs_shadow_copy2's @GMT- format without its @).
const sambaSnapshotPrefix = "GMT-"

// operatorMay is the one admin call an operator may make: deleting one
// snapshot named as `umbra samba create` names them, which is what
// Samba's FSRVP delete runs (`umbra samba delete`) as the SMB user. Every
// other deletion (by set, oldest, all, other names) stays admin-only.
func operatorMay(role Role, full string, req any) bool {
	d, ok := req.(*umbrav1.DeleteSnapshotsRequest)
	return ok && role == RoleOperator && full == "/"+umbrav1.Umbra_ServiceDesc.ServiceName+"/DeleteSnapshots" &&
		strings.HasPrefix(d.Id, sambaSnapshotPrefix) && !d.All && !d.Oldest && d.SetId == ""
}

// mutating reports whether a call changes something (and is audited).
func mutating(full string) bool { return needs(full) > RoleViewer }

// Identities maps bearer tokens and client certificate names to roles.
type Identities struct {
	tokens map[[32]byte]identity // by SHA-256 of the token: lookups take the same time whatever they match
	certs  map[string]identity   // by certificate common name
}

type identity struct {
	name string
	role Role
}

// minTokenLen keeps guessable tokens out of the file.
const minTokenLen = 16

// LoadIdentities reads a tokens file. The file holds secrets: it must not
// be readable by group or others. It is either lines, with # comments,
//
//	TOKEN ROLE NAME          a bearer token
//	token TOKEN ROLE NAME    the same
//	cert  CN    ROLE         a client certificate's common name
//
// or, when its name ends in .toml or its first line opens a table, TOML:
//
//	[[token]]
//	token = "..."
//	role = "operator"
//	name = "backup-job"
//	[[cert]]
//	cn = "backup-host"
//	role = "viewer"
func LoadIdentities(path string) (*Identities, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("tokens file %s is mode %#o: it holds secrets, make it 0600 (chmod 600 %s)", path, fi.Mode().Perm(), path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	ids := &Identities{tokens: map[[32]byte]identity{}, certs: map[string]identity{}}
	if strings.HasSuffix(path, ".toml") || strings.HasPrefix(firstLine(string(b)), "[") {
		err = ids.parseTOML(string(b))
	} else {
		err = ids.parseLines(string(b))
	}
	if err != nil {
		return nil, fmt.Errorf("tokens file %s: %w", path, err)
	}
	if len(ids.tokens)+len(ids.certs) == 0 {
		return nil, fmt.Errorf("tokens file %s has no identities: nobody could call the API", path)
	}
	return ids, nil
}

// firstLine is the first line that is neither blank nor a comment.
func firstLine(text string) string {
	for line := range strings.Lines(text) {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			return line
		}
	}
	return ""
}

func (ids *Identities) parseLines(text string) error {
	n := 0
	for line := range strings.Lines(text) {
		n++
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		var err error
		switch {
		case f[0] == "token" && len(f) == 4:
			err = ids.addToken(f[1], f[2], f[3])
		case f[0] == "cert" && len(f) == 3:
			err = ids.addCert(f[1], f[2])
		case len(f) == 3 && f[0] != "token" && f[0] != "cert":
			err = ids.addToken(f[0], f[1], f[2])
		default:
			err = errors.New("want `TOKEN ROLE NAME`, `token TOKEN ROLE NAME` or `cert COMMON-NAME ROLE`")
		}
		if err != nil {
			return fmt.Errorf("line %d: %w", n, err)
		}
	}
	return nil
}

func (ids *Identities) parseTOML(text string) error {
	var file struct {
		Token []struct{ Token, Role, Name string }
		Cert  []struct{ CN, Role string }
	}
	md, err := toml.Decode(text, &file)
	if err != nil {
		return err
	}
	if und := md.Undecoded(); len(und) > 0 {
		return fmt.Errorf("unknown keys %v: want [[token]] token/role/name and [[cert]] cn/role", und)
	}
	for i, t := range file.Token {
		if err := ids.addToken(t.Token, t.Role, t.Name); err != nil {
			return fmt.Errorf("token %d: %w", i+1, err)
		}
	}
	for i, c := range file.Cert {
		if err := ids.addCert(c.CN, c.Role); err != nil {
			return fmt.Errorf("cert %d: %w", i+1, err)
		}
	}
	return nil
}

func (ids *Identities) addToken(token, role, name string) error {
	r, err := ParseRole(role)
	if err != nil {
		return err
	}
	if len(token) < minTokenLen {
		return fmt.Errorf("a token must be at least %d characters", minTokenLen)
	}
	if name == "" {
		return errors.New("a token needs a name (it is what the audit log records)")
	}
	h := sha256.Sum256([]byte(token))
	if prev, dup := ids.tokens[h]; dup {
		return fmt.Errorf("token of %s is already the token of %s", name, prev.name)
	}
	ids.tokens[h] = identity{name: name, role: r}
	return nil
}

func (ids *Identities) addCert(cn, role string) error {
	r, err := ParseRole(role)
	if err != nil {
		return err
	}
	if cn == "" {
		return errors.New("a certificate needs its common name")
	}
	if _, dup := ids.certs[cn]; dup {
		return fmt.Errorf("certificate %q is named twice", cn)
	}
	ids.certs[cn] = identity{name: "cert:" + cn, role: r}
	return nil
}

// who authenticates a call. On the unix socket (ids nil) root and the
// service's uid (SO_PEERCRED, read by peerCheck) are admins, members of
// the socket group (SO_PEERGROUPS) operators, and any other uid is
// refused. On TCP the verified client certificate or the
// bearer token decides; else nobody.
func (ids *Identities) who(ctx context.Context) (identity, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return identity{}, status.Error(codes.Unauthenticated, "no peer")
	}
	if ids == nil {
		if a, unix := p.Addr.(*net.UnixAddr); unix {
			id := identity{name: "unix:" + a.Name}
			var uid int
			if _, err := fmt.Sscanf(a.Name, "uid=%d", &uid); err != nil {
				return id, status.Error(codes.Unauthenticated, "the unix socket peer's uid is unknown")
			}
			if uid == 0 || uid == os.Getuid() {
				id.role = RoleAdmin
				return id, nil
			}
			if _, grp, ok := strings.Cut(a.Name, " group="); ok && grp != "" {
				id.role = RoleOperator // set by peerCheck from SO_PEERGROUPS
				return id, nil
			}
			return id, status.Errorf(codes.PermissionDenied, "uid %d may not use this service's API socket: it admits root and the service's own user (uid %d), and as operators the members of the group given to `umbra serve --api-socket-group` (none given, or uid %d was not in it when it connected); run the command as one of them (e.g. with sudo)", uid, os.Getuid(), uid)
		}
		return identity{name: p.Addr.String()}, status.Error(codes.Unauthenticated, "this listener serves unix-socket peers only")
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
		scheme, tok, ok := strings.Cut(v, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			continue
		}
		if id, ok := ids.tokens[sha256.Sum256([]byte(strings.TrimSpace(tok)))]; ok {
			return id, nil
		}
		return identity{name: "unknown-token"}, status.Error(codes.Unauthenticated, "unknown bearer token")
	}
	return identity{name: "anonymous"}, status.Error(codes.Unauthenticated, "give a client certificate or a bearer token (umbra --token or UMBRA_TOKEN)")
}

// Audit appends one JSON line per mutating or refused call: who, what,
// result.
type Audit struct {
	mu sync.Mutex // guards f's lines and the refused-call budget below
	f  *os.File

	// Refused calls need no identity, so anyone who reaches the TCP port
	// could fill the disk with them: at most refusedPerSecond are written
	// a second, and the next line written says how many were not.
	second  int64 // Unix second of the current budget
	spent   int   // refused lines written in it
	dropped int   // refused calls not written since the last line
}

const refusedPerSecond = 20

// maxAuditRequest bounds a line's request summary (JSON bytes); requests
// are small, and a caller cannot make the log grow faster than this.
const maxAuditRequest = 4 << 10

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
	Who     string          `json:"who"`            // unix:uid=N, a token's name, cert:CN
	Addr    string          `json:"addr,omitempty"` // a TCP caller's address
	Role    string          `json:"role"`
	Method  string          `json:"method"`
	Request json.RawMessage `json:"request,omitempty"`
	Result  string          `json:"result"`
	Error   string          `json:"error,omitempty"`
	Dropped int             `json:"refused_not_logged,omitempty"` // refused calls over the budget before this line
}

// secretFields are never written to the audit log.
var secretFields = []string{"password", "s3_secret_key", "s3_access_key"}

func (a *Audit) log(id identity, addr, method string, req any, err error, refused bool) error {
	if a == nil {
		return nil
	}
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if refused {
		if sec := now.Unix(); sec != a.second {
			a.second, a.spent = sec, 0
		}
		if a.spent >= refusedPerSecond {
			a.dropped++
			return nil
		}
		a.spent++
	}
	line := auditLine{Dropped: a.dropped, Time: now.UTC(), Who: id.name, Addr: addr, Role: id.role.String(), Method: method, Result: status.Code(err).String()}
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
	} else if req != nil && !isNilPtr(req) {
		// A local action's request (a plain struct without secrets).
		if b, err := json.Marshal(req); err == nil {
			line.Request = b
		}
	}
	if len(line.Request) > maxAuditRequest {
		line.Request = fmt.Appendf(nil, "%q", fmt.Sprintf("%d bytes, not logged", len(line.Request)))
	}
	b, err := json.Marshal(line)
	if err != nil {
		return fmt.Errorf("audit line: %w", err)
	}
	if _, err := a.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	a.dropped = 0
	return nil
}

// isNilPtr reports whether v is a nil pointer.
func isNilPtr(v any) bool {
	rv := reflect.ValueOf(v)
	return rv.Kind() == reflect.Pointer && rv.IsNil()
}

// audit logs a call; a log that cannot be written does not fail the call
// (it has happened) but is reported.
func (s *Server) audit(ctx context.Context, id identity, method string, req any, err error, refused bool) {
	var addr string
	if p, ok := peer.FromContext(ctx); ok {
		if _, unix := p.Addr.(*net.UnixAddr); !unix {
			addr = p.Addr.String()
		}
	}
	s.auditAddr(addr, id, method, req, err, refused)
}

// auditAddr is audit for a caller whose address is known.
func (s *Server) auditAddr(addr string, id identity, method string, req any, err error, refused bool) {
	if werr := s.Audit.log(id, addr, method, req, err, refused); werr != nil {
		s.log.Error("audit", "method", method, "who", id.name, "err", werr)
	}
}

// firstRecv remembers the request of a stream for the audit log.
type firstRecv struct {
	grpc.ServerStream
	req any
}

func (f *firstRecv) RecvMsg(m any) error {
	err := f.ServerStream.RecvMsg(m)
	if err == nil && f.req == nil {
		f.req = m
	}
	return err
}

// interceptors authorize every call by role and audit the mutating and
// the refused ones. ids nil: the unix socket, whose peers are admins.
func (s *Server) interceptors(ids *Identities) []grpc.ServerOption {
	check := func(ctx context.Context, method string, req any) (identity, error) {
		id, err := ids.who(ctx)
		if err != nil {
			return id, err
		}
		return id, authorize(id, method, req)
	}
	unary := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		id, err := check(ctx, info.FullMethod, req)
		if err != nil {
			s.audit(ctx, id, info.FullMethod, req, err, true)
			return nil, err
		}
		resp, err := s.guard(info.FullMethod, func() (any, error) { return h(ctx, req) })
		if mutating(info.FullMethod) {
			s.audit(ctx, id, info.FullMethod, req, err, false)
		}
		return resp, err
	}
	stream := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		id, err := check(ss.Context(), info.FullMethod, nil)
		if err != nil {
			s.audit(ss.Context(), id, info.FullMethod, nil, err, true)
			return err
		}
		fr := &firstRecv{ServerStream: ss}
		_, err = s.guard(info.FullMethod, func() (any, error) { return nil, h(srv, fr) })
		if mutating(info.FullMethod) {
			s.audit(ss.Context(), id, info.FullMethod, fr.req, err, false)
		}
		return err
	}
	return []grpc.ServerOption{grpc.UnaryInterceptor(unary), grpc.StreamInterceptor(stream)}
}

// guard runs a call's handler and turns a panic in it into an Internal
// error (logged with its stack): a bug in one request must not take down
// the service, whose NBD and FUSE front-ends carry the volumes' writes.
func (s *Server) guard(method string, h func() (any, error)) (resp any, err error) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("a call panicked; the service goes on", "method", method, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			resp, err = nil, status.Errorf(codes.Internal, "%s failed inside the service (a bug: %v); the service is still running, and its log has the details to report", method, p)
		}
	}()
	return h()
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
