package backup_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"umbra/backup"
	"umbra/internal/testutil"
)

var s3Settings = backup.Settings{Cred: backup.Credentials{AccessKey: testutil.S3AccessKey, SecretKey: testutil.S3SecretKey}}

// TestS3RoundTrip: the same repository operations against a real S3
// server: init, full and incremental images, restore, verify, prune.
func TestS3RoundTrip(t *testing.T) {
	ctx := context.Background()
	v := testutil.StartS3(t)
	set := s3Settings
	set.Password = "s3 secret"
	repo, err := backup.InitWith(ctx, v.Location("repo"), set)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	if _, err := backup.InitWith(ctx, v.Location("repo"), set); err == nil {
		t.Fatal("init over an existing repository succeeded")
	}
	r := rand.New(rand.NewPCG(21, 22))
	src := volumeData(r, 8<<20)
	var ids []string
	for k := 0; k < 3; k++ {
		x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})
		ids = append(ids, x.ID)
		for i := 0; i < 64; i++ {
			off := r.IntN(len(src)/4096) * 4096
			copy(src[off:off+4096], bytes.Repeat([]byte{byte(k + 1)}, 4096))
		}
	}
	// Reopened from scratch, it lists, verifies and prunes.
	again, err := backup.OpenWith(ctx, v.Location("repo"), set)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if list, errs := again.Images(); len(list) != 3 || len(errs) > 0 {
		t.Fatalf("images over S3: %d, %v", len(list), errs)
	}
	if rep := again.Verify(); rep.GoodImages != 3 || len(rep.BadChunks) > 0 {
		t.Fatalf("verify over S3: %+v", rep)
	}
	if rep, err := again.Prune(ctx, backup.Policy{Last: 1}, false); err != nil || len(rep.Removed) != 2 || rep.PacksDeleted > 0 && rep.BytesFreed <= 0 {
		t.Fatalf("prune over S3: %+v %v", rep, err)
	}
	if rep := again.Verify(); rep.GoodImages != 1 || len(rep.BadChunks) > 0 {
		t.Fatalf("verify after prune over S3: %+v", rep)
	}
	// The removed images' chunk lists went with them (found by name).
	for _, n := range backup.ObjectNames(again, "lists/") {
		if !strings.Contains(n, ids[2]) {
			t.Fatalf("a pruned image's chunk list is left: %s", n)
		}
	}
	if rep, err := again.Delete(ctx, []string{ids[2]}); err != nil || len(rep.Removed) != 1 || len(rep.Kept) != 0 {
		t.Fatalf("delete the last image over S3: %+v %v", rep, err)
	}
	if left := backup.ObjectNames(again, "lists/"); len(left) > 0 {
		t.Fatalf("chunk lists left after the last image was deleted: %v", left)
	}
	if left := backup.ObjectNames(again, "packs/"); len(left) > 0 {
		t.Fatalf("packs left after the last image was deleted: %v", left)
	}
	if _, err := backup.OpenWith(ctx, v.Location("repo"), s3Settings); err == nil {
		t.Fatal("opened an encrypted S3 repository without its password")
	}
}

// slowSource calls hook once after half of it has been read.
type slowSource struct {
	memSource
	read atomic.Int64
	hook func()
	done atomic.Bool
}

func (s *slowSource) ReadAt(p []byte, off int64) (int, error) {
	if s.read.Add(int64(len(p))) > s.Size()/2 && !s.done.Swap(true) {
		s.hook()
	}
	return s.memSource.ReadAt(p, off)
}

// TestS3ServerRestart: the S3 server is killed in the middle of a
// backup and comes back a second later. The backup either completes
// (the client retries) or fails with an error that names the server;
// either way the repository stays valid and the next backup works.
func TestS3ServerRestart(t *testing.T) {
	ctx := context.Background()
	v := testutil.StartS3(t)
	repo, err := backup.InitWith(ctx, v.Location("repo"), s3Settings)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	// Random data: no compression, so 48 MiB is three packs.
	r := rand.New(rand.NewPCG(31, 32))
	data := make(memSource, 48<<20)
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	// The outage lasts a second (how long is the scenario's, nothing
	// waits on it); restarted says the server listens again.
	restarted := make(chan struct{})
	src := &slowSource{memSource: data, hook: func() {
		v.Stop()
		go func() { defer close(restarted); time.Sleep(time.Second); v.Start() }()
	}}
	x, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"})
	if err != nil {
		if !bytes.Contains([]byte(err.Error()), []byte("umbra-test")) {
			t.Fatalf("backup across a server restart failed with an unclear error: %v", err)
		}
		t.Logf("backup across a restart failed clearly: %v", err)
	} else {
		t.Logf("backup across a restart completed: %s", x.ID)
	}
	testutil.Receive(t, restarted, "the S3 server restarts")
	again, err := backup.OpenWith(ctx, v.Location("repo"), s3Settings)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if rep := again.Verify(); len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes) > 0 {
		t.Fatalf("repository damaged by a server restart: %+v", rep)
	}
	y := backupAndRestore(t, again, data, backup.Options{Volume: "v"})
	if rep, err := again.Prune(ctx, backup.Policy{Last: 1}, false); err != nil || !(len(rep.Kept) == 1 && rep.Kept[0] == y.ID) {
		t.Fatalf("prune after the restart: %+v %v", rep, err)
	}
}
