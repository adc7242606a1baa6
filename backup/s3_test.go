package backup_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"umbra/backup"
)

// versity runs a real S3 server (versitygw over a posix directory).
type versity struct {
	t    *testing.T
	bin  string
	dir  string
	addr string
	cmd  *exec.Cmd
}

const s3Key, s3Secret = "umbratest", "umbratestsecret123"

func versityBinary(t *testing.T) string {
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p
	}
	home, _ := os.UserHomeDir()
	for _, p := range []string{os.Getenv("GOBIN"), filepath.Join(os.Getenv("GOPATH"), "bin"), filepath.Join(home, "go", "bin")} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(filepath.Join(p, "versitygw")); err == nil {
			return filepath.Join(p, "versitygw")
		}
	}
	t.Skip("versitygw not found: go install github.com/versity/versitygw/cmd/versitygw@v1.8.0 (./scripts/test does)")
	return ""
}

func startVersity(t *testing.T) *versity {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	v := &versity{t: t, bin: versityBinary(t), dir: t.TempDir(), addr: addr}
	os.MkdirAll(filepath.Join(v.dir, "umbra-test"), 0o755)
	v.start()
	t.Cleanup(v.stop)
	return v
}

func (v *versity) start() {
	v.cmd = exec.Command(v.bin, "--port", v.addr, "--access", s3Key, "--secret", s3Secret, "posix", "--nometa", v.dir)
	v.cmd.Stderr = os.Stderr // errors only; its access log goes to stdout
	if err := v.cmd.Start(); err != nil {
		v.t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("tcp", v.addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	v.t.Fatalf("versitygw did not listen on %s", v.addr)
}

func (v *versity) stop() {
	if v.cmd != nil && v.cmd.Process != nil {
		v.cmd.Process.Kill()
		v.cmd.Wait()
		v.cmd = nil
	}
}

func (v *versity) location() string { return "s3+http://" + v.addr + "/umbra-test/repo" }

var s3Settings = backup.Settings{Cred: backup.Credentials{AccessKey: s3Key, SecretKey: s3Secret}}

// TestS3RoundTrip: the same repository operations against a real S3
// server: init, full and incremental images, restore, verify, prune.
func TestS3RoundTrip(t *testing.T) {
	ctx := context.Background()
	v := startVersity(t)
	set := s3Settings
	set.Password = "s3 secret"
	repo, err := backup.InitWith(ctx, v.location(), set)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	if _, err := backup.InitWith(ctx, v.location(), set); err == nil {
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
	again, err := backup.OpenWith(ctx, v.location(), set)
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
	if rep, err := again.Prune(ctx, backup.Policy{Last: 1}, false); err != nil || len(rep.Removed) != 2 {
		t.Fatalf("prune over S3: %+v %v", rep, err)
	}
	if rep := again.Verify(); rep.GoodImages != 1 || len(rep.BadChunks) > 0 {
		t.Fatalf("verify after prune over S3: %+v", rep)
	}
	if _, err := backup.OpenWith(ctx, v.location(), s3Settings); err == nil {
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
	v := startVersity(t)
	repo, err := backup.InitWith(ctx, v.location(), s3Settings)
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
	src := &slowSource{memSource: data, hook: func() {
		v.stop()
		go func() { time.Sleep(time.Second); v.start() }()
	}}
	x, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"})
	if err != nil {
		if !bytes.Contains([]byte(err.Error()), []byte("umbra-test")) {
			t.Fatalf("backup across a server restart failed with an unclear error: %v", err)
		}
		t.Logf("backup across a restart failed clearly: %v", err)
		time.Sleep(1500 * time.Millisecond)
	} else {
		t.Logf("backup across a restart completed: %s", x.ID)
	}
	again, err := backup.OpenWith(ctx, v.location(), s3Settings)
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
