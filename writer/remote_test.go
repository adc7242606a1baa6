package writer_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"umbra/coordinator"
	"umbra/cow"
	"umbra/internal/testutil"
	"umbra/provider"
	"umbra/writer"
	"umbra/writer/sdk"
)

// TestMain doubles as the out-of-process writer: with UMBRA_WRITER_CHILD
// set, the test binary runs an SDK writer instead of the tests.
func TestMain(m *testing.M) {
	if sock := os.Getenv("UMBRA_WRITER_CHILD"); sock != "" {
		marker := os.Getenv("UMBRA_WRITER_MARKER")
		err := sdk.Run(context.Background(), sock, sdk.Writer{
			Name:       "child",
			Components: []string{"vol"},
			Freeze: func(ctx context.Context, s writer.Set) error {
				os.WriteFile(marker, []byte("freeze "+s.ID), 0o600)
				if os.Getenv("UMBRA_WRITER_HANG") != "" {
					select {} // killed in the middle of freeze
				}
				return nil
			},
		})
		if err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type fixture struct {
	sock  string
	reg   *writer.Registry
	vol   *cow.Volume
	coord *coordinator.Coordinator
}

func setup(t *testing.T) *fixture {
	t.Helper()
	dir := t.TempDir()
	origin := filepath.Join(dir, "vol.img")
	os.WriteFile(origin, nil, 0o600)
	os.Truncate(origin, 1<<20)
	v, err := cow.Open("vol", origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	p := cow.NewProvider()
	p.Add(v)
	preg := &provider.Registry{}
	preg.Register(p)
	f := &fixture{sock: filepath.Join(dir, "writers.sock"), reg: writer.NewRegistry(), vol: v}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { writer.Serve(ctx, f.sock, f.reg, nil); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	f.coord = coordinator.New(preg, f.reg, nil, nil)
	return f
}

func (f *fixture) child(t *testing.T, hang bool, marker string) *exec.Cmd {
	t.Helper()
	f.waitSocket(t)
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "UMBRA_WRITER_CHILD="+f.sock, "UMBRA_WRITER_MARKER="+marker)
	if hang {
		cmd.Env = append(cmd.Env, "UMBRA_WRITER_HANG=1")
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	testutil.WaitFor(t, "the child writer registers", func() bool { return len(f.reg.Writers()) > 0 })
	return cmd
}

// waitSocket waits for the writer socket to be served.
func (f *fixture) waitSocket(t *testing.T) {
	t.Helper()
	testutil.WaitListening(t, f.sock)
}

func TestRemoteWriterTakesPart(t *testing.T) {
	f := setup(t)
	marker := filepath.Join(t.TempDir(), "marker")
	f.child(t, false, marker)
	set, err := f.coord.CreateSet(context.Background(), coordinator.Request{Volumes: []string{"vol"}, Writers: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(set.Writers) != 1 || set.Writers[0] != "child" {
		t.Fatalf("writers of the set: %v", set.Writers)
	}
	if b, _ := os.ReadFile(marker); !strings.Contains(string(b), set.ID) {
		t.Fatalf("the child did not freeze for %s: %q", set.ID, b)
	}
}

// TestWriterKilledInFreeze: SIGKILL of a writer process in the middle of
// freeze aborts the set at once (the freeze timeout is an hour: the kill
// is what ends it); nothing stays held and the writer's state records the
// phase and the reason.
func TestWriterKilledInFreeze(t *testing.T) {
	f := setup(t)
	marker := filepath.Join(t.TempDir(), "marker")
	cmd := f.child(t, true, marker)
	errc := make(chan error, 1)
	go func() {
		_, err := f.coord.CreateSet(context.Background(), coordinator.Request{Volumes: []string{"vol"}, Writers: true, FreezeTimeout: time.Hour})
		errc <- err
	}()
	testutil.WaitFor(t, "the child freezes", func() bool { _, err := os.Stat(marker); return err == nil })
	cmd.Process.Signal(syscall.SIGKILL)
	if err := testutil.Receive(t, errc, "the set aborts after its writer was killed"); !errors.Is(err, coordinator.ErrAborted) || !errors.Is(err, writer.ErrDisconnected) {
		t.Fatalf("set with a killed writer: %v", err)
	}
	if n := len(f.vol.Snapshots()); n != 0 {
		t.Fatalf("%d snapshots left", n)
	}
	done := make(chan error, 1)
	go func() { _, err := f.vol.WriteAt([]byte{1}, 0); done <- err }()
	if err := testutil.Receive(t, done, "a write to the volume once the set aborted (is it still held?)"); err != nil {
		t.Fatal(err)
	}
	for _, s := range f.reg.States() {
		if s.Name == "child" && (s.State != "failed" || s.LastPhase != "freeze" || !strings.Contains(s.LastError, "disconnected")) {
			t.Fatalf("killed writer's state: %+v", s)
		}
	}
}

func FuzzDecodeMessage(f *testing.F) {
	f.Add([]byte(`{"type":"register","version":1,"name":"app","components":["/srv"],"level":0}`))
	f.Add([]byte(`{"type":"result","id":7,"error":""}`))
	f.Add([]byte(`{"type":"event","id":1,"phase":"freeze","set":{"id":"s","volumes":[{"name":"v","devices":null,"mounts":["/m"]}]}}`))
	f.Add([]byte(`{"type":"register","version":2}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := writer.DecodeMessage(b)
		if err == nil && m.Type == "register" && (m.Name == "" || m.Version != writer.ProtocolVersion) {
			t.Fatalf("accepted an invalid register: %+v", m)
		}
	})
}

// TestGoneWritersBounded: writers that connect under ever new names and
// go leave at most 64 states behind (the newest), not one a name: the
// service keeps a departed writer's state for its last error, but a
// client that registers a name a run must not grow it without end.
func TestGoneWritersBounded(t *testing.T) {
	f := setup(t)
	f.waitSocket(t)
	const n = 100
	for i := range n {
		c, err := net.Dial("unix", f.sock)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(writer.Message{Type: "register", Version: writer.ProtocolVersion, Name: fmt.Sprintf("app-%03d", i), Components: []string{"vol"}})
		c.Write(append(b, '\n'))
		if _, err := bufio.NewReader(c).ReadString('\n'); err != nil { // registered
			t.Fatal(err)
		}
		c.Close()
	}
	// The service notices each close on its own connection goroutine.
	testutil.WaitFor(t, "every writer is unregistered", func() bool { return len(f.reg.Writers()) == 0 })
	st := f.reg.States()
	if len(st) != 64 {
		t.Fatalf("%d writer states kept after %d writers came and went, want 64", len(st), n)
	}
	if last := st[len(st)-1]; last.Name != fmt.Sprintf("app-%03d", n-1) || last.State != "disconnected" {
		t.Fatalf("the last writer to go is not kept: %+v", last)
	}
}
