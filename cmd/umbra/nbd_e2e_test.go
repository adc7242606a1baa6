package main

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"umbra/internal/testutil"
)

// nbdGo opens export name on the NBD unix socket sock (fixed newstyle,
// NBD_OPT_GO) and returns the connection in the transmission phase.
func nbdGo(t *testing.T, sock, name string) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	if _, err := io.ReadFull(c, make([]byte, 18)); err != nil {
		t.Fatal(err)
	}
	c.Write([]byte{0, 0, 0, 3})
	d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	d = append(append(d, name...), 0, 0)
	opt := binary.BigEndian.AppendUint64(nil, 0x49484156454f5054)
	opt = binary.BigEndian.AppendUint32(opt, 7)
	opt = binary.BigEndian.AppendUint32(opt, uint32(len(d)))
	c.Write(append(opt, d...))
	for {
		h := make([]byte, 20)
		if _, err := io.ReadFull(c, h); err != nil {
			t.Fatal(err)
		}
		io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(h[16:])))
		switch typ := binary.BigEndian.Uint32(h[12:]); {
		case typ == 1:
			return c
		case typ&(1<<31) != 0:
			t.Fatalf("NBD_OPT_GO %s refused: %#x", name, typ)
		}
	}
}

// metric reads one unlabelled metric from the service's /metrics.
func metric(t *testing.T, addr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// peakRSS is a process's peak resident set (VmHWM), in bytes.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM")
	return 0
}

// TestNBDStalledClientMemory: an NBD client that asks for 1 GiB of 16 MiB
// reads of a snapshot (replies buffered in the service) and never reads a
// reply leaves `umbra serve` within its memory budget: the connection
// stops reading requests once 64 MiB of replies wait (the default
// per-connection budget), and the service's peak RSS stays under
// rssBudget (531 MiB measured for one such client before the bound).
func TestNBDStalledClientMemory(t *testing.T) {
	const rssBudget = 256 << 20
	metrics, dir := freePort(t), t.TempDir()
	// Data, not holes: replies of holes might not touch their pages.
	data := make([]byte, 16<<20)
	for i := range data {
		data[i] = byte(i/4096) | 1
	}
	if err := os.WriteFile(filepath.Join(dir, "v.img"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	s := startService(t, dir, []string{"v"}, "--metrics-listen", metrics)
	s.ok("snapshot", "create", "v", "--id", "s1")
	c := nbdGo(t, s.nbd, "v@s1")
	var reqs []byte
	for i := range 64 {
		r := binary.BigEndian.AppendUint32(nil, 0x25609513)
		r = binary.BigEndian.AppendUint32(r, 0) // flags 0, NBD_CMD_READ
		r = binary.BigEndian.AppendUint64(r, uint64(i))
		r = binary.BigEndian.AppendUint64(r, 0)
		r = binary.BigEndian.AppendUint32(r, 16<<20)
		reqs = append(reqs, r...)
	}
	if _, err := c.Write(reqs); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Minute); metric(t, metrics, "umbra_nbd_waiting_connections") != 1; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the NBD connection never stopped reading requests; service peak RSS %d MiB", peakRSS(t, s.cmd.Process.Pid)>>20)
		}
	}
	held := metric(t, metrics, "umbra_nbd_buffered_bytes")
	rss := peakRSS(t, s.cmd.Process.Pid)
	t.Logf("stalled client: service holds %.0f MiB of replies, peak RSS %d MiB", held/(1<<20), rss>>20)
	if held > 64<<20 {
		t.Errorf("service holds %.0f bytes of replies for one connection, budget 64 MiB", held)
	}
	if os.Getenv("UMBRA_RACE") != "" {
		t.Log("UMBRA_RACE: the race detector's shadow memory is in the RSS; not held to the budget")
	} else if rss > rssBudget {
		t.Errorf("service peak RSS %d MiB with one stalled NBD client, budget %d MiB", rss>>20, rssBudget>>20)
	}
	// The client reads after all: every reply comes.
	h := make([]byte, 16)
	for range 64 {
		if _, err := io.ReadFull(c, h); err != nil {
			t.Fatal(err)
		}
		if errno := binary.BigEndian.Uint32(h[4:]); errno != 0 {
			t.Fatalf("read %d: errno %d", binary.BigEndian.Uint64(h[8:]), errno)
		}
		if _, err := io.CopyN(io.Discard, c, 16<<20); err != nil {
			t.Fatal(err)
		}
	}
}

