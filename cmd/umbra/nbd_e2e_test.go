package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
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
	if rss > rssBudget {
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
