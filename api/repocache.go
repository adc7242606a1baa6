package api

import (
	"context"
	"crypto/sha256"
	"runtime"
	"runtime/debug"
	"time"

	"umbra/api/umbrav1"
	"umbra/backup"
)

// The service keeps the repository a backup used open for a little
// while, so that backups that follow closely (a set of volumes, a
// retried one) open its chunk index once. An open repository holds its
// codecs, its chunk index's filter and buffer (up to ~20 MiB; the index
// itself is on disk, backup/chunkstore.go): kept for every repository
// ever used, 20 backups into a few repositories held 2 GiB when the
// index was in memory. So the cache is bounded: at most repoIdleMax repositories no
// backup uses stay open, each for repoIdle at most; then it is closed
// and the memory goes back to the system.

// DefaultRepoIdle is how long a repository no backup uses stays open
// (umbra serve --repo-idle).
const DefaultRepoIdle = 30 * time.Second

// repoIdleMax is how many repositories no backup uses stay open.
const repoIdleMax = 1

// repoEntry is one open repository of the cache.
type repoEntry struct {
	r     *backup.Repo
	key   [32]byte
	users int         // backups using it
	stale bool        // out of the cache: the last user closes it
	idle  *time.Timer // closes it when it has been unused for repoIdle
	last  time.Time   // when the last user released it
}

// repoKey names a request's repository: location and secrets.
func repoKey(req *umbrav1.BackupRequest) [32]byte {
	return sha256.Sum256([]byte(req.GetRepo() + "\x00" + req.GetPassword() + "\x00" + req.GetS3AccessKey() + "\x00" + req.GetS3SecretKey()))
}

// openRepo returns the repository a request names and a release
// function the caller calls once its backup is done: the repository is
// open until then, whatever other backups do.
func (s *Server) openRepo(ctx context.Context, req *umbrav1.BackupRequest) (*backup.Repo, func(), error) {
	key := repoKey(req)
	s.repoMu.Lock()
	defer s.repoMu.Unlock()
	if s.repos == nil {
		s.repos = map[[32]byte]*repoEntry{}
	}
	if e, ok := s.repos[key]; ok {
		if e.idle != nil {
			e.idle.Stop()
			e.idle = nil
		}
		if err := e.r.Refresh(ctx); err == nil {
			e.users++
			return e.r, s.releaser(e), nil
		}
		// Replaced or unreachable: open it again. One in use is closed by
		// its last user.
		delete(s.repos, key)
		e.stale = true
		if e.users == 0 {
			e.r.Close()
		}
	}
	r, err := backup.OpenWith(ctx, req.GetRepo(), backup.Settings{Password: req.GetPassword(),
		Cred: backup.Credentials{AccessKey: req.GetS3AccessKey(), SecretKey: req.GetS3SecretKey()}})
	if err != nil {
		return nil, nil, err
	}
	e := &repoEntry{r: r, key: key, users: 1}
	s.repos[key] = e
	return r, s.releaser(e), nil
}

// releaser returns the function that ends one use of e (once).
func (s *Server) releaser(e *repoEntry) func() {
	done := false
	return func() {
		s.repoMu.Lock()
		if done {
			s.repoMu.Unlock()
			return
		}
		done = true
		e.users--
		if e.users == 0 {
			e.last = time.Now()
			if e.stale { // out of the cache while this backup ran
				e.r.Close()
			}
			s.trimReposLocked()
			if !e.stale && s.repoIdle > 0 {
				e.idle = time.AfterFunc(s.repoIdle, func() { s.expireRepo(e) })
			}
		}
		s.repoMu.Unlock()
		// What the backup allocated (its batches, packs, the codecs'
		// buffers, pooled blobs) goes back to the system soon, not when
		// the scavenger gets to it; a closed repository's index with it.
		// Not before the backup's reply though: the two forced
		// collections took 20-90 ms of a 0.1-0.2 s incremental's wall
		// time (measured 2026-12-07).
		s.freeMemoryLater()
	}
}

