package nbd_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"umbra/cow"
	"umbra/frontend"
	"umbra/nbd"
	"umbra/provider"
)

// BenchmarkWrite4K is what one 4 KiB write request costs the server as
// the kernel's nbd client sends them (bench/vm.sh): 16 in flight on one
// unix socket, random offsets, each block once per pass, the volume's
// blocks holding data. snap=none writes with no snapshot; snap=live
// under a live non-persistent snapshot, so every write is a first write
// that preserves its chunk (a new snapshot each pass over the volume,
// outside the timing). Beside time and allocations it reports, per
// request, the process's CPU time (user+system), context switches
// (voluntary ones are goroutine handoffs that parked a thread) and
// read/write system calls (/proc/self/io) — the client's included,
// which does the same work in every variant: compare variants and
// versions, not absolute figures. Under an emulated CPU (the VM) the
// CPU time a request costs is what bounds its throughput.
func BenchmarkWrite4K(b *testing.B) {
	for _, snap := range []bool{false, true} {
		b.Run(fmt.Sprintf("snap=%s", map[bool]string{false: "none", true: "live"}[snap]), func(b *testing.B) {
			benchWrites(b, snap, 1)
		})
	}
}

// BenchmarkWrite4KConns is BenchmarkWrite4K's writes spread over several
// connections to the same export, as
// `nbd-client -C N` makes them: the 16 requests in flight divided among
// the connections, each taking every conns-th request of the random
// order. Total requests a second for 1, 2 and 4 connections; with
// -mutexprofile/-blockprofile it shows where connections wait on each
// other.
func BenchmarkWrite4KConns(b *testing.B) {
	for _, snap := range []bool{false, true} {
		for _, conns := range []int{1, 2, 4} {
			b.Run(fmt.Sprintf("snap=%s/conns=%d", map[bool]string{false: "none", true: "live"}[snap], conns), func(b *testing.B) {
				benchWrites(b, snap, conns)
			})
		}
	}
}

