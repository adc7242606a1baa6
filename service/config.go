package service

import (
	"cmp"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"umbra/api"
	"umbra/cow"
	"umbra/internal/owner"
	"umbra/internal/size"
	"umbra/jobs"
	"umbra/nbd"
	"umbra/notify"
	"umbra/web"
	"umbra/writer"
)

// Config is what the service serves and where; it is the TOML file of
// `umbra serve` (fields without a TOML key are set by the caller).
type Config struct {
	StateDir   string         `toml:"state_dir"`
	ExposeDir  string         `toml:"expose_dir"`    // where exposed snapshots are mounted
	SetTimeout string         `toml:"set_timeout"`   // FSRVP message sequence timer
	RepoIdle   string         `toml:"repo_idle"`     // how long a backup repository no backup uses stays open
	HoldPrio   string         `toml:"hold_priority"` // normal (default) or realtime
	API        APIConfig      `toml:"api"`
	Metrics    string         `toml:"metrics_listen"`
	AuditLog   string         `toml:"audit_log"`
	Writers    WritersConfig  `toml:"writers"`
	Reflink    []string       `toml:"reflink_volumes"`
	Btrfs      []string       `toml:"btrfs_volumes"`
	LVMThin    []string       `toml:"lvmthin_volumes"`
	NBD        NBDConfig      `toml:"nbd"`
	FUSE       FUSEConfig     `toml:"fuse"`
	Volumes    []VolumeConfig `toml:"volume"`
	Jobs       []jobs.Def     `toml:"job"`
	Notify     NotifyConfig   `toml:"notify"`
	Web        WebConfig      `toml:"web"`

	// APISocket is the unix socket of the management API; the socket
	// of out-of-process writers (writers.sock) is beside it.
	APISocket string `toml:"-"`
	// ThawGuard is the command the fsfreeze writer runs to thaw a
	// frozen filesystem should the service die (nil: none).
	ThawGuard []string `toml:"-"`
	// Logger receives the service's log (nil: slog.Default()).
	Logger *slog.Logger `toml:"-"`
	// Clock is the web console's clock of sessions (nil: time.Now).
	Clock func() time.Time `toml:"-"`
}

// APIConfig is the management API on TCP.
type APIConfig struct {
	Listen   string `toml:"listen"`    // TCP HOST:PORT (TLS required)
	TLSCert  string `toml:"tls_cert"`  // server certificate
	TLSKey   string `toml:"tls_key"`   //
	ClientCA string `toml:"client_ca"` // verify client certificates against it
	Tokens   string `toml:"tokens"`    // identities: bearer tokens and certificate names with roles

	// SocketGroup owns the unix API socket (mode 0660); its members get
	// the operator role there (Samba's FSRVP commands run as the SMB user).
	SocketGroup string `toml:"socket_group"`
}

// WebConfig is the web console: HTTPS with the API's certificate and
// identities ([api] tls_cert, tls_key, client_ca, tokens), or plain HTTP
// on a unix socket or the loopback address.
type WebConfig struct {
	Listen       string           `toml:"listen"`          // HOST:PORT or unix:PATH
	IdleTimeout  string           `toml:"idle_timeout"`    // a session unused this long ends (default 15m)
	MaxAge       string           `toml:"session_max_age"` // any session ends this long after login (default 8h)
	Repositories []web.Repository `toml:"repository"`      // backup repositories the console shows
}

// NBDConfig is the NBD server: a unix socket, and TCP with TLS.
type NBDConfig struct {
	Socket   string `toml:"socket"`
	Listen   string `toml:"listen"`
	TLSCert  string `toml:"tls_cert"`
	TLSKey   string `toml:"tls_key"`
	ClientCA string `toml:"client_ca"`       // TCP clients need a certificate it signed
	MaxConns int    `toml:"max_connections"` // per listener (default nbd.DefaultMaxConns)
}

// WritersConfig names the in-process writers.
type WritersConfig struct {
	SQLite   []string `toml:"sqlite"`
	HooksDir string   `toml:"hooks_dir"`
}

// FUSEConfig is the FUSE directory of volume and snapshot files.
type FUSEConfig struct {
	Dir string `toml:"dir"`
}

// VolumeConfig is one copy-on-write volume.
type VolumeConfig struct {
	Name       string `toml:"name"`
	Path       string `toml:"path"`
	Storage    string `toml:"storage"`
	MaxStorage string `toml:"max_storage"`
	ChunkSize  string `toml:"chunk_size"`
	Policy     string `toml:"policy"`
}

