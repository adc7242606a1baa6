package web

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"sync"
	"time"

	"umbra/api"
)

// cookieName is the session cookie's name.
const cookieName = "umbra_session"

// maxSessions bounds the sessions kept: a login past it ends the one
// used longest ago.
const maxSessions = 4096

// session is one logged-in browser.
type session struct {
	id      string
	csrf    string // sent back in every form and script request that changes something
	caller  api.Caller
	created time.Time
	seen    time.Time // last request
	flash   *flash    // one message for the next page
}

type flash struct {
	Error bool
	Text  string
}

// sessions are the logged-in browsers, in memory: a service restart
// logs everybody out.
type sessions struct {
	now       func() time.Time
	idle, max time.Duration

	mu   sync.Mutex // guards byID and the sessions in it
	byID map[string]*session
}

func newSessions(now func() time.Time, idle, max time.Duration) *sessions {
	return &sessions{now: now, idle: idle, max: max, byID: map[string]*session{}}
}

func randomToken() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// start makes a session for c.
func (ss *sessions) start(c api.Caller) *session {
	now := ss.now()
	s := &session{id: randomToken(), csrf: randomToken(), caller: c, created: now, seen: now}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	for id, o := range ss.byID {
		if ss.expired(o, now) != "" {
			delete(ss.byID, id)
		}
	}
	if len(ss.byID) >= maxSessions {
		var oldest *session
		for _, o := range ss.byID {
			if oldest == nil || o.seen.Before(oldest.seen) {
				oldest = o
			}
		}
		delete(ss.byID, oldest.id)
	}
	ss.byID[s.id] = s
	return s
}

// Why a session ended: idle (unused for the idle timeout) or max (its
// maximum age reached).
const (
	expiredIdle = "idle"
	expiredMax  = "max"
)

// expired says why s has expired at now ("" if it has not).
func (ss *sessions) expired(s *session, now time.Time) string {
	switch {
	case now.Sub(s.created) >= ss.max:
		return expiredMax
	case now.Sub(s.seen) >= ss.idle:
		return expiredIdle
	}
	return ""
}

// expiredText says to the user why their session ended.
func expiredText(why string) string {
	if why == expiredMax {
		return "Your session reached its maximum age: log in again."
	}
	return "Your session expired after a time without use: log in again."
}

// get returns the live session id names and marks it used; an expired
// one is ended and why is returned.
func (ss *sessions) get(id string) (*session, string) {
	now := ss.now()
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s := ss.byID[id]
	if s == nil {
		return nil, ""
	}
	if why := ss.expired(s, now); why != "" {
		delete(ss.byID, id)
		return nil, why
	}
	s.seen = now
	return s, ""
}

func (ss *sessions) end(id string) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	delete(ss.byID, id)
}

// setFlash leaves a message for the session's next page.
func (ss *sessions) setFlash(s *session, isErr bool, text string) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s.flash = &flash{Error: isErr, Text: text}
}

// takeFlash returns and clears the session's message.
func (ss *sessions) takeFlash(s *session) *flash {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	f := s.flash
	s.flash = nil
	return f
}

// setCookie sends the session cookie: HttpOnly, SameSite=Strict,
// Secure over HTTPS, gone after the session's maximum age.
func (s *Server) setCookie(w http.ResponseWriter, r *http.Request, value string, maxAge int) {
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: value, Path: "/", MaxAge: maxAge,
		HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode})
}

// authed wraps a page that needs a logged-in user. Without a session a
// verified client certificate with a role logs in by itself; otherwise
// the browser goes to the login page (an expired session says so).
func (s *Server) authed(h func(http.ResponseWriter, *http.Request, *session)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var why string
		if c, err := r.Cookie(cookieName); err == nil {
			var sess *session
			if sess, why = s.sessions.get(c.Value); sess != nil {
				h(w, r, sess)
				return
			}
		}
		if sess := s.certLogin(w, r); sess != nil {
			h(w, r, sess)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead || r.Header.Get("Accept") == "application/json" || r.Header.Get("Accept") == "text/event-stream" {
			// A change without a session (another site's form comes
			// without the cookie: SameSite=Strict) changes nothing.
			msg := "Not logged in: nothing was changed. Log in and do it again."
			if why != "" {
				msg = expiredText(why) + " Nothing was changed."
			}
			if r.Header.Get("Accept") == "application/json" || r.Header.Get("Accept") == "text/event-stream" {
				http.Error(w, msg, http.StatusUnauthorized)
				return
			}
			s.render(w, r, http.StatusUnauthorized, "error", nil, errorPage{Title: "Not logged in", Message: msg})
			return
		}
		q := url.Values{"next": {r.URL.RequestURI()}}
		if why != "" {
			q.Set("expired", why)
		}
		http.Redirect(w, r, "/login?"+q.Encode(), http.StatusSeeOther)
	})
}

