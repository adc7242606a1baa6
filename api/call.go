package api

import (
	"context"
	"crypto/sha256"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"umbra/api/umbrav1"
)

// Caller is an authenticated identity that calls the Server in process
// rather than over gRPC: the web console's logged-in user. Its calls go
// through the same role check and audit log as the same calls over
// gRPC (Call).
type Caller struct {
	id identity
	// Addr is where the caller reached the service from, for the audit
	// log (e.g. "web 192.0.2.7:51234").
	Addr string
}

// Name is the identity's name: a token's name or cert:CN.
func (c Caller) Name() string { return c.id.name }

// Role is the identity's role.
func (c Caller) Role() Role { return c.id.role }

// ByToken returns the identity a bearer token names (false: none).
func (ids *Identities) ByToken(token string) (Caller, bool) {
	if ids == nil {
		return Caller{}, false
	}
	id, ok := ids.tokens[sha256.Sum256([]byte(strings.TrimSpace(token)))]
	return Caller{id: id}, ok
}

// ByCert returns the identity of a verified client certificate's
// common name (false: the tokens file gives it no role).
func (ids *Identities) ByCert(cn string) (Caller, bool) {
	if ids == nil {
		return Caller{}, false
	}
	id, ok := ids.certs[cn]
	return Caller{id: id}, ok
}

// Local actions are what the service does for in-process callers that
// is not a gRPC method: the web console's repository verify and prune
// (the CLI runs those in its own process, on its user's files).
const (
	ActionListRepository   = "/umbra.repository/List"
	ActionVerifyRepository = "/umbra.repository/Verify"
	ActionPruneRepository  = "/umbra.repository/Prune"
	ActionLogin            = "/umbra.web/Login"
	// ActionBrowseFiles reads the files of a snapshot or a backup image
	// (the console's file browser): operators, as exposing a snapshot.
	ActionBrowseFiles = "/umbra.files/Browse"
)

// localRoles is the least role of each local action.
var localRoles = map[string]Role{
	ActionListRepository:   RoleViewer,
	ActionVerifyRepository: RoleOperator,
	ActionPruneRepository:  RoleAdmin,
	ActionBrowseFiles:      RoleOperator,
}

// fullMethod is method as the interceptors see it: a gRPC method's
// short name ("DeleteSnapshots") gets the service's prefix; a local
// action is already full.
func fullMethod(method string) string {
	if strings.HasPrefix(method, "/") {
		return method
	}
	return "/" + umbrav1.Umbra_ServiceDesc.ServiceName + "/" + method
}

// roleFor is the least role of a full method or local action; unknown
// ones need admin (fail closed).
func roleFor(full string) Role {
	if r, ok := localRoles[full]; ok {
		return r
	}
	return needs(full)
}

// authorize refuses id the call full with req unless its role allows it.
func authorize(id identity, full string, req any) error {
	if need := roleFor(full); id.role < need && !operatorMay(id.role, full, req) {
		return status.Errorf(codes.PermissionDenied, "%s (%s) may not call %s: it needs the %s role", id.name, id.role, full, need)
	}
	return nil
}

// May reports whether c may call method (a gRPC method's short name or
// a local action), for showing or hiding what a caller cannot do; Call
// checks again.
func (c Caller) May(method string) bool {
	return c.id.role >= roleFor(fullMethod(method))
}

// Call runs h with req as c: the role check of a gRPC call to method
// (a short name such as "DeleteSnapshots", or a local action), the
// audit line of a refused or changing call, and the guard that turns a
// panic into an error. Errors are gRPC statuses, as a client sees them.
func Call[Req, Resp any](ctx context.Context, s *Server, c Caller, method string, req Req, h func(context.Context, Req) (Resp, error)) (Resp, error) {
	full := fullMethod(method)
	var zero Resp
	if err := authorize(c.id, full, req); err != nil {
		s.auditAddr(c.Addr, c.id, full, req, err, true)
		return zero, err
	}
	resp, err := s.guard(full, func() (any, error) { return h(ctx, req) })
	if roleFor(full) > RoleViewer {
		s.auditAddr(c.Addr, c.id, full, req, err, false)
	}
	if err != nil {
		if _, ok := status.FromError(err); !ok {
			err = status.Error(codes.Internal, err.Error())
		}
		return zero, err
	}
	out, _ := resp.(Resp)
	return out, nil
}

// AuditLogin records a refused login (an unknown token or certificate)
// in the audit log, under the same budget as refused API calls.
func (s *Server) AuditLogin(addr, who string, err error) {
	s.auditAddr(addr, identity{name: who}, ActionLogin, nil, status.Error(codes.Unauthenticated, err.Error()), true)
}

// Subscribe returns the service's events for c (at least a viewer), as
// the Events method streams them, and a function that ends the
// subscription.
func (s *Server) Subscribe(c Caller, kinds []string) (<-chan *umbrav1.Event, func(), error) {
	full := fullMethod("Events")
	if err := authorize(c.id, full, nil); err != nil {
		s.auditAddr(c.Addr, c.id, full, nil, err, true)
		return nil, nil, err
	}
	sub := s.events.subscribe(kinds)
	return sub.ch, func() { s.events.unsubscribe(sub) }, nil
}

// Publish emits an event of kind to every subscriber: what the service
// does outside the API's methods (a repository verified) reaches the
// same stream.
func (s *Server) Publish(kind string, ev *umbrav1.Event) {
	if ev == nil {
		ev = &umbrav1.Event{}
	}
	s.emit(kind, ev)
}

// NewCaller makes an identity with role, named name, for tests and
// callers that authenticated by other means.
func NewCaller(name string, role Role, addr string) Caller {
	return Caller{id: identity{name: name, role: role}, Addr: addr}
}

func (c Caller) String() string { return fmt.Sprintf("%s (%s)", c.id.name, c.id.role) }
