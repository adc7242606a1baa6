package service

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"umbra/api/umbrav1"
	"umbra/provider"
)

const volSize = 4 << 20

// testConfig is a service of one small volume file, everything under a
// temporary directory.
func testConfig(t *testing.T) Config {
	t.Helper()
	dir := t.TempDir()
	vol := filepath.Join(dir, "vol.img")
	if err := os.WriteFile(vol, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(vol, volSize); err != nil {
		t.Fatal(err)
	}
	return Config{
		StateDir:  filepath.Join(dir, "state"),
		NBD:       NBDConfig{Socket: filepath.Join(dir, "run", "nbd.sock")},
		APISocket: filepath.Join(dir, "run", "umbra.sock"),
		Volumes:   []VolumeConfig{{Name: "vol", Path: vol}},
		Logger:    slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
}

// waitAPI waits until the API socket answers ListVolumes (Run binds it
// last) and returns the volume names; it fails if Run returns first.
func waitAPI(t *testing.T, cfg Config, runErr <-chan error) []string {
	t.Helper()
	for {
		select {
		case err := <-runErr:
			t.Fatalf("Run returned before serving: %v", err)
		default:
		}
		if _, err := os.Stat(cfg.APISocket); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+cfg.APISocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	resp, err := umbrav1.NewUmbraClient(conn).ListVolumes(context.Background(), &umbrav1.ListVolumesRequest{})
	if err != nil {
		t.Fatalf("ListVolumes: %v", err)
	}
	var names []string
	for _, v := range resp.GetVolumes() {
		names = append(names, v.GetName())
	}
	return names
}

// start opens a service of cfg and runs it until cancel; runErr gets
// what Run returns. It waits until the service serves.
func start(t *testing.T, cfg Config) (s *Service, cancel func(), runErr <-chan error) {
	t.Helper()
	s, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	waitAPI(t, cfg, errc)
	return s, cancel, errc
}

// fuseConfig is testConfig with a FUSE directory; it skips the test
// where FUSE cannot mount.
func fuseConfig(t *testing.T) Config {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("FUSE mounts need root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	cfg := testConfig(t)
	cfg.FUSE.Dir = filepath.Join(t.TempDir(), "files")
	return cfg
}

// noLeak fails when goroutines started after base are still there. The
// ones a closed gRPC client conn leaves exit on their own; it waits for
// them without a deadline of its own (the test's is the bound).
func noLeak(t *testing.T, base int) {
	t.Helper()
	for runtime.NumGoroutine() > base {
		if dl, ok := t.Deadline(); ok && time.Until(dl) < 10*time.Second {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, %d before the service:\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestStartStop: a service serves its volume over the API and NBD, stops
// when its context ends, removes its sockets, and Close (twice) leaves
// no goroutine behind.
func TestStartStop(t *testing.T) {
	base := runtime.NumGoroutine()
	cfg := testConfig(t)
	cfg.Metrics = "127.0.0.1:0"
	s, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- s.Run(ctx) }()
	if names := waitAPI(t, cfg, runErr); len(names) != 1 || names[0] != "vol" {
		t.Errorf("volumes %v, want [vol]", names)
	}
	if _, err := exec.LookPath("nbdinfo"); err == nil {
		out, err := exec.Command("nbdinfo", "--size", "nbd+unix:///vol?socket="+cfg.NBD.Socket).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "4194304" {
			t.Errorf("nbdinfo --size: %q, %v", out, err)
		}
	} else {
		t.Log("nbdinfo missing: NBD not checked")
	}
	cancel()
	if err := <-runErr; err != nil {
		t.Errorf("Run after its context ended: %v", err)
	}
	for _, sock := range []string{cfg.NBD.Socket, cfg.APISocket, filepath.Join(filepath.Dir(cfg.APISocket), "writers.sock")} {
		if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after Run: %v", sock, err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.Run(context.Background()); err == nil {
		t.Error("Run after Close: no error")
	}
	noLeak(t, base)

	// Close released everything: a second service opens the same
	// state directory and volume.
	s2, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New after Close: %v", err)
	}
	s2.Close()
}

// TestBindFailure: a listener that cannot bind stops Run with an error
// that names it, and the service closes cleanly.
func TestBindFailure(t *testing.T) {
	base := runtime.NumGoroutine()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg := testConfig(t)
	cfg.Metrics = busy.Addr().String()
	s, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "--metrics-listen "+busy.Addr().String()) {
		t.Fatalf("Run with the metrics address taken: %v, want an error naming --metrics-listen", err)
	}
	for _, sock := range []string{cfg.NBD.Socket, cfg.APISocket} {
		if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after a failed Run: %v", sock, err)
		}
	}
	s.Close()
	noLeak(t, base)
}

// TestCloseEndsRun: Close while Run serves ends Run and waits for it.
func TestCloseEndsRun(t *testing.T) {
	base := runtime.NumGoroutine()
	s, cancel, runErr := start(t, testConfig(t))
	defer cancel()
	s.Close()
	if err := <-runErr; err != nil {
		t.Errorf("Run ended by Close: %v", err)
	}
	noLeak(t, base)
}

// TestBadConfig: a refused configuration is a ConfigError naming the
// setting, and nothing is created.
func TestBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		edit       func(*Config)
	}{
		{"no volumes", "no volumes", func(c *Config) { c.Volumes = nil }},
		{"chunk size", "volume vol: chunk size 3K", func(c *Config) { c.Volumes[0].ChunkSize = "3K" }},
		{"max storage", "volume vol: max storage", func(c *Config) { c.Volumes[0].MaxStorage = "lots" }},
		{"policy", `policy "keep"`, func(c *Config) { c.Volumes[0].Policy = "keep" }},
		{"hold priority", "--hold-priority", func(c *Config) { c.HoldPrio = "high" }},
		{"set timeout", "--set-timeout", func(c *Config) { c.SetTimeout = "-1s" }},
		{"repo idle", "--repo-idle", func(c *Config) { c.RepoIdle = "-1s" }},
		{"repo idle unit", "--repo-idle", func(c *Config) { c.RepoIdle = "30" }},
		{"nbd tcp without tls", "--nbd-listen", func(c *Config) { c.NBD.Listen = "127.0.0.1:0" }},
		{"api tls without listen", "--api-listen", func(c *Config) { c.API.Tokens = "tokens" }},
		{"max connections", "--nbd-max-connections", func(c *Config) { c.NBD.MaxConns = -1 }},
		{"socket group", `--api-socket-group "no-such-group-umbra": no such group`, func(c *Config) { c.API.SocketGroup = "no-such-group-umbra" }},
		{"socket group cannot reach", "its members cannot pass through the API socket's directory", func(c *Config) {
			os.Mkdir(filepath.Dir(c.APISocket), 0o750) // root's group: not a real group's
			c.API.SocketGroup = "nogroup"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t)
			tc.edit(&cfg)
			s, err := New(context.Background(), cfg)
			var ce ConfigError
			if !errors.As(err, &ce) || !strings.Contains(err.Error(), tc.want) {
				if s != nil {
					s.Close()
				}
				t.Fatalf("New: %v, want a ConfigError naming %q", err, tc.want)
			}
			if _, err := os.Stat(cfg.StateDir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("state directory created by a refused configuration: %v", err)
			}
		})
	}
}