// NotifyConfig is where alerts of job runs that went wrong go (see
// package notify for the JSON they carry).
type NotifyConfig struct {
	Webhook  string   `toml:"webhook"`  // http(s) URL that gets a JSON POST per alert
	Exec     []string `toml:"exec"`     // command (argv) run per alert, the JSON on stdin
	Timeout  string   `toml:"timeout"`  // per attempt (default 10s)
	Attempts int      `toml:"attempts"` // webhook attempts per alert (default 5)
	Backoff  string   `toml:"backoff"`  // first wait between attempts, doubling (default 2s)
}

// notifyConfig checks c and makes the notifier's configuration.
func (c NotifyConfig) notifyConfig() (notify.Config, error) {
	out := notify.Config{Webhook: c.Webhook, Exec: c.Exec, Attempts: c.Attempts}
	if c.Webhook != "" {
		u, err := url.Parse(c.Webhook)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return out, configErr("notify.webhook %q: want an http:// or https:// URL", c.Webhook)
		}
	}
	if len(c.Exec) > 0 && !filepath.IsAbs(c.Exec[0]) {
		return out, configErr("notify.exec %q: the command must be an absolute path", c.Exec[0])
	}
	if c.Attempts < 0 || c.Attempts > 100 {
		return out, configErr("notify.attempts %d: want 1 to 100 (0: %d)", c.Attempts, notify.DefaultAttempts)
	}
	for _, f := range []struct {
		name, v string
		dst     *time.Duration
	}{{"timeout", c.Timeout, &out.Timeout}, {"backoff", c.Backoff, &out.Backoff}} {
		if f.v == "" {
			continue
		}
		d, err := time.ParseDuration(f.v)
		if err != nil || d <= 0 {
			return out, configErr("notify.%s %q: want a positive duration such as 10s", f.name, f.v)
		}
		*f.dst = d
	}
	return out, nil
}

// ConfigError is a configuration the service refuses: a value that is
// wrong or missing, or that contradicts another. Nothing was changed.
type ConfigError struct{ Err error }

func (e ConfigError) Error() string { return e.Err.Error() }
func (e ConfigError) Unwrap() error { return e.Err }

func configErr(format string, a ...any) error { return ConfigError{fmt.Errorf(format, a...)} }

// checked is what check derives from a Config.
type checked struct {
	setTimeout   time.Duration
	repoIdle     time.Duration
	nbdClientCAs *x509.CertPool // nil: NBD over TCP takes any client
	nbdTLS       *tls.Config    // nil: no --tls-cert
	apiTLS       *tls.Config    // nil: no TCP API
	apiIDs       *api.Identities
	socketGroup  *api.SocketGroup // nil: no --api-socket-group
	notify       notify.Config
	webIdle      time.Duration // 0: web.DefaultIdleTimeout
	webMaxAge    time.Duration // 0: web.DefaultMaxAge
}

// check checks every value of the configuration that can be checked
// without opening anything, so that a bad one is refused before a
// volume, socket or catalog is opened.
func (cfg Config) check() (c checked, err error) {
	if cfg.StateDir == "" || cfg.NBD.Socket == "" || cfg.APISocket == "" {
		return c, configErr("the state directory, the NBD socket and the API socket must be given")
	}
	if len(cfg.Volumes)+len(cfg.Reflink)+len(cfg.Btrfs)+len(cfg.LVMThin) == 0 {
		return c, ConfigError{errors.New("no volumes: give --volume NAME=PATH (or --reflink-volume / --btrfs-volume / --lvmthin-volume) or a --config file with [[volume]] tables")}
	}
	if cfg.NBD.Listen != "" && (cfg.NBD.TLSCert == "" || cfg.NBD.TLSKey == "") {
		return c, ConfigError{errors.New("--nbd-listen serves NBD on TCP, which requires TLS: give --tls-cert and --tls-key")}
	}
	if c.nbdClientCAs, err = nbdClientPool(cfg.NBD); err != nil {
		return c, err
	}
	for _, vc := range cfg.Volumes {
		if _, _, err := volumeSizes(vc); err != nil {
			return c, err
		}
		switch cow.Policy(vc.Policy) {
		case "", cow.PolicyDeleteOldest, cow.PolicyInvalidate:
		default:
			return c, configErr("volume %s: policy %q: want delete-oldest or invalidate", vc.Name, vc.Policy)
		}
	}
	switch cfg.HoldPrio {
	case "", "normal", "realtime":
	default:
		return c, configErr("--hold-priority %q: want realtime or normal", cfg.HoldPrio)
	}
	c.repoIdle = api.DefaultRepoIdle
	if cfg.RepoIdle != "" {
		if c.repoIdle, err = time.ParseDuration(cfg.RepoIdle); err != nil || c.repoIdle < 0 {
			return c, configErr("--repo-idle %q: want a duration like 30s, or 0 to close a repository when its last backup ends", cfg.RepoIdle)
		}
	}
	c.setTimeout = api.DefaultSetTimeout
	if cfg.SetTimeout != "" {
		if c.setTimeout, err = time.ParseDuration(cfg.SetTimeout); err != nil || c.setTimeout <= 0 {
			return c, configErr("--set-timeout %q: want a positive duration like 180s or 5m", cfg.SetTimeout)
		}
	}
	// The TCP API's certificate and tokens are checked before anything
	// is opened: a refusal leaves nothing behind.
	if c.apiTLS, c.apiIDs, err = apiTLS(cfg.API, cfg.Web.Listen != ""); err != nil {
		return c, err
	}
	if err := c.checkWeb(cfg.Web); err != nil {
		return c, err
	}
	if c.socketGroup, err = socketGroup(cfg.API.SocketGroup); err != nil {
		return c, err
	}
	if err := groupReaches(filepath.Dir(cfg.APISocket), c.socketGroup); err != nil {
		return c, err
	}
	if err := jobs.Check(cfg.Jobs); err != nil {
		return c, ConfigError{err}
	}
	if c.notify, err = cfg.Notify.notifyConfig(); err != nil {
		return c, err
	}
	if cfg.NBD.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.NBD.TLSCert, cfg.NBD.TLSKey)
		if err != nil {
			return c, configErr("TLS certificate: %w", err)
		}
		c.nbdTLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	return c, nil
}

