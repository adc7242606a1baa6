package testutil

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// S3 is a real S3 server for tests: versitygw serving a directory.
type S3 struct {
	t    testing.TB
	bin  string
	dir  string
	Addr string // host:port
	cmd  *exec.Cmd
}

// S3 credentials the server accepts.
const (
	S3AccessKey = "umbratest"
	S3SecretKey = "umbratestsecret123"
	S3Bucket    = "umbra-test"
)

func versityBinary(t testing.TB) string {
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p
	}
	home, _ := os.UserHomeDir()
	for _, d := range []string{os.Getenv("GOBIN"), filepath.Join(os.Getenv("GOPATH"), "bin"), filepath.Join(home, "go", "bin")} {
		if p := filepath.Join(d, "versitygw"); d != "" && fileExists(p) {
			return p
		}
	}
	t.Skip("versitygw not found: go install github.com/versity/versitygw/cmd/versitygw@v1.8.0 (./scripts/test does)")
	return ""
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// StartS3 starts versitygw on a free localhost port with bucket
// S3Bucket; it is stopped when the test ends.
func StartS3(t testing.TB) *S3 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	// The local index caches of the S3 repositories the test opens (by
	// default under ~/.cache) go with the test.
	t.Setenv("UMBRA_CACHE_DIR", t.TempDir())
	s := &S3{t: t, bin: versityBinary(t), dir: t.TempDir(), Addr: addr}
	os.MkdirAll(filepath.Join(s.dir, S3Bucket), 0o755)
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

// Start (re)starts the server and waits until it listens.
func (s *S3) Start() {
	s.cmd = exec.Command(s.bin, "--port", s.Addr, "--access", S3AccessKey, "--secret", S3SecretKey, "posix", "--nometa", s.dir)
	s.cmd.Stderr = os.Stderr // errors only; its access log goes to stdout
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	for deadline := time.Now().Add(HangGuard); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", s.Addr); err == nil {
			c.Close()
			return
		}
	}
	s.t.Fatalf("versitygw did not listen on %s within %v", s.Addr, HangGuard)
}

// Stop kills the server (as a crash would).
func (s *S3) Stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.cmd = nil
	}
}

// Location is an Umbra repository location in the bucket.
func (s *S3) Location(prefix string) string {
	return "s3+http://" + s.Addr + "/" + S3Bucket + "/" + prefix
}

// Env is the environment that gives a client the credentials.
func (s *S3) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + S3AccessKey, "AWS_SECRET_ACCESS_KEY=" + S3SecretKey}
}