func benchWrites(b *testing.B, snap bool, conns int) {
	const (
		block = 4 << 10
		size  = 32 << 20 // the bench's region
		depth = 16
	)
	dir := b.TempDir()
	origin := filepath.Join(dir, "vol.img")
	data := bytes.Repeat([]byte("umbra nbd bench "), size/16)
	if err := os.WriteFile(origin, data, 0o644); err != nil {
		b.Fatal(err)
	}
	v, err := cow.Open("vol", origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		b.Fatal(err)
	}
	p := cow.NewProvider()
	p.Add(v)
	sock := filepath.Join(dir, "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	srv := nbd.NewServer(frontend.NBDExports(p, nil), nbd.Options{})
	done := make(chan struct{})
	go func() { srv.Serve(context.Background(), l); close(done) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
		v.Close()
	}()
	cs := make([]net.Conn, conns)
	brs := make([]*bufio.Reader, conns)
	for k := range cs {
		cs[k] = benchExport(b, sock, "vol")
		defer cs[k].Close()
		brs[k] = bufio.NewReaderSize(cs[k], 64<<10)
	}

	ctx := context.Background()
	gen := 0
	newSnap := func() {
		if !snap {
			return
		}
		if gen > 0 {
			if err := v.DeleteSnapshot(fmt.Sprint("s", gen)); err != nil {
				b.Fatal(err)
			}
		}
		gen++
		if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: fmt.Sprint("s", gen)}); err != nil {
			b.Fatal(err)
		}
	}
	blocks := size / block
	order := rand.New(rand.NewPCG(1, 2)).Perm(blocks)
	// Requests prebuilt: the client allocates nothing while timed.
	reqs := make([][]byte, blocks)
	for i, blk := range order {
		r := make([]byte, 28+block)
		binary.BigEndian.PutUint32(r, 0x25609513)
		binary.BigEndian.PutUint16(r[6:], 1) // NBD_CMD_WRITE
		binary.BigEndian.PutUint64(r[8:], uint64(i))
		binary.BigEndian.PutUint64(r[16:], uint64(blk)*block)
		binary.BigEndian.PutUint32(r[24:], block)
		copy(r[28:], data[:block])
		r[28] = byte(i)
		reqs[i] = r
	}
	// pass sends requests from..to-1 with depth in flight in all, the
	// way the kernel's client does (a request as soon as a reply frees a
	// tag), connection k taking every conns-th request from from+k.
	pass := func(from, to int) {
		var wg sync.WaitGroup
		for k := range conns {
			c, br := cs[k], brs[k]
			tags := make(chan struct{}, max(depth/conns, 1))
			failed := make(chan struct{}) // closed when either side fails
			var once sync.Once
			fail := func(err error) {
				b.Error(err)
				once.Do(func() { close(failed); c.Close() })
			}
			wg.Add(2)
			go func() {
				defer wg.Done()
				for i := from + k; i < to; i += conns {
					select {
					case tags <- struct{}{}:
					case <-failed:
						return
					}
					if _, err := c.Write(reqs[i%blocks]); err != nil {
						fail(err)
						return
					}
				}
			}()
			go func() {
				defer wg.Done()
				var reply [16]byte
				for i := from + k; i < to; i += conns {
					if _, err := io.ReadFull(br, reply[:]); err != nil {
						fail(err)
						return
					}
					if e := binary.BigEndian.Uint32(reply[4:]); e != 0 {
						fail(fmt.Errorf("write failed: NBD error %d", e))
						return
					}
					<-tags
				}
			}()
		}
		wg.Wait()
		if b.Failed() {
			b.FailNow()
		}
	}
	newSnap()
	pass(0, min(blocks, 256)) // warm up: buffers, goroutines
	newSnap()
	io0, ru0 := procIO(b), rusage(b)
	b.ReportAllocs()
	b.ResetTimer()
	for done := 0; done < b.N; {
		n := min(b.N-done, blocks)
		pass(done, done+n)
		done += n
		if done < b.N {
			b.StopTimer()
			newSnap()
			b.StartTimer()
		}
	}
	b.StopTimer()
	io1, ru1 := procIO(b), rusage(b)
	n := float64(b.N)
	cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
	b.ReportMetric(float64(cpu.Microseconds())/n, "cpu-us/op")
	b.ReportMetric(float64(ru1.Nvcsw-ru0.Nvcsw)/n, "vcsw/op")
	b.ReportMetric(float64(ru1.Nivcsw-ru0.Nivcsw)/n, "ivcsw/op")
	b.ReportMetric(float64(io1["syscr"]-io0["syscr"])/n, "syscr/op")
	b.ReportMetric(float64(io1["syscw"]-io0["syscw"])/n, "syscw/op")
}

// benchExport negotiates NBD_OPT_GO for name on a new connection.
func benchExport(b *testing.B, sock, name string) net.Conn {
	c, err := net.Dial("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 18)); err != nil {
		b.Fatal(err)
	}
	c.Write([]byte{0, 0, 0, 3}) // fixed newstyle, no zeroes
	d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	d = append(append(d, name...), 0, 0)
	o := binary.BigEndian.AppendUint64(nil, 0x49484156454F5054)
	o = binary.BigEndian.AppendUint32(o, 7) // NBD_OPT_GO
	o = binary.BigEndian.AppendUint32(o, uint32(len(d)))
	c.Write(append(o, d...))
	for {
		h := make([]byte, 20)
		if _, err := io.ReadFull(c, h); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, binary.BigEndian.Uint32(h[16:]))); err != nil {
			b.Fatal(err)
		}
		switch typ := binary.BigEndian.Uint32(h[12:]); {
		case typ == 1:
			return c
		case typ&(1<<31) != 0:
			b.Fatalf("GO %q refused: %#x", name, typ)
		}
	}
}

// procIO is /proc/self/io as numbers.
func procIO(b *testing.B) map[string]int64 {
	raw, err := os.ReadFile("/proc/self/io")
	if err != nil {
		b.Fatal(err)
	}
	m := map[string]int64{}
	for _, line := range strings.Split(string(raw), "\n") {
		if k, val, ok := strings.Cut(line, ": "); ok {
			m[k], _ = strconv.ParseInt(val, 10, 64)
		}
	}
	return m
}

func rusage(b *testing.B) syscall.Rusage {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return ru
}
