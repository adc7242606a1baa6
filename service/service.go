// Package service assembles the Umbra daemon: it opens the configured
// volumes and snapshot providers, and serves them over NBD (unix socket
// and TCP with TLS), FUSE, the management API (unix socket and TCP with
// TLS), the writer socket and Prometheus metrics, and runs the jobs of
// its config (package jobs) on their schedules. It owns every one of
// those servers: Run waits for all of them, a failure of one stops the
// rest and is returned named by what failed, and Close takes everything
// down in order (NBD clients drained first, volumes closed last) and
// leaves no goroutine behind. `umbra serve` parses its flags and TOML
// file into a Config and runs a Service; features that live in the
// daemon plug in here.
package service

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"umbra/api"
	"umbra/catalog"
	"umbra/coordinator"
	"umbra/cow"
	"umbra/filebrowse"
	"umbra/frontend"
	"umbra/fusefile"
	"umbra/internal/owner"
	"umbra/internal/rtprio"
	"umbra/jobs"
	"umbra/metrics"
	"umbra/nbd"
	"umbra/notify"
	"umbra/provider"
	"umbra/provider/btrfs"
	"umbra/provider/lvmthin"
	"umbra/provider/reflink"
	"umbra/web"
	"umbra/writer"
	wexec "umbra/writer/exec"
	"umbra/writer/fsfreeze"
	wsqlite "umbra/writer/sqlite"
)

// DrainTimeout bounds how long Run waits, once stopping, for NBD
// requests in flight before it closes the connections.
const DrainTimeout = 30 * time.Second

// notifyDrain bounds how long Close waits for alerts still queued.
const notifyDrain = 10 * time.Second

// Service is one Umbra daemon. New opens it, Run serves until the
// context ends or a server fails, Close releases it.
type Service struct {
	cfg Config
	chk checked
	log *slog.Logger

	stateOwn *owner.Dir
	vols     *cow.Provider
	rp       *reflink.Provider
	bp       *btrfs.Provider
	lp       *lvmthin.Provider
	reg      *provider.Registry
	clients  *frontend.Clients // which processes (kernel nbd devices among them) use which export
	metrics  *metrics.Metrics
	nbdUnix  *nbd.Server
	nbdTCP   *nbd.Server // nil without NBD.Listen
	writers  *writer.Registry
	coord    *coordinator.Coordinator
	api      *api.Server
	cat      *catalog.Catalog // owned by api once shares are enabled
	shares   bool             // api.EnableShares ran: CloseShares closes cat
	audit    *api.Audit
	notify   *notify.Notifier
	jobs     *jobs.Manager
	live     *liveRestores    // volumes restored live (umbra restore --live)
	fuse     *fusefile.Server // nil without FUSE.Dir
	fuseDone chan struct{}    // closed when the FUSE mount is gone
	web      *web.Server      // nil without Web.Listen

	mu      sync.Mutex          // guards the fields below
	running bool                // Run was called
	stop    context.CancelFunc  // ends a Run in progress
	ran     chan struct{}       // closed when Run returns
	closed  bool                // Close ran
	browser *filebrowse.Browser // made by Browser at its first use
	webAddr net.Addr            // the web console's listener, once Run bound it
}

