package sdk_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"umbra/coordinator"
	"umbra/cow"
	"umbra/internal/testutil"
	"umbra/provider"
	"umbra/writer"
	"umbra/writer/sdk"
)

// service is the part of `umbra serve` an SDK writer talks to: a volume,
// the writer socket and the coordinator that runs snapshot sets.
type service struct {
	sock  string
	reg   *writer.Registry
	coord *coordinator.Coordinator
}

func startService(t *testing.T) *service {
	t.Helper()
	dir := t.TempDir()
	origin := filepath.Join(dir, "vol.img")
	testutil.SparseFile(t, origin, 1<<20)
	v, err := cow.Open("vol", origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	p := cow.NewProvider()
	p.Add(v)
	preg := &provider.Registry{}
	preg.Register(p)
	s := &service{sock: filepath.Join(dir, "writers.sock"), reg: writer.NewRegistry()}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { writer.Serve(ctx, s.sock, s.reg, nil); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	testutil.WaitListening(t, s.sock)
	s.coord = coordinator.New(preg, s.reg, nil, nil)
	return s
}

// run runs w with sdk.Run until the test ends and waits for it to
// register; Run's error comes on the returned channel.
func (s *service) run(t *testing.T, w sdk.Writer) <-chan error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- sdk.Run(ctx, s.sock, w) }()
	t.Cleanup(func() { cancel(); <-errc })
	testutil.WaitFor(t, "the SDK writer registers", func() bool {
		select {
		case err := <-errc:
			errc <- err // for the cleanup, which waits for Run
			t.Fatalf("sdk.Run returned before its writer registered: %v", err)
		default:
		}
		return len(s.reg.Writers()) == 1
	})
	return errc
}

// TestSDKWriterPhases: an application written with the SDK takes part in
// a set for a backup: its functions run once each, in the set's order,
// with the set's ID, and BackupComplete learns the outcome.
func TestSDKWriterPhases(t *testing.T) {
	s := startService(t)
	var mu sync.Mutex
	var got []string
	note := func(p string) sdk.Phase {
		return func(ctx context.Context, set writer.Set) error {
			mu.Lock()
			got = append(got, p+" "+set.ID)
			mu.Unlock()
			return nil
		}
	}
	s.run(t, sdk.Writer{
		Name: "orders", Components: []string{"vol"}, Level: writer.LevelApplication,
		PrepareForBackup: note("prepare-for-backup"), PrepareForSnapshot: note("prepare-for-snapshot"),
		Freeze: note("freeze"), Thaw: note("thaw"), PostSnapshot: note("post-snapshot"),
		BackupComplete: func(ctx context.Context, set writer.Set, ok bool) error {
			mu.Lock()
			got = append(got, "backup-complete "+set.ID+map[bool]string{true: " ok", false: " failed"}[ok])
			mu.Unlock()
			return nil
		},
	})
	set, err := s.coord.CreateSet(context.Background(), coordinator.Request{Volumes: []string{"vol"}, Writers: true, ForBackup: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(set.Writers) != 1 || set.Writers[0] != "orders" {
		t.Fatalf("writers of the set: %v", set.Writers)
	}
	if err := set.BackupComplete(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	var want []string
	for _, p := range []string{"prepare-for-backup", "prepare-for-snapshot", "freeze", "thaw", "post-snapshot"} {
		want = append(want, p+" "+set.ID)
	}
	want = append(want, "backup-complete "+set.ID+" ok")
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("phases:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestSDKWriterFailsFreeze: an error an application's Freeze returns
// aborts the set, reaches the coordinator with its text, and the
// application's Abort runs.
func TestSDKWriterFailsFreeze(t *testing.T) {
	s := startService(t)
	aborted := make(chan string, 1)
	s.run(t, sdk.Writer{
		Name: "orders", Components: []string{"vol"},
		Freeze: func(ctx context.Context, set writer.Set) error { return errors.New("orders: lock wait timeout") },
		Abort:  func(ctx context.Context, set writer.Set) error { aborted <- set.ID; return nil },
	})
	_, err := s.coord.CreateSet(context.Background(), coordinator.Request{Volumes: []string{"vol"}, Writers: true})
	if !errors.Is(err, coordinator.ErrAborted) || !strings.Contains(err.Error(), "orders: lock wait timeout") {
		t.Fatalf("set with a failing SDK writer: %v", err)
	}
	testutil.Receive(t, aborted, "the SDK writer's Abort runs")
}

// TestSDKRunErrors: Run says what to do when there is no service, and
// returns the service's refusal of a registration.
func TestSDKRunErrors(t *testing.T) {
	err := sdk.Run(context.Background(), filepath.Join(t.TempDir(), "none.sock"), sdk.Writer{Name: "x"})
	if err == nil || !strings.Contains(err.Error(), "umbra serve") {
		t.Fatalf("Run without a service: %v", err)
	}
	s := startService(t)
	err = sdk.Run(context.Background(), s.sock, sdk.Writer{}) // no name
	if err == nil || !strings.Contains(err.Error(), "register") {
		t.Fatalf("Run with no name: %v", err)
	}
}
