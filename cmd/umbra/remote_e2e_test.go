package main

import (
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"umbra/internal/testutil"
)

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestRemoteAPIAndMetrics: the CLI drives a service over TCP with TLS
// and bearer tokens (roles enforced, exit code 5 when refused), and the
// Prometheus endpoint reports NBD requests, snapshots, diff-area use,
// preserved chunks and hold times as they happen.
func TestRemoteAPIAndMetrics(t *testing.T) {
	testutil.Need(t, "qemu-io")
	dir := t.TempDir()
	ca := testutil.NewPKI(t)
	ca.WriteCA(t, filepath.Join(dir, "ca.pem"))
	testutil.WritePEM(t, ca.Issue(t, "umbra", true), filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key"))
	tokens := filepath.Join(dir, "tokens")
	os.WriteFile(tokens, []byte("token op-token-0123456789abcdef operator ops\ntoken view-token-0123456789abcde viewer dash\n"), 0o600)
	apiAddr, metricsAddr := freePort(t), freePort(t)
	s := startService(t, dir, []string{"a"}, "--api-listen", apiAddr, "--api-tls-cert", filepath.Join(dir, "server.pem"),
		"--api-tls-key", filepath.Join(dir, "server.key"), "--api-tokens", tokens, "--metrics-listen", metricsAddr)
	remote := func(tok string, args ...string) (string, int) {
		cmd := exec.Command(umbraBin, append([]string{"--api", apiAddr, "--ca", filepath.Join(dir, "ca.pem"), "--token", tok}, args...)...)
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return string(out), 0
	}
	qemuIO := func(cmd string) {
		if out, err := exec.Command("qemu-io", "-f", "raw", "-c", cmd, "nbd+unix:///a?socket="+s.nbd).CombinedOutput(); err != nil {
			t.Fatalf("qemu-io: %v %s", err, out)
		}
	}
	qemuIO("write -P 0x11 0 256k")
	if out, code := remote("op-token-0123456789abcdef", "snapshot", "create", "a", "--id", "r1"); code != 0 {
		t.Fatalf("operator create over TCP: exit %d %s", code, out)
	}
	if out, code := remote("view-token-0123456789abcde", "snapshot", "delete", "a", "r1"); code != 5 || !strings.Contains(out, "admin") {
		t.Fatalf("viewer delete over TCP: exit %d %s, want 5", code, out)
	}
	if out, code := remote("wrong-token-0123456789abcd", "volume", "list"); code != 5 {
		t.Fatalf("unknown token: exit %d %s, want 5", code, out)
	}
	if out, code := remote("view-token-0123456789abcde", "snapshot", "list"); code != 0 || !strings.Contains(out, "r1") {
		t.Fatalf("viewer list over TCP: exit %d %s", code, out)
	}
	qemuIO("write -P 0x42 0 256k") // overwrites what r1 holds: 64 chunks preserved
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	value := func(metric string) float64 {
		m := regexp.MustCompile("(?m)^" + regexp.QuoteMeta(metric) + ` (\S+)$`).FindStringSubmatch(string(body))
		if m == nil {
			t.Fatalf("metric %s missing from:\n%s", metric, body)
		}
		v, _ := strconv.ParseFloat(m[1], 64)
		return v
	}
	for _, c := range []struct {
		metric string
		min    float64
	}{
		{`umbra_nbd_requests_total{command="write"}`, 1},
		{`umbra_snapshots{volume="a"}`, 1},
		{`umbra_preserved_chunks_total{volume="a"}`, 64},
		{`umbra_diff_area_used_bytes{volume="a"}`, 256 << 10},
		{`umbra_hold_seconds_count`, 1},
	} {
		if v := value(c.metric); v < c.min {
			t.Errorf("%s = %v, want at least %v", c.metric, v, c.min)
		}
	}
	b, _ := os.ReadFile(filepath.Join(dir, "state", "audit.log"))
	if !strings.Contains(string(b), `"who":"ops"`) || !strings.Contains(string(b), `"who":"dash"`) {
		t.Errorf("audit log:\n%s", b)
	}
}
