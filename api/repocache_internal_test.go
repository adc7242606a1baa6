package api

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"umbra/api/umbrav1"
	"umbra/backup"
)

type memSource []byte

func (m memSource) ReadAt(p []byte, off int64) (int, error) { return copy(p, m[off:]), nil }
func (m memSource) Size() int64                             { return int64(len(m)) }

func newRepos(t *testing.T, n int) []string {
	t.Helper()
	var locs []string
	for range n {
		loc := filepath.Join(t.TempDir(), "repo")
		r, err := backup.Init(loc)
		if err != nil {
			t.Fatal(err)
		}
		r.Close()
		locs = append(locs, loc)
	}
	return locs
}

// TestRepoCacheBounded: backups into many repositories leave at most
// one open (each holds its chunk index), none once it has been idle.
func TestRepoCacheBounded(t *testing.T) {
	ctx := context.Background()
	s := &Server{repoIdle: time.Hour}
	defer s.CloseRepos()
	for _, loc := range newRepos(t, 4) {
		r, release, err := s.openRepo(ctx, &umbrav1.BackupRequest{Repo: loc})
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := r.Backup(ctx, memSource(strings.Repeat("umbra", 1<<14)), backup.Options{Volume: "v"}); err != nil {
			t.Fatal(err)
		}
		release()
		release() // a second call changes nothing
	}
	if n := s.openRepos(); n != repoIdleMax {
		t.Fatalf("%d repositories open after 4 backups, want %d", n, repoIdleMax)
	}
	s.repoMu.Lock()
	var e *repoEntry
	for _, e = range s.repos {
	}
	s.repoMu.Unlock()
	s.expireRepo(e) // what its timer does
	if n := s.openRepos(); n != 0 {
		t.Fatalf("%d repositories open once idle, want 0", n)
	}

	s.repoIdle = 0 // none kept
	loc := newRepos(t, 1)[0]
	_, release, err := s.openRepo(ctx, &umbrav1.BackupRequest{Repo: loc})
	if err != nil {
		t.Fatal(err)
	}
	release()
	if n := s.openRepos(); n != 0 {
		t.Fatalf("%d repositories open with no idle time, want 0", n)
	}
}

// TestRepoCacheInUse: a repository replaced while a backup uses it is
// opened anew for the next backup, and the running one keeps working
// with its own until it ends.
func TestRepoCacheInUse(t *testing.T) {
	ctx := context.Background()
	s := &Server{repoIdle: time.Hour}
	defer s.CloseRepos()
	loc := newRepos(t, 1)[0]
	req := &umbrav1.BackupRequest{Repo: loc}
	r1, release1, err := s.openRepo(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	// Replaced under the same location: the next backup cannot use r1.
	os.RemoveAll(loc)
	if r, err := backup.Init(loc); err != nil {
		t.Fatal(err)
	} else {
		r.Close()
	}
	r2, release2, err := s.openRepo(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if r2 == r1 {
		t.Fatal("a replaced repository was reused")
	}
	data := memSource(strings.Repeat("shadow", 1<<14))
	x, _, err := r1.Backup(ctx, data, backup.Options{Volume: "v"})
	if err == nil {
		err = r1.RestoreContext(ctx, x.ID, filepath.Join(t.TempDir(), "out"), nil)
	}
	if err != nil {
		t.Fatalf("the running backup's repository stopped working: %v", err)
	}
	release1()
	if _, _, err := r2.Backup(ctx, data, backup.Options{Volume: "v"}); err != nil {
		t.Fatal(err)
	}
	release2()
	if n := s.openRepos(); n != 1 {
		t.Fatalf("%d repositories open, want 1", n)
	}
}

// TestOpenRepositoryShared: the file browser's opens and a backup's
// share one open repository, which stays open while either uses it.
func TestOpenRepositoryShared(t *testing.T) {
	ctx := context.Background()
	s := &Server{repoIdle: time.Hour}
	defer s.CloseRepos()
	loc := newRepos(t, 1)[0]
	a, releaseA, err := s.OpenRepository(ctx, loc, backup.Settings{})
	if err != nil {
		t.Fatal(err)
	}
	b, releaseB, err := s.openRepo(ctx, &umbrav1.BackupRequest{Repo: loc})
	if err != nil {
		t.Fatal(err)
	}
	if a != b {
		t.Fatal("the browser and a backup opened the repository twice")
	}
	releaseB()
	if _, _, err := a.Backup(ctx, memSource(strings.Repeat("umbra", 1<<12)), backup.Options{Volume: "v"}); err != nil {
		t.Fatalf("the repository closed under its user: %v", err)
	}
	releaseA()
	if n := s.openRepos(); n != 1 {
		t.Fatalf("%d repositories open, want the idle one", n)
	}
}

// TestRepoReleaseFreesAfter: ending a backup's use of its repository
// gives memory back beside the backup's reply, not before it (two
// forced collections were most of an incremental's wall time), and
// CloseRepos waits for that collection. Before, release ran it itself,
// so this test blocked in release until go test's -timeout.
func TestRepoReleaseFreesAfter(t *testing.T) {
	ctx := context.Background()
	gate := make(chan struct{})
	var freed atomic.Int32
	s := &Server{repoIdle: time.Hour}
	s.freeHook = func() {
		<-gate
		freed.Add(1)
	}
	_, release, err := s.openRepo(ctx, &umbrav1.BackupRequest{Repo: newRepos(t, 1)[0]})
	if err != nil {
		t.Fatal(err)
	}
	release() // returns while the collection waits for the gate
	close(gate)
	s.CloseRepos()
	if n := freed.Load(); n != 1 {
		t.Fatalf("%d collections after one backup, want 1", n)
	}
}