// New checks cfg, claims the state directory and sockets (a second
// service is refused with nothing of the first's touched), opens the
// volumes and providers, mounts the FUSE directory and restores the
// shares and writers the catalog keeps. It binds no listener: Run does.
// A refused configuration is a ConfigError.
func New(ctx context.Context, cfg Config) (s *Service, err error) {
	s = &Service{cfg: cfg, log: cfg.Logger}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.chk, err = cfg.check(); err != nil {
		return nil, err
	}
	log := s.log
	if cfg.HoldPrio == "realtime" {
		rtprio.SetEnabled(true)
		if err := rtprio.Probe(); err != nil {
			log.Warn("hold_priority realtime: holds run at normal priority; give the service CAP_SYS_NICE", "err", err)
		}
	} else {
		rtprio.SetEnabled(false)
	}
	defer func() {
		if err != nil {
			s.teardown()
			s = nil
		}
	}()
	// One owner (DESIGN invariant 10): the state directory, then the
	// sockets, then (openVolumes) each volume file and shadow storage
	// directory are claimed before anything is changed, so a second
	// service is refused with nothing of the first's touched.
	if s.stateOwn, err = owner.ClaimDir(cfg.StateDir, "state directory",
		"another umbra serve runs with it: use that service, or stop it first, or give this one its own --state-dir (and --nbd-socket, --api-socket)"); err != nil {
		return s, err
	}
	for _, sock := range []struct{ path, what, flag string }{
		{cfg.NBD.Socket, "NBD socket", "--nbd-socket"},
		{cfg.APISocket, "API socket", "--api-socket"},
		{s.writerSocket(), "writer socket", "--api-socket (the writer socket is beside it)"},
		{s.webSocket(), "web console socket", "--web-listen unix:PATH"},
	} {
		if sock.path == "" {
			continue
		}
		if err := owner.SocketFree(sock.path, sock.what, sock.flag); err != nil {
			return s, err
		}
	}
	if err := fuseDirFree(cfg.FUSE.Dir); err != nil {
		return s, err
	}
	s.vols = cow.NewProvider()
	if err := s.openVolumes(); err != nil {
		return s, err
	}
	s.live = newLiveRestores(s)
	if err := s.live.open(); err != nil {
		return s, err
	}
	s.metrics = metrics.New(s.vols)
	s.reg = &provider.Registry{}
	s.reg.Register(s.vols)
	s.rp, s.bp = reflink.New(), btrfs.New()
	s.reg.Register(s.rp)
	s.reg.Register(s.bp)
	for _, f := range cfg.Reflink {
		if err := s.rp.Add(reflink.Volume{Path: f, StorageDir: filepath.Join(filepath.Dir(f), ".umbra-shadow")}); err != nil {
			return s, ConfigError{err}
		}
		log.Info("reflink volume", "file", f)
	}
	for _, sv := range cfg.Btrfs {
		if err := s.bp.Add(sv, filepath.Join(filepath.Dir(sv), ".umbra-snapshots", filepath.Base(sv))); err != nil {
			return s, ConfigError{err}
		}
		log.Info("btrfs subvolume volume", "subvolume", sv)
	}
	s.lp = lvmthin.New()
	s.reg.Register(s.lp)
	for _, lv := range cfg.LVMThin {
		if err := s.lp.Add(ctx, lv); err != nil {
			return s, ConfigError{err}
		}
		log.Info("LVM thin volume", "lv", lv)
	}
	s.clients = &frontend.Clients{}
	s.nbdUnix = nbd.NewServer(frontend.NBDExports(s.vols, s.reg), nbd.Options{Logger: log, TLS: s.chk.nbdTLS, Observe: s.metrics.NBD, MaxConns: cfg.NBD.MaxConns, Attached: s.clients.Attached})
	s.metrics.WatchNBD(s.nbdUnix)
	if cfg.NBD.Listen != "" {
		tcpTLS := s.chk.nbdTLS.Clone()
		if s.chk.nbdClientCAs != nil {
			tcpTLS.ClientCAs, tcpTLS.ClientAuth = s.chk.nbdClientCAs, tls.RequireAndVerifyClientCert
		} else {
			log.Warn("NBD over TCP without client certificates: any client that trusts the server certificate can read and write every volume; give --nbd-tls-client-ca")
		}
		s.nbdTCP = nbd.NewServer(frontend.NBDExports(s.vols, s.reg), nbd.Options{Logger: log, TLS: tcpTLS, RequireTLS: true, Observe: s.metrics.NBD, MaxConns: cfg.NBD.MaxConns})
		s.metrics.WatchNBD(s.nbdTCP)
	}
	if err := s.openWriters(); err != nil {
		return s, err
	}
	// A volume reaches the kernel as its FUSE file (under a loop device)
	// and as the nbd devices connected to its export.
	devices := func(vol string) []string {
		var out []string
		if cfg.FUSE.Dir != "" {
			out = append(out, filepath.Join(cfg.FUSE.Dir, vol))
		}
		return append(out, writer.NBDDevices(s.clients.PIDs(vol))...)
	}
	s.coord = coordinator.New(s.reg, s.writers, devices, log)
	if cfg.FUSE.Dir != "" {
		if err := s.mountFUSE(); err != nil {
			return s, err
		}
	}
	s.api = api.NewServer(s.vols, s.reg, s.coord, s.writers, log)
	if s.cat, err = catalog.Open(filepath.Join(cfg.StateDir, "catalog.db")); err != nil {
		return s, err
	}
	exposeDir := cfg.ExposeDir
	if exposeDir == "" {
		exposeDir = filepath.Join(cfg.StateDir, "exposed")
	}
	s.api.EnableShares(ctx, s.cat, exposeDir, cfg.FUSE.Dir, s.chk.setTimeout)
	s.shares = true
	s.api.Metrics = s.metrics
	if s.audit, err = api.OpenAudit(s.auditPath()); err != nil {
		return s, err
	}
	s.api.Audit = s.audit
	s.api.SocketGroup = s.chk.socketGroup
	s.api.SetRepoIdle(s.chk.repoIdle)
	if err := s.jobVolumesExist(ctx); err != nil {
		return s, err
	}
	s.notify = notify.New(s.chk.notify, log)
	if s.jobs, err = jobs.New(jobs.Config{Defs: cfg.Jobs, Catalog: s.cat, API: s.api, Metrics: s.metrics,
		Notify: s.notify, Emit: s.api.JobEvent, Log: log, Validate: s.jobVolumes}); err != nil {
		return s, err
	}
	s.api.Jobs = s.jobs
	s.api.Live = s.live
	s.metrics.WatchLive(s.live.stats)
	if cfg.Web.Listen != "" {
		if s.web, err = web.New(web.Config{API: s.api, Identities: s.chk.apiIDs, TLS: s.chk.apiTLS,
			IdleTimeout: s.chk.webIdle, MaxAge: s.chk.webMaxAge, Repositories: cfg.Web.Repositories,
			Browse: s.browseHandler(), Now: cfg.Clock, Logger: log}); err != nil {
			return s, ConfigError{err}
		}
	}
	return s, nil
}