// certLogin starts a session for a verified client certificate whose
// common name has a role.
func (s *Server) certLogin(w http.ResponseWriter, r *http.Request) *session {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		return nil
	}
	cn := r.TLS.VerifiedChains[0][0].Subject.CommonName
	c, ok := s.cfg.Identities.ByCert(cn)
	if !ok {
		s.cfg.API.AuditLogin(webAddr(r), "cert:"+cn, errors.New("client certificate has no role in the tokens file"))
		return nil
	}
	c.Addr = webAddr(r)
	sess := s.sessions.start(c)
	s.setCookie(w, r, sess.id, int(s.cfg.MaxAge.Seconds()))
	s.log.Info("web login", "who", c.Name(), "role", c.Role(), "by", "certificate", "addr", r.RemoteAddr)
	return sess
}

// webAddr is the audit log's address of a browser.
func webAddr(r *http.Request) string {
	if r.RemoteAddr == "" || r.RemoteAddr == "@" {
		return "web (unix socket)"
	}
	return "web " + r.RemoteAddr
}

// errCSRF is a change whose form or request does not carry the
// session's token: made by another site, or a page from an old session.
var errCSRF = errors.New("This change was refused: the form did not carry your login's security token (it came from another site, or from a page older than your login). Reload the page and try again.")

// checkCSRF refuses a change without the session's token, in the form
// field csrf or the X-CSRF-Token header, and one another site sent.
func checkCSRF(r *http.Request, sess *session) error {
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" && site != "none" {
		return errCSRF
	}
	tok := r.Header.Get("X-CSRF-Token")
	if tok == "" {
		tok = r.PostFormValue("csrf")
	}
	if tok == "" || subtle.ConstantTimeCompare([]byte(tok), []byte(sess.csrf)) != 1 {
		return errCSRF
	}
	return nil
}

// change wraps a handler that changes something: a logged-in user and
// the session's CSRF token, else 403 and nothing changes.
func (s *Server) change(h func(http.ResponseWriter, *http.Request, *session)) http.Handler {
	return s.authed(func(w http.ResponseWriter, r *http.Request, sess *session) {
		r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
		if err := checkCSRF(r, sess); err != nil {
			s.log.Warn("web: change refused without the session's CSRF token", "who", sess.caller.Name(), "path", r.URL.Path, "addr", r.RemoteAddr)
			s.render(w, r, http.StatusForbidden, "error", sess, errorPage{Title: "Refused", Message: err.Error()})
			return
		}
		h(w, r, sess)
	})
}

// loginPage shows the token form.
func (s *Server) loginPage(w http.ResponseWriter, r *http.Request) {
	d := loginData{Next: safeNext(r.URL.Query().Get("next"))}
	if why := r.URL.Query().Get("expired"); why != "" {
		d.Message = expiredText(why)
	}
	d.CertHint = s.cfg.TLS != nil && s.cfg.TLS.ClientCAs != nil
	s.render(w, r, http.StatusOK, "login", nil, d)
}

// login checks a token and starts a session. The form carries no CSRF
// token (there is no session yet); a login posted from another site is
// refused by Sec-Fetch-Site and Origin.
func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	next := safeNext(r.PostFormValue("next"))
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" && site != "none" {
		http.Error(w, "a login from another site is refused", http.StatusForbidden)
		return
	}
	if o := r.Header.Get("Origin"); o != "" && o != "null" {
		if u, err := url.Parse(o); err != nil || u.Host != r.Host {
			http.Error(w, "a login from another site is refused", http.StatusForbidden)
			return
		}
	}
	c, ok := s.cfg.Identities.ByToken(r.PostFormValue("token"))
	if !ok {
		s.cfg.API.AuditLogin(webAddr(r), "unknown-token", errors.New("unknown token"))
		s.render(w, r, http.StatusUnauthorized, "login", nil, loginData{Next: next, Error: "That token is not in the service's tokens file. Check it (copy it whole, without spaces) or ask the administrator for one."})
		return
	}
	c.Addr = webAddr(r)
	sess := s.sessions.start(c)
	s.setCookie(w, r, sess.id, int(s.cfg.MaxAge.Seconds()))
	s.log.Info("web login", "who", c.Name(), "role", c.Role(), "by", "token", "addr", r.RemoteAddr)
	http.Redirect(w, r, next, http.StatusSeeOther)
}

// logout ends the session.
func (s *Server) logout(w http.ResponseWriter, r *http.Request, sess *session) {
	s.sessions.end(sess.id)
	s.setCookie(w, r, "", -1)
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

// safeNext keeps a redirect target on this site.
func safeNext(next string) string {
	u, err := url.Parse(next)
	if next == "" || err != nil || u.IsAbs() || u.Host != "" || len(next) < 1 || next[0] != '/' || len(next) > 1 && (next[1] == '/' || next[1] == '\\') {
		return "/"
	}
	return next
}
