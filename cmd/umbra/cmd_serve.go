package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"umbra/api"
	"umbra/catalog"
	"umbra/coordinator"
	"umbra/cow"
	"umbra/frontend"
	"umbra/internal/owner"
	"umbra/internal/rtprio"
	"umbra/metrics"
	"umbra/nbd"
	"umbra/provider"
	"umbra/provider/btrfs"
	"umbra/provider/lvmthin"
	"umbra/provider/reflink"
	"umbra/writer"
	wexec "umbra/writer/exec"
	"umbra/writer/fsfreeze"
	wsqlite "umbra/writer/sqlite"
)

func init() { verbs = append(verbs, newServeCmd) }

// serveConfig is the TOML configuration of `umbra serve`; flags override
// it and embedded defaults fill the rest.
type serveConfig struct {
	StateDir   string         `toml:"state_dir"`
	ExposeDir  string         `toml:"expose_dir"`    // where exposed snapshots are mounted
	SetTimeout string         `toml:"set_timeout"`   // FSRVP message sequence timer
	HoldPrio   string         `toml:"hold_priority"` // normal (default) or realtime
	API        apiConfig      `toml:"api"`
	Metrics    string         `toml:"metrics_listen"`
	AuditLog   string         `toml:"audit_log"`
	Writers    writersConfig  `toml:"writers"`
	Reflink    []string       `toml:"reflink_volumes"`
	Btrfs      []string       `toml:"btrfs_volumes"`
	LVMThin    []string       `toml:"lvmthin_volumes"`
	NBD        nbdConfig      `toml:"nbd"`
	FUSE       fuseConfig     `toml:"fuse"`
	Volumes    []volumeConfig `toml:"volume"`
}

type apiConfig struct {
	Listen   string `toml:"listen"`    // TCP HOST:PORT (TLS required)
	TLSCert  string `toml:"tls_cert"`  // server certificate
	TLSKey   string `toml:"tls_key"`   //
	ClientCA string `toml:"client_ca"` // verify client certificates against it
	Tokens   string `toml:"tokens"`    // identities: bearer tokens and certificate names with roles
}

type nbdConfig struct {
	Socket   string `toml:"socket"`
	Listen   string `toml:"listen"`
	TLSCert  string `toml:"tls_cert"`
	TLSKey   string `toml:"tls_key"`
	ClientCA string `toml:"client_ca"`       // TCP clients need a certificate it signed
	MaxConns int    `toml:"max_connections"` // per listener (default nbd.DefaultMaxConns)
}

type writersConfig struct {
	SQLite   []string `toml:"sqlite"`
	HooksDir string   `toml:"hooks_dir"`
}

type fuseConfig struct {
	Dir string `toml:"dir"`
}

type volumeConfig struct {
	Name       string `toml:"name"`
	Path       string `toml:"path"`
	Storage    string `toml:"storage"`
	MaxStorage string `toml:"max_storage"`
	ChunkSize  string `toml:"chunk_size"`
	Policy     string `toml:"policy"`
}

// defaultStateDir is /var/lib/umbra for root, else the XDG state dir.
func defaultStateDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/umbra"
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "umbra")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".local", "state", "umbra")
}

// defaultRuntimeDir holds sockets: /run/umbra for root, else
// $XDG_RUNTIME_DIR/umbra.
func defaultRuntimeDir() string {
	if os.Geteuid() == 0 {
		return "/run/umbra"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "umbra")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("umbra-%d", os.Getuid()))
}