// WebAddr is the address the web console listens on, once Run has
// bound it (nil before, and without --web-listen): with port 0, the
// port chosen.
func (s *Service) WebAddr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.webAddr
}

// webSocket is the unix socket of --web-listen unix:PATH ("" for TCP).
func (s *Service) webSocket() string {
	path, _ := strings.CutPrefix(s.cfg.Web.Listen, "unix:")
	if path == s.cfg.Web.Listen {
		return ""
	}
	return path
}

// jobVolumesExist refuses a job that names a volume the service does
// not serve.
func (s *Service) jobVolumesExist(ctx context.Context) error {
	for i := range s.cfg.Jobs {
		if err := s.jobVolumes(ctx, &s.cfg.Jobs[i]); err != nil {
			return ConfigError{err}
		}
	}
	return nil
}

// jobVolumes refuses job d if it names a volume the service does not
// serve (also for jobs added through the API: jobs.Config.Validate).
func (s *Service) jobVolumes(ctx context.Context, d *jobs.Def) error {
	for _, vol := range d.Volumes {
		if _, err := s.reg.For(ctx, vol); err != nil {
			return &jobs.DefError{Job: d.Name, Field: "volumes", Err: fmt.Errorf("%q is not a volume of this service (see `umbra volume list`; volumes are [[volume]] tables or --volume flags)", vol)}
		}
	}
	return nil
}