// TestNBDClientCertificates: with --nbd-tls-client-ca, NBD over TCP
// serves only clients with a certificate that CA signed: nbdinfo with
// one reads the volume, nbdinfo and a Go client without one are refused
// before any export is negotiated.
func TestNBDClientCertificates(t *testing.T) {
	if _, err := exec.LookPath("nbdinfo"); err != nil {
		t.Skip("needs nbdinfo (apt-get install libnbd-bin)")
	}
	dir := t.TempDir()
	pki := testutil.NewPKI(t)
	testutil.WritePEM(t, pki.Issue(t, "umbra-server", true), filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key"))
	pki.WriteCA(t, filepath.Join(dir, "ca.pem"))
	// GnuTLS's certificate directories, as nbdinfo, qemu and nbdkit use them.
	withCert, noCert := filepath.Join(dir, "client"), filepath.Join(dir, "anon")
	for _, d := range []string{withCert, noCert} {
		os.Mkdir(d, 0o700)
		pki.WriteCA(t, filepath.Join(d, "ca-cert.pem"))
	}
	testutil.WritePEM(t, pki.Issue(t, "backup-host", false), filepath.Join(withCert, "client-cert.pem"), filepath.Join(withCert, "client-key.pem"))
	// A certificate from another CA is refused too.
	other := filepath.Join(dir, "other")
	os.Mkdir(other, 0o700)
	pki.WriteCA(t, filepath.Join(other, "ca-cert.pem"))
	testutil.WritePEM(t, testutil.NewPKI(t).Issue(t, "intruder", false), filepath.Join(other, "client-cert.pem"), filepath.Join(other, "client-key.pem"))

	addr := freePort(t)
	startService(t, dir, []string{"v"}, "--nbd-listen", addr, "--tls-cert", filepath.Join(dir, "server.pem"),
		"--tls-key", filepath.Join(dir, "server.key"), "--nbd-tls-client-ca", filepath.Join(dir, "ca.pem"))
	uri := func(certs string) string { return "nbds://" + addr + "/v?tls-certificates=" + certs }
	if out, err := exec.Command("nbdinfo", "--size", uri(withCert)).CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "16777216" {
		t.Fatalf("nbdinfo with a client certificate: %v\n%s", err, out)
	}
	for _, certs := range []string{noCert, other} {
		if out, err := exec.Command("nbdinfo", "--size", uri(certs)).CombinedOutput(); err == nil {
			t.Errorf("nbdinfo with certificates %s was served:\n%s", filepath.Base(certs), out)
		}
	}

	// A Go client that trusts the server but has no certificate: the
	// TLS handshake fails, or the first option after it finds the
	// connection closed.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	io.ReadFull(c, make([]byte, 18))
	c.Write([]byte{0, 0, 0, 3})
	opt := func(w io.Writer, code uint32, data []byte) {
		b := binary.BigEndian.AppendUint64(nil, 0x49484156454f5054)
		b = binary.BigEndian.AppendUint32(b, code)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		w.Write(append(b, data...))
	}
	opt(c, 5, nil) // NBD_OPT_STARTTLS
	h := make([]byte, 20)
	if _, err := io.ReadFull(c, h); err != nil || binary.BigEndian.Uint32(h[12:]) != 1 {
		t.Fatalf("STARTTLS: %v %x", err, h)
	}
	tc := tls.Client(c, &tls.Config{RootCAs: pki.Pool, ServerName: "127.0.0.1"})
	if err := tc.Handshake(); err == nil {
		opt(tc, 7, append(binary.BigEndian.AppendUint32(nil, 1), 'v', 0, 0)) // NBD_OPT_GO v
		if _, err := io.ReadFull(tc, h); err == nil {
			t.Fatalf("a client without a certificate got an option reply %x", h)
		}
	}
}

// TestNBDMaxConnections: --nbd-max-connections caps the connections
// served at once; one more is closed before the greeting, and the one
// served goes on.
func TestNBDMaxConnections(t *testing.T) {
	s := startService(t, t.TempDir(), []string{"v"}, "--nbd-max-connections", "1")
	c := nbdGo(t, s.nbd, "v")
	extra, err := net.Dial("unix", s.nbd)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	extra.SetDeadline(time.Now().Add(time.Minute))
	if n, err := io.ReadFull(extra, make([]byte, 18)); err == nil {
		t.Fatalf("a second connection got the greeting (%d bytes) past --nbd-max-connections 1", n)
	}
	r := binary.BigEndian.AppendUint32(nil, 0x25609513)
	r = binary.BigEndian.AppendUint32(r, 3) // NBD_CMD_FLUSH
	r = append(r, make([]byte, 20)...)
	c.Write(r)
	h := make([]byte, 16)
	if _, err := io.ReadFull(c, h); err != nil || binary.BigEndian.Uint32(h[4:]) != 0 {
		t.Fatalf("flush on the served connection: %v %x", err, h)
	}
}