func newServeCmd() *cobra.Command {
	var (
		cfgFile string
		cfg     serveConfig
		vols    []string
		def     volumeConfig
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the Umbra service: serve volumes and their shadow copies over NBD (and FUSE)",
		Long: `serve opens the volumes given with --volume NAME=PATH (a file or block
device) or in the TOML file of --config, protects them with copy-on-write
snapshots kept in shadow storage, and serves each volume read-write as the
NBD export NAME and each live snapshot read-only as NAME@SNAPSHOT, on a unix
socket (and on TCP with TLS when --nbd-listen is given).

SIGTERM or SIGINT drains requests in flight, flushes and exits.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// A size flag given empty is a mistake, not the default.
			for _, name := range []string{"max-storage", "chunk-size"} {
				if f := cmd.Flags().Lookup(name); f.Changed && strings.TrimSpace(f.Value.String()) == "" {
					return usageError{fmt.Errorf("--%s: size is empty: %s", name, sizeSyntax)}
				}
			}
			if cfgFile != "" {
				var file serveConfig
				md, err := toml.DecodeFile(cfgFile, &file)
				if err != nil {
					return usageError{fmt.Errorf("config %s: %w", cfgFile, err)}
				}
				if und := md.Undecoded(); len(und) > 0 {
					return usageError{fmt.Errorf("config %s: unknown keys %v", cfgFile, und)}
				}
				mergeConfig(&file, &cfg, cmd)
				cfg = file
			}
			for _, v := range vols {
				name, path, ok := strings.Cut(v, "=")
				if !ok || name == "" || path == "" {
					return usageError{fmt.Errorf("--volume %q: want NAME=PATH", v)}
				}
				vc := def
				vc.Name, vc.Path = name, path
				cfg.Volumes = append(cfg.Volumes, vc)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return runServe(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfgFile, "config", "", "TOML configuration file")
	f.StringVar(&cfg.StateDir, "state-dir", "", "state directory (default /var/lib/umbra as root, else $XDG_STATE_HOME/umbra)")
	f.StringArrayVar(&vols, "volume", nil, "volume to serve as NAME=PATH (file or block device); repeatable")
	f.StringVar(&def.Storage, "storage", "", "shadow storage directory for --volume volumes (default STATE/shadow)")
	f.StringVar(&def.MaxStorage, "max-storage", "", "maximum shadow storage per volume, e.g. 10G (default unlimited)")
	f.StringVar(&def.ChunkSize, "chunk-size", "", "copy-on-write chunk size, 4K to 1M (default 4K)")
	f.StringVar(&def.Policy, "policy", "", "when shadow storage is full: delete-oldest (default) or invalidate")
	f.StringVar(&cfg.NBD.Socket, "nbd-socket", "", "NBD unix socket (default /run/umbra/nbd.sock as root)")
	f.StringVar(&cfg.NBD.Listen, "nbd-listen", "", "also serve NBD on TCP HOST:PORT (requires --tls-cert and --tls-key)")
	f.StringVar(&cfg.NBD.TLSCert, "tls-cert", "", "TLS certificate file for NBD over TCP")
	f.StringVar(&cfg.NBD.TLSKey, "tls-key", "", "TLS key file for NBD over TCP")
	f.IntVar(&cfg.NBD.MaxConns, "nbd-max-connections", 0, fmt.Sprintf("NBD connections served at once per listener; one more is closed (default %d; each holds at most %d MiB of buffers)", nbd.DefaultMaxConns, nbd.DefaultConnBuffer>>20))
	f.StringVar(&cfg.NBD.ClientCA, "nbd-tls-client-ca", "", "CA that signs the client certificates NBD over TCP requires (recommended: without it any client that trusts --tls-cert may write)")
	f.StringVar(&cfg.FUSE.Dir, "fuse-dir", "", "also mount a FUSE directory with each volume and snapshot as a file")
	f.StringArrayVar(&cfg.Reflink, "reflink-volume", nil, "a file on XFS (reflink=1) or btrfs to snapshot by cloning (shadow storage: .umbra-shadow beside it); repeatable")
	f.StringArrayVar(&cfg.Btrfs, "btrfs-volume", nil, "a btrfs subvolume to snapshot natively (snapshots: .umbra-snapshots beside it); repeatable")
	f.StringArrayVar(&cfg.LVMThin, "lvmthin-volume", nil, "an LVM thin LV, VG/LV, to snapshot natively (thin snapshots in its pool); repeatable")
	f.StringArrayVar(&cfg.Writers.SQLite, "sqlite-writer", nil, "SQLite database to quiesce for application-consistent snapshots; repeatable")
	f.StringVar(&cfg.Writers.HooksDir, "hooks-dir", "", "directory of pre-freeze/post-thaw hook executables (called with freeze / thaw)")
	f.StringVar(&cfg.ExposeDir, "expose-dir", "", "where exposed snapshots are mounted (default STATE/exposed)")
	f.StringVar(&cfg.SetTimeout, "set-timeout", "", "abort a shadow copy set that does not reach its next state in this time (default 180s, as FSRVP)")
	f.StringVar(&cfg.HoldPrio, "hold-priority", "", "normal (default), or realtime: while a snapshot holds writes, run at SCHED_FIFO (50 ms a hold, 5% of the time; not with CPU-bound work such as backups in the service)")
	f.StringVar(&cfg.API.Listen, "api-listen", "", "also serve the API on TCP HOST:PORT (TLS and --api-tokens required)")
	f.StringVar(&cfg.API.TLSCert, "api-tls-cert", "", "TLS certificate for --api-listen")
	f.StringVar(&cfg.API.TLSKey, "api-tls-key", "", "TLS key for --api-listen")
	f.StringVar(&cfg.API.ClientCA, "api-client-ca", "", "CA that signs client certificates for --api-listen (identities: cert lines of --api-tokens)")
	f.StringVar(&cfg.API.Tokens, "api-tokens", "", "identities file for --api-listen, mode 0600: `token TOKEN ROLE NAME` / `cert CN ROLE` lines; roles viewer, operator, admin")
	f.StringVar(&cfg.Metrics, "metrics-listen", "", "serve Prometheus metrics at http://HOST:PORT/metrics")
	f.StringVar(&cfg.AuditLog, "audit-log", "", "audit log of mutating API calls (default STATE/audit.log)")
	return cmd
}

// mergeConfig copies the flags the user set onto the file's config.
func mergeConfig(file, flags *serveConfig, cmd *cobra.Command) {
	set := func(name string, dst *string, v string) {
		if cmd.Flags().Changed(name) {
			*dst = v
		}
	}
	set("state-dir", &file.StateDir, flags.StateDir)
	set("nbd-socket", &file.NBD.Socket, flags.NBD.Socket)
	set("nbd-listen", &file.NBD.Listen, flags.NBD.Listen)
	set("tls-cert", &file.NBD.TLSCert, flags.NBD.TLSCert)
	set("tls-key", &file.NBD.TLSKey, flags.NBD.TLSKey)
	set("nbd-tls-client-ca", &file.NBD.ClientCA, flags.NBD.ClientCA)
	if cmd.Flags().Changed("nbd-max-connections") {
		file.NBD.MaxConns = flags.NBD.MaxConns
	}
	set("fuse-dir", &file.FUSE.Dir, flags.FUSE.Dir)
	set("hooks-dir", &file.Writers.HooksDir, flags.Writers.HooksDir)
	set("expose-dir", &file.ExposeDir, flags.ExposeDir)
	set("set-timeout", &file.SetTimeout, flags.SetTimeout)
	set("hold-priority", &file.HoldPrio, flags.HoldPrio)
	set("api-listen", &file.API.Listen, flags.API.Listen)
	set("api-tls-cert", &file.API.TLSCert, flags.API.TLSCert)
	set("api-tls-key", &file.API.TLSKey, flags.API.TLSKey)
	set("api-client-ca", &file.API.ClientCA, flags.API.ClientCA)
	set("api-tokens", &file.API.Tokens, flags.API.Tokens)
	set("metrics-listen", &file.Metrics, flags.Metrics)
	set("audit-log", &file.AuditLog, flags.AuditLog)
	if cmd.Flags().Changed("sqlite-writer") {
		file.Writers.SQLite = append(file.Writers.SQLite, flags.Writers.SQLite...)
	}
}

// openVolumes opens every configured volume into a COW provider.
func openVolumes(cfg serveConfig, log *slog.Logger) (*cow.Provider, error) {
	p := cow.NewProvider()
	for _, vc := range cfg.Volumes {
		opts := cow.Options{Policy: cow.Policy(vc.Policy)}
		opts.StorageDir = vc.Storage
		if opts.StorageDir == "" {
			opts.StorageDir = filepath.Join(cfg.StateDir, "shadow")
		}
		var err error
		if opts.MaxStorage, err = parseSizeFlag("volume "+vc.Name+": max storage", vc.MaxStorage, vc.MaxStorage != ""); err != nil {
			return p, err
		}
		if opts.ChunkSize, err = parseSizeFlag("volume "+vc.Name+": chunk size", vc.ChunkSize, vc.ChunkSize != ""); err != nil {
			return p, err
		}
		v, err := cow.Open(vc.Name, vc.Path, opts)
		if err != nil {
			return p, err
		}
		for _, rerr := range v.RecoveryErrors() {
			log.Warn("volume recovered with problems", "volume", vc.Name, "err", rerr)
		}
		if err := p.Add(v); err != nil {
			v.Close()
			return p, usageError{err}
		}
		log.Info("volume open", "volume", vc.Name, "origin", vc.Path, "size", v.Size(), "chunk", v.ChunkSize(),
			"storage", opts.StorageDir, "snapshots", len(v.Snapshots()))
	}
	return p, nil
}

func closeVolumes(p *cow.Provider, log *slog.Logger) {
	for _, v := range p.Volumes() {
		if err := v.Close(); err != nil {
			log.Error("close volume", "volume", v.Name(), "err", err)
		}
	}
}

func runServe(ctx context.Context, cfg serveConfig) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if cfg.StateDir == "" {
		cfg.StateDir = defaultStateDir()
	}
	if cfg.NBD.Socket == "" {
		cfg.NBD.Socket = filepath.Join(defaultRuntimeDir(), "nbd.sock")
	}
	if len(cfg.Volumes)+len(cfg.Reflink)+len(cfg.Btrfs)+len(cfg.LVMThin) == 0 {
		return usageError{errors.New("no volumes: give --volume NAME=PATH (or --reflink-volume / --btrfs-volume / --lvmthin-volume) or a --config file with [[volume]] tables")}
	}
	if cfg.NBD.Listen != "" && (cfg.NBD.TLSCert == "" || cfg.NBD.TLSKey == "") {
		return usageError{errors.New("--nbd-listen serves NBD on TCP, which requires TLS: give --tls-cert and --tls-key")}
	}
	nbdClientCAs, err := nbdClientPool(cfg.NBD)
	if err != nil {
		return err
	}
	setTimeout, err := checkServeConfig(cfg)
	if err != nil {
		return err
	}
	switch cfg.HoldPrio {
	case "realtime":
		rtprio.SetEnabled(true)
		if err := rtprio.Probe(); err != nil {
			log.Warn("hold_priority realtime: holds run at normal priority; give the service CAP_SYS_NICE", "err", err)
		}
	case "", "normal":
		rtprio.SetEnabled(false)
	default:
		return usageError{fmt.Errorf("--hold-priority %q: want realtime or normal", cfg.HoldPrio)}
	}
	// The TCP API's certificate and tokens are checked before anything
	// is opened: a refusal leaves nothing behind.
	apiTLSCfg, apiIDs, err := apiTLS(cfg.API)
	if err != nil {
		return err
	}
	// One owner (DESIGN invariant 10): the state directory, then the
	// sockets, then (openVolumes) each volume file and shadow storage
	// directory are claimed before anything is changed, so a second
	// service is refused with nothing of the first's touched.
	stateOwn, err := owner.ClaimDir(cfg.StateDir, "state directory",
		"another umbra serve runs with it: use that service, or stop it first, or give this one its own --state-dir (and --nbd-socket, --api-socket)")
	if err != nil {
		return err
	}
	defer stateOwn.Release()
	apiPath := apiSocketPath()
	for _, sock := range []struct{ path, what, flag string }{
		{cfg.NBD.Socket, "NBD socket", "--nbd-socket"},
		{apiPath, "API socket", "--api-socket"},
		{filepath.Join(filepath.Dir(apiPath), "writers.sock"), "writer socket", "--api-socket (the writer socket is beside it)"},
	} {
		if err := socketFree(sock.path, sock.what, sock.flag); err != nil {
			return err
		}
	}
	if err := fuseDirFree(cfg.FUSE.Dir); err != nil {
		return err
	}
	p, err := openVolumes(cfg, log)
	defer closeVolumes(p, log)
	if err != nil {
		return err
	}
	m := metrics.New(p)
	clients := &frontend.Clients{} // which processes (kernel nbd devices among them) use which export
	opts := nbd.Options{Logger: log, Observe: m.NBD, MaxConns: cfg.NBD.MaxConns, Attached: clients.Attached}
	if cfg.NBD.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.NBD.TLSCert, cfg.NBD.TLSKey)
		if err != nil {
			return usageError{fmt.Errorf("TLS certificate: %w", err)}
		}
		opts.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	reg := &provider.Registry{}
	reg.Register(p)
	rp, bp := reflink.New(), btrfs.New()
	defer rp.Close()
	defer bp.Close()
	reg.Register(rp)
	reg.Register(bp)
	for _, f := range cfg.Reflink {
		if err := rp.Add(reflink.Volume{Path: f, StorageDir: filepath.Join(filepath.Dir(f), ".umbra-shadow")}); err != nil {
			return usageError{err}
		}
		log.Info("reflink volume", "file", f)
	}
	for _, sv := range cfg.Btrfs {
		if err := bp.Add(sv, filepath.Join(filepath.Dir(sv), ".umbra-snapshots", filepath.Base(sv))); err != nil {
			return usageError{err}
		}
		log.Info("btrfs subvolume volume", "subvolume", sv)
	}
	lp := lvmthin.New()
	reg.Register(lp)
	for _, lv := range cfg.LVMThin {
		if err := lp.Add(ctx, lv); err != nil {
			return usageError{err}
		}
		log.Info("LVM thin volume", "lv", lv)
	}
	srv := nbd.NewServer(frontend.NBDExports(p, reg), opts)
	m.WatchNBD(srv)
	if err := os.MkdirAll(filepath.Dir(cfg.NBD.Socket), 0o750); err != nil {
		return fmt.Errorf("NBD socket directory: %w", err)
	}
	os.Remove(cfg.NBD.Socket)
	ul, err := net.Listen("unix", cfg.NBD.Socket)
	if err != nil {
		return fmt.Errorf("NBD socket %s: %w", cfg.NBD.Socket, err)
	}
	os.Chmod(cfg.NBD.Socket, 0o660)
	errc := make(chan error, 3)
	go func() { errc <- srv.Serve(ctx, ul) }()
	// TCP listeners are bound before the API socket appears, so that a
	// client that waits for the socket finds every listener up.
	var tl, ml net.Listener
	if cfg.API.Listen != "" {
		if tl, err = net.Listen("tcp", cfg.API.Listen); err != nil {
			return fmt.Errorf("--api-listen %s: %w", cfg.API.Listen, err)
		}
		defer tl.Close()
	}
	if cfg.Metrics != "" {
		if ml, err = net.Listen("tcp", cfg.Metrics); err != nil {
			return fmt.Errorf("--metrics-listen %s: %w", cfg.Metrics, err)
		}
		defer ml.Close()
	}
	os.Remove(apiPath)
	al, err := net.Listen("unix", apiPath)
	if err != nil {
		return fmt.Errorf("API socket %s: %w", apiPath, err)
	}
	os.Chmod(apiPath, 0o660)
	defer os.Remove(apiPath)
	writers := writer.NewRegistry()
	var apiSrv *api.Server // set below, before any snapshot set can run
	writers.OnFailure = func(w, phase string) {
		m.WriterFailed(w, phase)
		if apiSrv != nil {
			apiSrv.WriterFailed(w, phase)
		}
	}
	ff := fsfreeze.New()
	if exe, err := os.Executable(); err == nil {
		ff.GuardCommand = []string{exe, "thaw-guard"}
	}
	writers.Add(ff)
	for _, db := range cfg.Writers.SQLite {
		if err := writers.Add(wsqlite.New(db)); err != nil {
			return usageError{err}
		}
	}
	if cfg.Writers.HooksDir != "" {
		writers.Add(wexec.New(cfg.Writers.HooksDir, 0))
	}
	// A volume reaches the kernel as its FUSE file (under a loop device)
	// and as the nbd devices connected to its export.
	devices := func(vol string) []string {
		var out []string
		if cfg.FUSE.Dir != "" {
			out = append(out, filepath.Join(cfg.FUSE.Dir, vol))
		}
		return append(out, writer.NBDDevices(clients.PIDs(vol))...)
	}
	coord := coordinator.New(reg, writers, devices, log)
	writerSock := filepath.Join(filepath.Dir(apiPath), "writers.sock")
	go func() {
		if err := writer.Serve(ctx, writerSock, writers, log); err != nil {
			errc <- err
		}
	}()
	defer os.Remove(writerSock)
	log.Info("accepting out-of-process writers", "socket", writerSock)
	log.Info("serving NBD", "socket", cfg.NBD.Socket, "exports", frontend.Names(p))
	if cfg.NBD.Listen != "" {
		tl, err := net.Listen("tcp", cfg.NBD.Listen)
		if err != nil {
			return fmt.Errorf("NBD listen %s: %w", cfg.NBD.Listen, err)
		}
		tcpTLS := opts.TLS.Clone()
		if nbdClientCAs != nil {
			tcpTLS.ClientCAs, tcpTLS.ClientAuth = nbdClientCAs, tls.RequireAndVerifyClientCert
		} else {
			log.Warn("NBD over TCP without client certificates: any client that trusts the server certificate can read and write every volume; give --nbd-tls-client-ca")
		}
		tcpSrv := nbd.NewServer(frontend.NBDExports(p, reg), nbd.Options{Logger: log, TLS: tcpTLS, RequireTLS: true, Observe: m.NBD, MaxConns: cfg.NBD.MaxConns})
		m.WatchNBD(tcpSrv)
		go func() { errc <- tcpSrv.Serve(ctx, tl) }()
		defer tcpSrv.Shutdown(context.Background())
		log.Info("serving NBD over TLS", "listen", tl.Addr().String())
	}
	if cfg.FUSE.Dir != "" {
		unmount, err := mountFUSE(ctx, cfg.FUSE.Dir, p, log)
		if err != nil {
			return err
		}
		defer unmount()
	}
	apiSrv = api.NewServer(p, reg, coord, writers, log)
	cat, err := catalog.Open(filepath.Join(cfg.StateDir, "catalog.db"))
	if err != nil {
		return err
	}
	exposeDir := cfg.ExposeDir
	if exposeDir == "" {
		exposeDir = filepath.Join(cfg.StateDir, "exposed")
	}
	apiSrv.EnableShares(ctx, cat, exposeDir, cfg.FUSE.Dir, setTimeout)
	defer apiSrv.CloseShares()
	defer apiSrv.CloseRepos()
	apiSrv.Metrics = m
	auditPath := cfg.AuditLog
	if auditPath == "" {
		auditPath = filepath.Join(cfg.StateDir, "audit.log")
	}
	if apiSrv.Audit, err = api.OpenAudit(auditPath); err != nil {
		return err
	}
	defer apiSrv.Audit.Close()
	go func() { errc <- apiSrv.Serve(ctx, al) }()
	log.Info("serving the management API", "socket", apiPath, "audit", auditPath)
	if tl != nil {
		go func() { errc <- apiSrv.ServeTCP(ctx, tl, apiTLSCfg, apiIDs) }()
		log.Info("serving the management API over TLS", "listen", tl.Addr().String(), "client_certs", cfg.API.ClientCA != "")
	}
	if ml != nil {
		go func() {
			if err := m.Serve(ctx, ml); err != nil {
				log.Error("metrics listener stopped", "err", err)
			}
		}()
		log.Info("serving metrics", "url", "http://"+ml.Addr().String()+"/metrics")
	}
	select {
	case <-ctx.Done():
	case err := <-errc:
		if !errors.Is(err, nbd.ErrServerClosed) {
			log.Error("NBD server stopped", "err", err)
		}
	}
	log.Info("shutting down: draining requests and flushing")
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	os.Remove(cfg.NBD.Socket)
	return nil
}

// nbdClientPool checks the NBD settings and loads the CA of
// --nbd-tls-client-ca (nil without it).
func nbdClientPool(c nbdConfig) (*x509.CertPool, error) {
	if c.MaxConns < 0 {
		return nil, usageError{fmt.Errorf("--nbd-max-connections %d: want a positive number (0: the default, %d)", c.MaxConns, nbd.DefaultMaxConns)}
	}
	if c.ClientCA == "" {
		return nil, nil
	}
	if c.Listen == "" {
		return nil, usageError{errors.New("--nbd-tls-client-ca is for NBD over TCP: give --nbd-listen HOST:PORT (and --tls-cert, --tls-key) too")}
	}
	b, err := os.ReadFile(c.ClientCA)
	if err != nil {
		return nil, usageError{fmt.Errorf("--nbd-tls-client-ca: %w", err)}
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, usageError{fmt.Errorf("--nbd-tls-client-ca %s: no PEM certificate in it", c.ClientCA)}
	}
	return pool, nil
}

// socketFree refuses a unix socket path that a running process answers
// on: serve replaces the socket file, and would take it from another
// service. A socket file nobody listens on (left by a killed service) is
// free. The holder's pid is the listener's, from SO_PEERCRED.
func socketFree(path, what, flag string) error {
	c, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		return nil
	}
	defer c.Close()
	pid := 0
	if uc, ok := c.(*net.UnixConn); ok {
		if raw, err := uc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
					pid = int(cred.Pid)
				}
			})
		}
	}
	return owner.Held(what, path, pid, fmt.Sprintf("another service listens there: use it, or stop it first, or give this one another %s", flag))
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
// (nil, nil without --api-listen).
func apiTLS(c apiConfig) (*tls.Config, *api.Identities, error) {
	if c.Listen == "" {
		if c.TLSCert != "" || c.TLSKey != "" || c.ClientCA != "" || c.Tokens != "" {
			return nil, nil, usageError{errors.New("--api-tls-cert, --api-tls-key, --api-client-ca and --api-tokens are for the TCP API: give --api-listen HOST:PORT too")}
		}
		return nil, nil, nil
	}
	if c.TLSCert == "" || c.TLSKey == "" || c.Tokens == "" {
		return nil, nil, usageError{errors.New("--api-listen serves the API on TCP, which requires --api-tls-cert, --api-tls-key and --api-tokens (nothing is served unauthenticated on TCP)")}
	}
	cert, err := tls.LoadX509KeyPair(c.TLSCert, c.TLSKey)
	if err != nil {
		return nil, nil, usageError{fmt.Errorf("--api-tls-cert/--api-tls-key: %w", err)}
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if c.ClientCA != "" {
		pem, err := os.ReadFile(c.ClientCA)
		if err != nil {
			return nil, nil, usageError{fmt.Errorf("--api-client-ca: %w", err)}
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, nil, usageError{fmt.Errorf("--api-client-ca %s: no PEM certificate in it", c.ClientCA)}
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.VerifyClientCertIfGiven
	}
	ids, err := api.LoadIdentities(c.Tokens)
	if err != nil {
		return nil, nil, usageError{err}
	}
	return cfg, ids, nil
}
