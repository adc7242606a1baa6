package api_test

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"umbra/api"
	"umbra/api/umbrav1"
	"umbra/cow"
	"umbra/provider"
)

// syncBuffer is a log sink the test reads after the server wrote it.
type syncBuffer struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestFailedBackupLogged: a backup that fails, or is cancelled, is in
// the service's log with its volumes, repository and error, not only in
// the audit log.
func TestFailedBackupLogged(t *testing.T) {
	dir := t.TempDir()
	origin := filepath.Join(dir, "v.img")
	os.WriteFile(origin, nil, 0o600)
	os.Truncate(origin, 1<<20)
	v, err := cow.Open("v", origin, cow.Options{StorageDir: filepath.Join(dir, "shadow")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	p := cow.NewProvider()
	p.Add(v)
	reg := &provider.Registry{}
	reg.Register(p)
	var log syncBuffer
	srv := api.NewServer(p, reg, nil, nil, slog.New(slog.NewTextHandler(&log, nil)))

	missing := filepath.Join(dir, "no-repo-here")
	if _, err := srv.Backup(context.Background(), &umbrav1.BackupRequest{Volumes: []string{"v"}, Repo: missing}); err == nil {
		t.Fatal("a backup into no repository succeeded")
	}
	if l := log.String(); !strings.Contains(l, "backup failed") || !strings.Contains(l, missing) || !strings.Contains(l, "no Umbra repository") {
		t.Fatalf("the failed backup is not in the service log:\n%s", l)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := srv.Backup(ctx, &umbrav1.BackupRequest{Volumes: []string{"v"}, Repo: missing}); err == nil {
		t.Fatal("a cancelled backup succeeded")
	}
	if l := log.String(); !strings.Contains(l, "backup cancelled") {
		t.Fatalf("the cancelled backup is not in the service log:\n%s", l)
	}
}
