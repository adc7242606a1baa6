package web

import (
	"context"

	"umbra/api"
)

type sessionKey struct{}

func withSession(ctx context.Context, sess *session) context.Context {
	return context.WithValue(ctx, sessionKey{}, sess)
}

// CallerFrom returns the logged-in user of a request the console hands
// to a handler it mounts (the file browser under /browse/): call the
// API as them with api.Call.
func CallerFrom(ctx context.Context) (api.Caller, bool) {
	sess, ok := ctx.Value(sessionKey{}).(*session)
	if !ok {
		return api.Caller{}, false
	}
	return sess.caller, true
}

// CSRFToken returns the session's token, which every form a mounted
// handler serves must send back as the field csrf (or the header
// X-CSRF-Token): the console refuses a POST without it.
func CSRFToken(ctx context.Context) string {
	if sess, ok := ctx.Value(sessionKey{}).(*session); ok {
		return sess.csrf
	}
	return ""
}