func (s *Service) writerSocket() string {
	return filepath.Join(filepath.Dir(s.cfg.APISocket), "writers.sock")
}

func (s *Service) auditPath() string {
	if s.cfg.AuditLog != "" {
		return s.cfg.AuditLog
	}
	return filepath.Join(s.cfg.StateDir, "audit.log")
}

// openVolumes opens every configured volume into the COW provider.
func (s *Service) openVolumes() error {
	for _, vc := range s.cfg.Volumes {
		opts := cow.Options{Policy: cow.Policy(vc.Policy), StorageDir: vc.Storage}
		if opts.StorageDir == "" {
			opts.StorageDir = filepath.Join(s.cfg.StateDir, "shadow")
		}
		var err error
		if opts.MaxStorage, opts.ChunkSize, err = volumeSizes(vc); err != nil {
			return err
		}
		v, err := cow.Open(vc.Name, vc.Path, opts)
		if err != nil {
			return err
		}
		for _, rerr := range v.RecoveryErrors() {
			s.log.Warn("volume recovered with problems", "volume", vc.Name, "err", rerr)
		}
		if err := s.vols.Add(v); err != nil {
			v.Close()
			return ConfigError{err}
		}
		s.log.Info("volume open", "volume", vc.Name, "origin", vc.Path, "size", v.Size(), "chunk", v.ChunkSize(),
			"storage", opts.StorageDir, "snapshots", len(v.Snapshots()))
	}
	return nil
}

// volumeOptions are the options of a volume added at run time (a live
// restore's): the defaults, shadow storage in the state directory.
func (s *Service) volumeOptions(fsys cow.FS) cow.Options {
	return cow.Options{StorageDir: filepath.Join(s.cfg.StateDir, "shadow"), FS: fsys}
}

// openWriters registers the in-process writers: fsfreeze, the SQLite
// databases and the hook directory.
func (s *Service) openWriters() error {
	s.writers = writer.NewRegistry()
	s.writers.OnFailure = func(w, phase string) {
		s.metrics.WriterFailed(w, phase)
		if s.api != nil { // set before any snapshot set can run
			s.api.WriterFailed(w, phase)
		}
	}
	ff := fsfreeze.New()
	ff.GuardCommand = s.cfg.ThawGuard
	s.writers.Add(ff)
	for _, db := range s.cfg.Writers.SQLite {
		if err := s.writers.Add(wsqlite.New(db)); err != nil {
			return ConfigError{err}
		}
	}
	if s.cfg.Writers.HooksDir != "" {
		s.writers.Add(wexec.New(s.cfg.Writers.HooksDir, 0))
	}
	return nil
}

// mountFUSE mounts the volumes and snapshots as files under FUSE.Dir.
func (s *Service) mountFUSE() error {
	dir := s.cfg.FUSE.Dir
	// A service killed with -9 leaves its FUSE mount behind, dead
	// (ENOTCONN): detach it so that this run can mount again.
	if _, err := os.Stat(dir); errors.Is(err, syscall.ENOTCONN) {
		s.log.Warn("FUSE directory left by a service that died: detaching it", "dir", dir)
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			return fmt.Errorf("--fuse-dir %s is a dead FUSE mount and cannot be detached: %w (run umount -l %s)", dir, err, dir)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("--fuse-dir %s: %w", dir, err)
	}
	m, err := fusefile.Mount(dir, frontend.FUSESource(s.vols), fusefile.Options{})
	if err != nil {
		return fmt.Errorf("--fuse-dir: %w; is /dev/fuse there and are you root?", err)
	}
	s.fuse, s.fuseDone = m, make(chan struct{})
	go func() { // waited for by unmountFUSE
		m.Wait()
		close(s.fuseDone)
	}()
	s.log.Info("serving FUSE files", "dir", dir, "files", frontend.Names(s.vols))
	return nil
}

// listeners are the sockets Run binds.
type listeners struct {
	nbdUnix, nbdTCP, apiUnix, apiTCP, metrics, web net.Listener
}

