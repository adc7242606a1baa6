package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/BurntSushi/toml"
	"github.com/spf13/cobra"

	"umbra/nbd"
	umbrasvc "umbra/service"
)

func init() { verbs = append(verbs, newServeCmd) }

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
		cfg     umbrasvc.Config
		vols    []string
		def     umbrasvc.VolumeConfig
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
				var file umbrasvc.Config
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
	f.StringVar(&cfg.RepoIdle, "repo-idle", "", "how long a backup repository stays open after its last backup, for the next one to reuse its index (default 30s; 0: closed at once)")
	f.StringVar(&cfg.HoldPrio, "hold-priority", "", "normal (default), or realtime: while a snapshot holds writes, run at SCHED_FIFO (50 ms a hold, 5% of the time; not with CPU-bound work such as backups in the service)")
	f.StringVar(&cfg.API.Listen, "api-listen", "", "also serve the API on TCP HOST:PORT (TLS and --api-tokens required)")
	f.StringVar(&cfg.API.TLSCert, "api-tls-cert", "", "TLS certificate for --api-listen")
	f.StringVar(&cfg.API.TLSKey, "api-tls-key", "", "TLS key for --api-listen")
	f.StringVar(&cfg.API.ClientCA, "api-client-ca", "", "CA that signs client certificates for --api-listen (identities: cert lines of --api-tokens)")
	f.StringVar(&cfg.API.Tokens, "api-tokens", "", "identities file for --api-listen, mode 0600: `token TOKEN ROLE NAME` / `cert CN ROLE` lines; roles viewer, operator, admin")
	f.StringVar(&cfg.API.SocketGroup, "api-socket-group", "", "unix group that owns the API socket (mode 0660); its members are operators there, e.g. Samba's FSRVP commands run as a backup user (docs/samba.md)")
	f.StringVar(&cfg.Web.Listen, "web-listen", "", "serve the web console on HOST:PORT (HTTPS with --api-tls-cert; plain HTTP only on 127.0.0.1 or unix:PATH); logins are the identities of --api-tokens")
	f.StringVar(&cfg.Web.IdleTimeout, "web-idle-timeout", "", "end a console session unused this long (default 15m)")
	f.StringVar(&cfg.Web.MaxAge, "web-session-max-age", "", "end any console session this long after its login (default 8h)")
	f.StringVar(&cfg.Metrics, "metrics-listen", "", "serve Prometheus metrics at http://HOST:PORT/metrics")
	f.StringVar(&cfg.AuditLog, "audit-log", "", "audit log of mutating API calls (default STATE/audit.log)")
	return cmd
}

// mergeConfig copies the flags the user set onto the file's config.
func mergeConfig(file, flags *umbrasvc.Config, cmd *cobra.Command) {
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
	set("repo-idle", &file.RepoIdle, flags.RepoIdle)
	set("api-listen", &file.API.Listen, flags.API.Listen)
	set("api-tls-cert", &file.API.TLSCert, flags.API.TLSCert)
	set("api-tls-key", &file.API.TLSKey, flags.API.TLSKey)
	set("api-client-ca", &file.API.ClientCA, flags.API.ClientCA)
	set("api-tokens", &file.API.Tokens, flags.API.Tokens)
	set("api-socket-group", &file.API.SocketGroup, flags.API.SocketGroup)
	set("web-listen", &file.Web.Listen, flags.Web.Listen)
	set("web-idle-timeout", &file.Web.IdleTimeout, flags.Web.IdleTimeout)
	set("web-session-max-age", &file.Web.MaxAge, flags.Web.MaxAge)
	set("metrics-listen", &file.Metrics, flags.Metrics)
	set("audit-log", &file.AuditLog, flags.AuditLog)
	if cmd.Flags().Changed("sqlite-writer") {
		file.Writers.SQLite = append(file.Writers.SQLite, flags.Writers.SQLite...)
	}
}

// runServe runs the service of cfg until ctx ends or one of its
// servers fails.
func runServe(ctx context.Context, cfg umbrasvc.Config) error {
	if cfg.StateDir == "" {
		cfg.StateDir = defaultStateDir()
	}
	if cfg.NBD.Socket == "" {
		cfg.NBD.Socket = filepath.Join(defaultRuntimeDir(), "nbd.sock")
	}
	cfg.APISocket = apiSocketPath()
	if exe, err := os.Executable(); err == nil {
		cfg.ThawGuard = []string{exe, "thaw-guard"}
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	s, err := umbrasvc.New(ctx, cfg)
	if err != nil {
		return serviceError(err)
	}
	defer s.Close()
	return serviceError(s.Run(ctx))
}

// serviceError gives a configuration the service refused the usage
// exit code.
func serviceError(err error) error {
	var ce umbrasvc.ConfigError
	if errors.As(err, &ce) {
		return usageError{err}
	}
	return err
}