// socketGroup looks up the group of --api-socket-group, by name or
// number (nil for "").
func socketGroup(name string) (*api.SocketGroup, error) {
	if name == "" {
		return nil, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		if g, err = user.LookupGroupId(name); err != nil {
			return nil, configErr("--api-socket-group %q: no such group: create it (groupadd %s) and add the users who may drive the service as operators (usermod -aG %s USER), or name another", name, name, name)
		}
	}
	gid, err := strconv.ParseUint(g.Gid, 10, 32)
	if err != nil {
		return nil, configErr("--api-socket-group %q: gid %q is not a number", name, g.Gid)
	}
	return &api.SocketGroup{Name: g.Name, GID: uint32(gid)}, nil
}

// groupReaches checks that the members of g can pass through dir, the
// API socket's directory, when it exists (one the service makes is
// given to g).
func groupReaches(dir string, g *api.SocketGroup) error {
	fi, err := os.Stat(dir)
	if g == nil || err != nil {
		return nil
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if perm := fi.Mode().Perm(); perm&0o001 != 0 || ok && st.Gid == g.GID && perm&0o010 != 0 {
		return nil
	}
	return configErr("--api-socket-group %s: its members cannot pass through the API socket's directory %s (mode %#o): give it to the group (chgrp %s %s; chmod g+x %s), or under systemd set RuntimeDirectoryMode=0755 (the sockets in it stay 0660)", g.Name, dir, fi.Mode().Perm(), g.Name, dir, dir)
}

// volumeSizes parses a volume's maximum storage and chunk size (0: the
// default).
func volumeSizes(vc VolumeConfig) (maxStorage, chunk int64, err error) {
	if vc.MaxStorage != "" {
		if maxStorage, err = size.Parse(vc.MaxStorage); err != nil {
			return 0, 0, configErr("volume %s: max storage: %w", vc.Name, err)
		}
	}
	if vc.ChunkSize != "" {
		if chunk, err = size.Parse(vc.ChunkSize); err != nil {
			return 0, 0, configErr("volume %s: chunk size: %w", vc.Name, err)
		}
		if err := size.CheckPow2("volume "+vc.Name+": chunk size", chunk, cow.MinChunkSize, cow.MaxChunkSize); err != nil {
			return 0, 0, ConfigError{err}
		}
	}
	return maxStorage, chunk, nil
}

// nbdClientPool checks the NBD settings and loads the CA of
// --nbd-tls-client-ca (nil without it).
func nbdClientPool(c NBDConfig) (*x509.CertPool, error) {
	if c.MaxConns < 0 {
		return nil, configErr("--nbd-max-connections %d: want a positive number (0: the default, %d)", c.MaxConns, nbd.DefaultMaxConns)
	}
	if c.ClientCA == "" {
		return nil, nil
	}
	if c.Listen == "" {
		return nil, ConfigError{errors.New("--nbd-tls-client-ca is for NBD over TCP: give --nbd-listen HOST:PORT (and --tls-cert, --tls-key) too")}
	}
	b, err := os.ReadFile(c.ClientCA)
	if err != nil {
		return nil, configErr("--nbd-tls-client-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, configErr("--nbd-tls-client-ca %s: no PEM certificate in it", c.ClientCA)
	}
	return pool, nil
}

// fuseDirFree refuses a --fuse-dir on which a FUSE filesystem is mounted
// and alive: mounting over it would hide another service's files from
// new openers (a dead one, left by kill -9, mountFUSE detaches).
func fuseDirFree(dir string) error {
	if dir == "" {
		return nil
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil
	}
	if _, err := os.Stat(abs); err != nil {
		return nil // absent, or dead (ENOTCONN): mountFUSE handles it
	}
	mounts, err := writer.ReadMounts()
	if err != nil {
		return nil
	}
	for _, m := range mounts {
		if m.Point == abs && strings.HasPrefix(m.FSType, "fuse") {
			return owner.Held("FUSE directory", abs, 0,
				"a FUSE filesystem (another umbra serve's?) is mounted there: give this one another --fuse-dir, or stop that service first")
		}
	}
	return nil
}

// apiTLS builds the TLS configuration and identities of the TCP API
// and the web console (nil, nil with neither; a nil configuration
// with identities: the console on plain HTTP).
func apiTLS(c APIConfig, web bool) (*tls.Config, *api.Identities, error) {
	if c.Listen == "" && !web {
		if c.TLSCert != "" || c.TLSKey != "" || c.ClientCA != "" || c.Tokens != "" {
			return nil, nil, ConfigError{errors.New("--api-tls-cert, --api-tls-key, --api-client-ca and --api-tokens are for the TCP API and the web console: give --api-listen HOST:PORT or --web-listen too")}
		}
		return nil, nil, nil
	}
	if c.Listen != "" && (c.TLSCert == "" || c.TLSKey == "" || c.Tokens == "") {
		return nil, nil, ConfigError{errors.New("--api-listen serves the API on TCP, which requires --api-tls-cert, --api-tls-key and --api-tokens (nothing is served unauthenticated on TCP)")}
	}
	if c.Tokens == "" {
		return nil, nil, ConfigError{errors.New("--web-listen: the console logs in with the API's identities: give --api-tokens (a tokens file, mode 0600, of `token TOKEN ROLE NAME` lines)")}
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		return nil, nil, ConfigError{errors.New("give both --api-tls-cert and --api-tls-key, or neither")}
	}
	if c.TLSCert == "" {
		if c.ClientCA != "" {
			return nil, nil, ConfigError{errors.New("--api-client-ca verifies client certificates over TLS: give --api-tls-cert and --api-tls-key too")}
		}
		ids, err := api.LoadIdentities(c.Tokens)
		if err != nil {
			return nil, nil, ConfigError{err}
		}
		return nil, ids, nil
	}
	cert, err := tls.LoadX509KeyPair(c.TLSCert, c.TLSKey)
	if err != nil {
		return nil, nil, configErr("--api-tls-cert/--api-tls-key: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if c.ClientCA != "" {
		pem, err := os.ReadFile(c.ClientCA)
		if err != nil {
			return nil, nil, configErr("--api-client-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, nil, configErr("--api-client-ca %s: no PEM certificate in it", c.ClientCA)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.VerifyClientCertIfGiven
	}
	ids, err := api.LoadIdentities(c.Tokens)
	if err != nil {
		return nil, nil, ConfigError{err}
	}
	return cfg, ids, nil
}

// checkWeb checks the web console's settings.
func (c *checked) checkWeb(w WebConfig) error {
	if w.Listen == "" {
		if w.IdleTimeout != "" || w.MaxAge != "" || len(w.Repositories) > 0 {
			return ConfigError{errors.New("[web] idle_timeout, session_max_age and repository are for the web console: give --web-listen (or [web] listen) too")}
		}
		return nil
	}
	if err := web.CheckListen(w.Listen, c.apiTLS != nil); err != nil {
		return ConfigError{err}
	}
	for _, d := range []struct {
		name, v string
		dst     *time.Duration
	}{{"idle_timeout", w.IdleTimeout, &c.webIdle}, {"session_max_age", w.MaxAge, &c.webMaxAge}} {
		if d.v == "" {
			continue
		}
		v, err := time.ParseDuration(d.v)
		if err != nil || v <= 0 {
			return configErr("[web] %s %q: want a positive duration such as 15m or 8h", d.name, d.v)
		}
		*d.dst = v
	}
	idle, max := cmp.Or(c.webIdle, web.DefaultIdleTimeout), cmp.Or(c.webMaxAge, web.DefaultMaxAge)
	if idle > max {
		return configErr("[web] idle_timeout %s is longer than session_max_age %s: give a shorter idle_timeout or a longer session_max_age", idle, max)
	}
	for i, r := range w.Repositories {
		if r.Location == "" {
			return configErr("[[web.repository]] %d has no location: give location = \"/path/to/repo\" (or an s3:// location)", i+1)
		}
	}
	return nil
}