func (ls *listeners) close() {
	for _, l := range []net.Listener{ls.nbdUnix, ls.nbdTCP, ls.apiUnix, ls.apiTCP, ls.metrics, ls.web} {
		if l != nil {
			l.Close()
		}
	}
}

// listen binds every listener; the API socket comes last, so that a
// client that waits for it finds every other listener up.
func (s *Service) listen() (ls listeners, err error) {
	defer func() {
		if err != nil {
			ls.close()
		}
	}()
	cfg := s.cfg
	if err := os.MkdirAll(filepath.Dir(cfg.NBD.Socket), 0o750); err != nil {
		return ls, fmt.Errorf("NBD socket directory: %w", err)
	}
	os.Remove(cfg.NBD.Socket)
	if ls.nbdUnix, err = net.Listen("unix", cfg.NBD.Socket); err != nil {
		return ls, fmt.Errorf("NBD socket %s: %w", cfg.NBD.Socket, err)
	}
	os.Chmod(cfg.NBD.Socket, 0o660)
	if cfg.NBD.Listen != "" {
		if ls.nbdTCP, err = net.Listen("tcp", cfg.NBD.Listen); err != nil {
			return ls, fmt.Errorf("NBD listen %s: %w", cfg.NBD.Listen, err)
		}
	}
	if cfg.API.Listen != "" {
		if ls.apiTCP, err = net.Listen("tcp", cfg.API.Listen); err != nil {
			return ls, fmt.Errorf("--api-listen %s: %w", cfg.API.Listen, err)
		}
	}
	if cfg.Metrics != "" {
		if ls.metrics, err = net.Listen("tcp", cfg.Metrics); err != nil {
			return ls, fmt.Errorf("--metrics-listen %s: %w", cfg.Metrics, err)
		}
	}
	if cfg.Web.Listen != "" {
		if sock := s.webSocket(); sock != "" {
			os.Remove(sock)
		}
		if ls.web, err = web.Listen(cfg.Web.Listen); err != nil {
			return ls, fmt.Errorf("--web-listen %s: %w", cfg.Web.Listen, err)
		}
		if sock := s.webSocket(); sock != "" {
			os.Chmod(sock, 0o660)
		}
	}
	apiDir := filepath.Dir(cfg.APISocket)
	_, statErr := os.Stat(apiDir)
	if err := os.MkdirAll(apiDir, 0o750); err != nil {
		return ls, fmt.Errorf("API socket directory: %w", err)
	}
	os.Remove(cfg.APISocket)
	if ls.apiUnix, err = net.Listen("unix", cfg.APISocket); err != nil {
		return ls, fmt.Errorf("API socket %s: %w", cfg.APISocket, err)
	}
	os.Chmod(cfg.APISocket, 0o660)
	if g := s.chk.socketGroup; g != nil {
		// The group reaches the socket: it owns the socket and, when
		// the service made it, the directory (0750); a directory that
		// was there is the administrator's to open.
		if err := os.Chown(cfg.APISocket, -1, int(g.GID)); err != nil {
			return ls, fmt.Errorf("--api-socket-group %s: %w", g.Name, err)
		}
		if os.IsNotExist(statErr) {
			if err := os.Chown(apiDir, -1, int(g.GID)); err != nil {
				return ls, fmt.Errorf("--api-socket-group %s: API socket directory: %w", g.Name, err)
			}
		}
	}
	return ls, nil
}