// freeMemoryLater runs freeMemory on a goroutine of its own, which
// CloseRepos waits for; one that is queued and not started yet serves
// the callers that come meanwhile.
func (s *Server) freeMemoryLater() {
	if !s.freeing.CompareAndSwap(false, true) {
		return
	}
	s.freeWG.Add(1)
	s.Metrics.MemoryReturn(1)
	go func() {
		defer s.freeWG.Done()
		defer s.Metrics.MemoryReturn(-1)
		// What is allocated from here on waits for the next one.
		s.freeing.Store(false)
		if s.freeHook != nil {
			s.freeHook()
			return
		}
		freeMemory()
	}()
}

// trimReposLocked closes the repositories no backup uses beyond the
// newest repoIdleMax (all of them when repoIdle is 0). Callers hold
// repoMu.
func (s *Server) trimReposLocked() {
	var idle []*repoEntry
	for _, e := range s.repos {
		if e.users == 0 {
			idle = append(idle, e)
		}
	}
	keep := repoIdleMax
	if s.repoIdle <= 0 {
		keep = 0
	}
	// Newest first.
	for i := 1; i < len(idle); i++ {
		for j := i; j > 0 && idle[j].last.After(idle[j-1].last); j-- {
			idle[j], idle[j-1] = idle[j-1], idle[j]
		}
	}
	for i, e := range idle {
		if i >= keep {
			s.dropRepoLocked(e)
		}
	}
}

// dropRepoLocked takes e out of the cache and closes it (it is unused).
// Callers hold repoMu.
func (s *Server) dropRepoLocked(e *repoEntry) {
	if e.idle != nil {
		e.idle.Stop()
		e.idle = nil
	}
	if s.repos[e.key] == e {
		delete(s.repos, e.key)
	}
	e.stale = true
	e.r.Close()
}

// expireRepo closes e if no backup used it since its timer was set.
func (s *Server) expireRepo(e *repoEntry) {
	s.repoMu.Lock()
	if e.users != 0 || e.stale || s.repos[e.key] != e {
		s.repoMu.Unlock()
		return
	}
	s.dropRepoLocked(e)
	s.repoMu.Unlock()
	s.freeMemoryLater()
}

// SetRepoIdle sets how long a repository no backup uses stays open; 0
// closes it when its last backup ends. Call it before serving.
func (s *Server) SetRepoIdle(d time.Duration) {
	s.repoMu.Lock()
	s.repoIdle = d
	s.repoMu.Unlock()
}

// openRepos is how many repositories the cache holds open.
func (s *Server) openRepos() int {
	s.repoMu.Lock()
	defer s.repoMu.Unlock()
	return len(s.repos)
}

// CloseRepos closes the repositories no backup uses (at shutdown, once
// no backup runs: those in use are closed by their last user) and waits
// for the collections that give memory back.
func (s *Server) CloseRepos() {
	defer s.freeWG.Wait()
	s.repoMu.Lock()
	defer s.repoMu.Unlock()
	for _, e := range s.repos {
		if e.users == 0 {
			s.dropRepoLocked(e)
		} else {
			delete(s.repos, e.key)
			e.stale = true
		}
	}
}

// freeMemory returns what the heap does not use to the system: two
// collections, so that sync.Pools (which keep their items through one)
// let go of theirs too.
func freeMemory() {
	runtime.GC()
	debug.FreeOSMemory()
}

// OpenRepository opens the repository at location through the cache the
// backups use (the file browser reading an image loads its chunk index
// once, and shares it with backups to the same repository) and returns
// the function that ends this use; the repository stays open until
// then.
func (s *Server) OpenRepository(ctx context.Context, location string, set backup.Settings) (*backup.Repo, func(), error) {
	return s.openRepo(ctx, &umbrav1.BackupRequest{Repo: location, Password: set.Password,
		S3AccessKey: set.Cred.AccessKey, S3SecretKey: set.Cred.SecretKey})
}
