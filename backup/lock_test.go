package backup_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"

	"umbra/backup"
	"umbra/internal/testutil"
)

// TestLockOfEndedOperation: a lock whose delete failed when its
// operation ended (the storage did not answer) does not keep the
// repository locked while its holder lives on: the next exclusive
// locker and `repo unlock` (without --all) remove it, and the holder
// deletes it itself at its next lock.
func TestLockOfEndedOperation(t *testing.T) {
	ctx := context.Background()
	repo, dir := newRepo(t)
	src := volumeData(rand.New(rand.NewPCG(91, 92)), 256<<10)
	restore := backup.FailDeletes(repo, "locks/")
	if _, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"}); err != nil {
		t.Fatal(err)
	}
	restore()
	if n := backup.ObjectNames(repo, "locks/"); len(n) != 1 {
		t.Fatalf("locks after a backup whose lock could not be deleted: %v", n)
	}
	other, err := backup.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if n, err := other.Unlock(ctx, false); err != nil || n != 1 {
		t.Fatalf("repo unlock removed %d locks (%v), want the ended backup's", n, err)
	}

	// The same with prune taking its lock, and the holder cleaning up.
	restore = backup.FailDeletes(repo, "locks/")
	if _, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"}); err != nil {
		t.Fatal(err)
	}
	restore()
	if _, err := other.Prune(ctx, backup.Policy{Last: 1}, false); err != nil {
		t.Fatalf("prune after a backup whose lock could not be deleted: %v", err)
	}
	restore = backup.FailDeletes(repo, "locks/")
	if _, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"}); err != nil {
		t.Fatal(err)
	}
	restore()
	unlock, err := repo.Lock(ctx, "test", false) // retries the one left
	if err != nil {
		t.Fatal(err)
	}
	unlock()
	if n := backup.ObjectNames(repo, "locks/"); len(n) != 0 {
		t.Fatalf("locks left after the holder's next lock: %v", n)
	}

	// A running operation's lock stays, and keeps prune out.
	unlock, err = repo.Lock(ctx, "backup v", false)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	if n, err := other.Unlock(ctx, false); err != nil || n != 0 {
		t.Fatalf("repo unlock removed %d live locks (%v)", n, err)
	}
	if _, err := other.Prune(ctx, backup.Policy{Last: 1}, false); !errors.Is(err, backup.ErrLocked) {
		t.Fatalf("prune during a backup: %v", err)
	}
}

// gatedSource blocks its reads from off on until open is closed, and
// closes reached when the first such read starts.
type gatedSource struct {
	memSource
	off     int64
	reached chan struct{}
	open    chan struct{}
	once    sync.Once
}

func (g *gatedSource) ReadAt(p []byte, off int64) (int, error) {
	if off >= g.off {
		g.once.Do(func() { close(g.reached) })
		<-g.open
	}
	return g.memSource.ReadAt(p, off)
}

// TestS3OutageMidBackup: the S3 server stops while a backup runs and
// comes back after the backup failed (its lock's delete failed too).
// The process that ran it lives on, as the service does; prune from it
// is not refused, and no lock is left.
func TestS3OutageMidBackup(t *testing.T) {
	ctx := context.Background()
	v := testutil.StartS3(t)
	defer backup.SetSmallPacks(64<<10, 1)()
	repo, err := backup.InitWith(ctx, v.Location("repo"), s3Settings)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	rng := rand.New(rand.NewPCG(93, 94))
	firstSrc := volumeData(rng, 1<<20)
	first := backupAndRestore(t, repo, firstSrc, backup.Options{Volume: "v"})
	src := &gatedSource{memSource: volumeData(rng, 8<<20), off: 4 << 20, reached: make(chan struct{}), open: make(chan struct{})}
	done := make(chan error)
	go func() {
		_, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"})
		done <- err
	}()
	<-src.reached
	v.Stop()
	close(src.open)
	if err := <-done; err == nil {
		t.Fatal("a backup through an S3 outage succeeded")
	}
	v.Start()
	if n := backup.ObjectNames(repo, "locks/"); len(n) != 1 {
		t.Fatalf("locks after the outage: %v, want the failed backup's", n)
	}
	rep, err := repo.Prune(ctx, backup.Policy{Last: 1}, false)
	if err != nil {
		t.Fatalf("prune after the outage: %v", err)
	}
	if len(rep.Kept) != 1 || rep.Kept[0] != first.ID || len(rep.Removed) != 0 {
		t.Fatalf("prune after the outage: %+v", rep)
	}
	backupAndRestoreCheck(t, repo, first.ID, firstSrc)
	if n := backup.ObjectNames(repo, "locks/"); len(n) != 0 {
		t.Fatalf("locks left after prune: %v", n)
	}
}