// Run binds the listeners and serves until ctx ends (it returns nil) or
// one of the servers fails (it stops the others and returns that
// failure, named). Either way it drains the NBD requests in flight
// (DrainTimeout) and removes the sockets before it returns. Run runs
// once; Close ends it.
func (s *Service) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.closed || s.running {
		s.mu.Unlock()
		return errors.New("service: Run after Close or a second Run")
	}
	ctx, stop := context.WithCancel(ctx)
	s.running, s.stop, s.ran = true, stop, make(chan struct{})
	s.mu.Unlock()
	defer close(s.ran)
	defer stop()

	ls, err := s.listen()
	if err != nil {
		return err
	}
	defer s.removeSockets()
	if ls.web != nil {
		s.mu.Lock()
		s.webAddr = ls.web.Addr()
		s.mu.Unlock()
	}
	g := newGroup(ctx)
	log := s.log
	g.Go("NBD server on "+s.cfg.NBD.Socket, func(ctx context.Context) error { return nbdServe(ctx, s.nbdUnix, ls.nbdUnix) })
	log.Info("serving NBD", "socket", s.cfg.NBD.Socket, "exports", frontend.Names(s.vols))
	if ls.nbdTCP != nil {
		g.Go("NBD server on TCP "+ls.nbdTCP.Addr().String(), func(ctx context.Context) error { return nbdServe(ctx, s.nbdTCP, ls.nbdTCP) })
		log.Info("serving NBD over TLS", "listen", ls.nbdTCP.Addr().String())
	}
	g.Go("writer socket "+s.writerSocket(), func(ctx context.Context) error {
		return writer.Serve(ctx, s.writerSocket(), s.writers, log)
	})
	log.Info("accepting out-of-process writers", "socket", s.writerSocket())
	if s.fuse != nil {
		g.Go("FUSE mount "+s.cfg.FUSE.Dir, func(ctx context.Context) error {
			select {
			case <-ctx.Done():
				return nil
			case <-s.fuseDone:
				return errors.New("unmounted while the service ran")
			}
		})
	}
	if ls.apiTCP != nil {
		g.Go("API server on TCP "+ls.apiTCP.Addr().String(), func(ctx context.Context) error {
			return s.api.ServeTCP(ctx, ls.apiTCP, s.chk.apiTLS, s.chk.apiIDs)
		})
		log.Info("serving the management API over TLS", "listen", ls.apiTCP.Addr().String(), "client_certs", s.cfg.API.ClientCA != "")
	}
	if ls.metrics != nil {
		g.Go("metrics server on "+ls.metrics.Addr().String(), func(ctx context.Context) error { return s.metrics.Serve(ctx, ls.metrics) })
		log.Info("serving metrics", "url", "http://"+ls.metrics.Addr().String()+"/metrics")
	}
	// The scheduler runs even without jobs in the config: umbra jobs
	// add may define some.
	g.Go("job scheduler", s.jobs.Run)
	log.Info("running jobs", "jobs", len(s.jobs.List()))
	if ls.web != nil {
		scheme := "http"
		if s.chk.apiTLS != nil && s.webSocket() == "" {
			scheme = "https"
		}
		g.Go("web console on "+s.cfg.Web.Listen, func(ctx context.Context) error { return s.web.Serve(ctx, ls.web) })
		log.Info("serving the web console", "url", scheme+"://"+ls.web.Addr().String()+"/", "client_certs", s.cfg.API.ClientCA != "")
	}
	g.Go("API server on "+s.cfg.APISocket, func(ctx context.Context) error { return s.api.Serve(ctx, ls.apiUnix) })
	log.Info("serving the management API", "socket", s.cfg.APISocket, "audit", s.auditPath())

	err = g.Wait()
	ls.close() // a server that failed before serving leaves its listener open
	if err != nil {
		log.Error("stopping: a server failed", "err", err)
	}
	log.Info("shutting down: draining requests and flushing")
	s.drainNBD()
	return err
}

// nbdServe is Serve that is not an error when ctx ended it.
func nbdServe(ctx context.Context, srv *nbd.Server, l net.Listener) error {
	err := srv.Serve(ctx, l)
	if errors.Is(err, nbd.ErrServerClosed) && ctx.Err() != nil {
		return nil
	}
	return err
}