// TestGroupFirstFailureStopsTheRest: the first server to fail stops the
// others, and Wait returns that failure named by the server.
func TestGroupFirstFailureStopsTheRest(t *testing.T) {
	g := newGroup(context.Background())
	stopped := make(chan struct{})
	g.Go("patient server", func(ctx context.Context) error {
		<-ctx.Done()
		close(stopped)
		return errors.New("listener closed")
	})
	g.Go("failing server", func(context.Context) error { return errors.New("boom") })
	err := g.Wait()
	if err == nil || err.Error() != "failing server: boom" {
		t.Fatalf("Wait: %v, want failing server: boom", err)
	}
	<-stopped

	// A server that returns without an error while the group runs has
	// stopped too.
	g = newGroup(context.Background())
	g.Go("quiet server", func(context.Context) error { return nil })
	if err := g.Wait(); err == nil || err.Error() != "quiet server: stopped" {
		t.Fatalf("Wait: %v, want quiet server: stopped", err)
	}
}

// TestFUSE: the FUSE directory shows the volume while the service runs,
// and Close unmounts it and waits for its server.
func TestFUSE(t *testing.T) {
	base := runtime.NumGoroutine()
	cfg := fuseConfig(t)
	s, cancel, runErr := start(t, cfg)
	if fi, err := os.Stat(filepath.Join(cfg.FUSE.Dir, "vol")); err != nil || fi.Size() != volSize {
		t.Errorf("FUSE file of the volume: %v, %v", fi, err)
	}
	cancel()
	if err := <-runErr; err != nil {
		t.Errorf("Run: %v", err)
	}
	s.Close()
	if ents, err := os.ReadDir(cfg.FUSE.Dir); err != nil || len(ents) != 0 {
		t.Errorf("FUSE directory after Close: %v, %v (still mounted?)", ents, err)
	}
	noLeak(t, base)
}

// TestServerFailureStopsTheRest: the FUSE directory unmounted from
// outside stops the service: Run returns the failure named, and the
// NBD and API servers are down (their sockets gone).
func TestServerFailureStopsTheRest(t *testing.T) {
	base := runtime.NumGoroutine()
	cfg := fuseConfig(t)
	s, cancel, runErr := start(t, cfg)
	defer cancel()
	defer s.Close()
	if err := syscall.Unmount(cfg.FUSE.Dir, 0); err != nil {
		t.Fatal(err)
	}
	err := <-runErr
	if err == nil || !strings.Contains(err.Error(), "FUSE mount "+cfg.FUSE.Dir) {
		t.Fatalf("Run after the FUSE directory was unmounted: %v, want an error naming the FUSE mount", err)
	}
	for _, sock := range []string{cfg.NBD.Socket, cfg.APISocket} {
		if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after Run failed: %v", sock, err)
		}
	}
	s.Close()
	noLeak(t, base)
}

// TestBrowse: the service's file browser shows a snapshot of its
// volume, and Close takes its mounts down before the volumes close.
func TestBrowse(t *testing.T) {
	cfg := fuseConfig(t)
	for _, tool := range []string{"mkfs.ext4", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s", tool)
		}
	}
	if out, err := exec.Command("mkfs.ext4", "-q", cfg.Volumes[0].Path).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v %s", err, out)
	}
	s, cancel, runErr := start(t, cfg)
	defer s.Close()
	v, err := s.vols.Volume("vol")
	if err != nil {
		t.Fatal(err)
	}
	snap, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := s.Browser()
	if err != nil {
		t.Fatal(err)
	}
	tr, err := b.Open(context.Background(), s.SnapshotSource("vol", snap.ID))
	if err != nil {
		t.Fatal(err)
	}
	page, err := tr.List(context.Background(), "/", "", 10)
	if err != nil || len(page.Entries) != 1 || page.Entries[0].Name != "lost+found" {
		t.Fatalf("root of the snapshot: %+v %v, want lost+found", page, err)
	}
	tr.Close()
	cancel()
	<-runErr
	dir := b.Dir()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(mi), dir) {
		t.Errorf("the browser's mounts outlive the service:\n%s", mi)
	}
	if _, err := s.Browser(); err == nil {
		t.Error("a closed service made a browser")
	}
}
