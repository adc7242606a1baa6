// Package web is Umbra's console for operators: server-rendered pages
// (html/template, every asset embedded) over the same API server the
// gRPC clients call. A logged-in user is an api.Caller, authenticated by
// the API's identities (a token typed into the login form, or a client
// certificate), and every page and change runs the api.Server's own
// methods as that caller (api.Call), so the console has exactly the
// API's authorization and audit log and no rules of its own.
package web

import (
	"context"
	"crypto/tls"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"umbra/api"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// Defaults of the session lifetimes.
const (
	DefaultIdleTimeout = 15 * time.Minute
	DefaultMaxAge      = 8 * time.Hour
)

// Config is what the console serves and how.
type Config struct {
	// API is the service's API server: every page reads through it and
	// every change is one of its methods, called as the logged-in user.
	API *api.Server
	// Identities authenticates tokens and client certificates (the API's
	// tokens file).
	Identities *api.Identities
	// TLS, when set, serves HTTPS (the API's certificate; ClientCAs, when
	// set, verify client certificates). Nil: plain HTTP, which Listen
	// allows only on a unix socket or the loopback address.
	TLS *tls.Config
	// IdleTimeout ends a session unused this long, MaxAge any session
	// this old (0: the defaults).
	IdleTimeout, MaxAge time.Duration
	// Repositories are the backup repositories the repositories page
	// shows (local directories or s3:// locations, unencrypted ones or
	// with a password file).
	Repositories []Repository
	// Browse serves the file-level restore pages under /browse/ (nil: a
	// page that says it is not available).
	Browse http.Handler
	// Source is what the overview renders from (nil: the API).
	Source Source
	// Now is the clock of sessions (nil: time.Now).
	Now func() time.Time
	// Logger receives the console's log (nil: slog.Default()).
	Logger *slog.Logger
}

// Repository is one backup repository the console shows.
type Repository struct {
	Location     string `toml:"location"`
	PasswordFile string `toml:"password_file"` // an encrypted repository's password, in a file
}

// Server is the console.
type Server struct {
	cfg      Config
	log      *slog.Logger
	now      func() time.Time
	pages    map[string]*template.Template
	mux      *http.ServeMux
	sessions *sessions
	tasks    *tasks
	src      Source

	mu     sync.Mutex // guards verified
	verify map[string]verifyState
}

// New checks cfg and returns the console.
func New(cfg Config) (*Server, error) {
	if cfg.API == nil {
		return nil, errors.New("web: no API server")
	}
	if cfg.Identities == nil {
		return nil, errors.New("the web console needs identities to log in with: give --api-tokens (a tokens file, as for --api-listen)")
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.MaxAge <= 0 {
		cfg.MaxAge = DefaultMaxAge
	}
	if cfg.IdleTimeout > cfg.MaxAge {
		return nil, fmt.Errorf("web idle timeout %s is longer than the session's maximum age %s: give a shorter idle_timeout or a longer session_max_age", cfg.IdleTimeout, cfg.MaxAge)
	}
	s := &Server{cfg: cfg, log: cfg.Logger, now: cfg.Now, src: cfg.Source, verify: map[string]verifyState{}}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.src == nil {
		s.src = apiSource{cfg.API}
	}
	var err error
	if s.pages, err = parsePages(); err != nil {
		return nil, err
	}
	s.sessions = newSessions(s.now, cfg.IdleTimeout, cfg.MaxAge)
	s.tasks = newTasks(time.Now) // real time: s.now is the sessions' clock
	s.routes()
	return s, nil
}

// Handler is the console's HTTP handler.
func (s *Server) Handler() http.Handler { return s.mux }

// Serve serves the console on l until ctx ends, then waits for the
// requests and tasks in flight (a verify or prune is cancelled).
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	hs := &http.Server{
		Handler:           securityHeaders(s.mux),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	if s.cfg.TLS != nil && l.Addr().Network() == "tcp" {
		hs.TLSConfig = s.cfg.TLS.Clone()
		l = tls.NewListener(l, hs.TLSConfig)
	}
	done := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(done)
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		hs.Shutdown(sctx) // event streams end with ctx (BaseContext)
	})
	err := hs.Serve(l)
	if stop() { // Serve failed on its own: nothing shuts it down
		close(done)
	}
	<-done
	s.tasks.close()
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Close cancels the tasks in flight and waits for them (Serve does
// this too when it returns).
func (s *Server) Close() { s.tasks.close() }

// CheckListen checks a --web-listen address: "unix:PATH", or
// HOST:PORT. Without TLS only a unix socket or a loopback address is
// allowed: the session cookie and the token would cross the network in
// clear.
func CheckListen(addr string, withTLS bool) error {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if path == "" {
			return fmt.Errorf("--web-listen %q: want unix:PATH or HOST:PORT", addr)
		}
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--web-listen %q: want HOST:PORT (e.g. 127.0.0.1:8443) or unix:PATH: %v", addr, err)
	}
	if withTLS {
		return nil
	}
	if ip := net.ParseIP(host); host == "localhost" || ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("--web-listen %s is not a local address, and the console over the network needs TLS: give --api-tls-cert and --api-tls-key (the console serves HTTPS with the API's certificate), or listen on 127.0.0.1:PORT or unix:PATH for plain HTTP", addr)
}

// Listen binds a checked --web-listen address.
func Listen(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		return net.Listen("unix", path)
	}
	return net.Listen("tcp", addr)
}

// securityHeaders sets the headers every response carries: no framing,
// no sniffing, no referrer, and a content security policy that admits
// only the console's own scripts and styles.
func securityHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("Referrer-Policy", "no-referrer")
		if r.TLS != nil {
			hd.Set("Strict-Transport-Security", "max-age=31536000")
		}
		h.ServeHTTP(w, r)
	})
}

// staticHandler serves the embedded assets, which browsers keep for an
// hour.
func staticHandler() http.Handler {
	sub, _ := fs.Sub(staticFS, "static")
	fsrv := http.FileServerFS(sub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "public, max-age=3600")
		fsrv.ServeHTTP(w, r)
	})
}