// drainNBD waits for the NBD requests in flight, for at most
// DrainTimeout, then closes the connections.
func (s *Service) drainNBD() {
	sctx, cancel := context.WithTimeout(context.Background(), DrainTimeout)
	defer cancel()
	for _, srv := range []*nbd.Server{s.nbdUnix, s.nbdTCP} {
		if srv == nil {
			continue
		}
		if err := srv.Shutdown(sctx); err != nil {
			s.log.Warn("NBD requests still in flight when the drain timed out: connections closed", "err", err)
		}
	}
}

func (s *Service) removeSockets() {
	os.Remove(s.cfg.NBD.Socket)
	os.Remove(s.cfg.APISocket)
	os.Remove(s.writerSocket())
	if sock := s.webSocket(); sock != "" {
		os.Remove(sock)
	}
}

// Close ends a Run in progress and waits for it, then closes what New
// opened, in order: NBD connections, the audit log, repositories,
// shares and their exposures, the FUSE mount, providers, volumes, and
// last the claim on the state directory. It can be called more than
// once; the later calls do nothing.
func (s *Service) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	stop, ran := s.stop, s.ran
	s.mu.Unlock()
	if stop != nil {
		stop()
		<-ran
	}
	s.teardown()
	return nil
}

// teardown closes whatever New opened, in the reverse order.
func (s *Service) teardown() {
	s.drainNBD()
	if s.web != nil {
		s.web.Close() // its verifies and prunes use repositories
	}
	s.closeBrowser() // its mounts hold snapshots and repositories
	if s.notify != nil {
		// Alerts of the runs that just ended (cancelled by the stop) get
		// a moment to go out.
		ctx, cancel := context.WithTimeout(context.Background(), notifyDrain)
		s.notify.Close(ctx)
		cancel()
	}
	if s.audit != nil {
		s.audit.Close()
	}
	if s.api != nil {
		s.api.CloseRepos()
	}
	if s.shares {
		s.api.CloseShares() // closes the catalog
	} else if s.cat != nil {
		s.cat.Close()
	}
	s.unmountFUSE()
	if s.rp != nil {
		s.rp.Close()
	}
	if s.bp != nil {
		s.bp.Close()
	}
	if s.live != nil {
		s.live.close() // the background restores, before their volumes
	}
	if s.vols != nil {
		for _, v := range s.vols.Volumes() {
			if err := v.Close(); err != nil {
				s.log.Error("close volume", "volume", v.Name(), "err", err)
			}
		}
	}
	if s.live != nil {
		s.live.closeSources()
	}
	if s.stateOwn != nil {
		s.stateOwn.Release()
	}
}

// unmountFUSE unmounts the FUSE directory and waits for its server. A
// mount that cannot be unmounted (a loop device still holds a file) is
// logged and left, with its server.
func (s *Service) unmountFUSE() {
	if s.fuse == nil {
		return
	}
	if err := s.fuse.Unmount(); err != nil {
		select {
		case <-s.fuseDone:
		default:
			s.log.Error("unmount FUSE: the directory stays mounted", "dir", s.cfg.FUSE.Dir, "err", err)
			return
		}
	}
	<-s.fuseDone
}

// group runs the servers: the first to stop while ctx lasts (with an
// error or without) cancels the others, and Wait waits for
// them all and returns that first error, named by the server.
type group struct {
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
	err    error // set once, read after wg.Wait
}

func newGroup(ctx context.Context) *group {
	g := &group{}
	g.ctx, g.cancel = context.WithCancel(ctx)
	return g
}

// Go runs fn as the server name.
func (g *group) Go(name string, fn func(context.Context) error) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		err := fn(g.ctx)
		// Once the group stops, a server's error is the stop's echo
		// (a listener closed under it), not a cause.
		if g.ctx.Err() == nil {
			if err == nil {
				err = errors.New("stopped")
			}
			g.once.Do(func() { g.err = fmt.Errorf("%s: %w", name, err) })
		}
		g.cancel()
	}()
}

// Wait waits for every server and returns the first failure.
func (g *group) Wait() error {
	g.wg.Wait()
	g.cancel()
	return g.err
}
