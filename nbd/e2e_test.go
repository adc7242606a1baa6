package nbd_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"umbra/cow"
	"umbra/frontend"
	"umbra/internal/testutil"
	"umbra/nbd"
	"umbra/provider"
)

// served is a COW volume behind a running NBD server on a unix socket.
type served struct {
	dir  string
	sock string
	vol  *cow.Volume
	srv  *nbd.Server
}

func (s *served) uri(export string) string {
	return "nbd+unix:///" + export + "?socket=" + s.sock
}

func serve(t *testing.T, size int64) *served {
	t.Helper()
	dir := t.TempDir()
	origin := filepath.Join(dir, "vol.img")
	testutil.SparseFile(t, origin, size)
	return serveOrigin(t, dir, origin)
}

// serveOrigin serves origin (a file or a block device) as volume "vol".
func serveOrigin(t *testing.T, dir, origin string) *served {
	t.Helper()
	v, err := cow.Open("vol", origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	p := cow.NewProvider()
	p.Add(v)
	sock := filepath.Join(dir, "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(frontend.NBDExports(p, nil), nbd.Options{})
	done := make(chan struct{})
	go func() { srv.Serve(context.Background(), l); close(done) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
		v.Close()
	})
	return &served{dir: dir, sock: sock, vol: v, srv: srv}
}

func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (apt-get install qemu-utils libnbd-bin fio)", tool)
		}
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func fails(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err == nil {
		t.Fatalf("%s %s succeeded, want failure\n%s", name, strings.Join(args, " "), out)
	}
	return string(out)
}

func TestRealClients(t *testing.T) {
	need(t, "qemu-io", "qemu-img", "nbdinfo", "nbdcopy")
	s := serve(t, 64<<20)

	list := run(t, "nbdinfo", "--list", s.uri(""))
	if !strings.Contains(list, "export=\"vol\"") && !strings.Contains(list, "vol") {
		t.Fatalf("nbdinfo --list does not show vol:\n%s", list)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "write -P 0x11 32M 64k", s.uri("vol"))
	run(t, "qemu-io", "-f", "raw", "-c", "read -P 0xab 0 1M", s.uri("vol"))

	if _, err := s.vol.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s1"}); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xcd 0 512k", s.uri("vol"))
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 0 1M", s.uri("vol@s1"))
	run(t, "qemu-io", "-f", "raw", "-c", "read -P 0xcd 0 512k", "-c", "read -P 0xab 512k 512k", s.uri("vol"))

	info := run(t, "qemu-img", "info", "-f", "raw", s.uri("vol@s1"))
	if !strings.Contains(info, "67108864") {
		t.Fatalf("qemu-img info of vol@s1 does not give the size:\n%s", info)
	}
	// Snapshots are read-only.
	out := fails(t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", s.uri("vol@s1"))
	if !strings.Contains(strings.ToLower(out), "read-only") && !strings.Contains(strings.ToLower(out), "permission") && !strings.Contains(strings.ToLower(out), "operation not permitted") {
		t.Logf("write to snapshot refused with: %s", out)
	}

	// base:allocation: the untouched tail of the sparse volume is a hole.
	m := run(t, "nbdinfo", "--map", s.uri("vol"))
	if !strings.Contains(m, "hole") || !strings.Contains(m, "data") {
		t.Fatalf("nbdinfo --map shows no holes and data:\n%s", m)
	}
	// umbra:changed:s1 marks exactly the first 512 KiB.
	m = run(t, "nbdinfo", "--map=umbra:changed:s1", s.uri("vol"))
	first := strings.Fields(strings.SplitN(m, "\n", 2)[0])
	if len(first) < 3 || first[0] != "0" || first[1] != "524288" || first[2] != "1" {
		t.Fatalf("changed map does not start with 0 524288 1:\n%s", m)
	}

	// nbdcopy both ways and qemu-img compare.
	img := filepath.Join(s.dir, "copy.img")
	run(t, "nbdcopy", s.uri("vol@s1"), img)
	got, _ := os.ReadFile(img)
	if !bytes.Equal(got[:1<<20], bytes.Repeat([]byte{0xab}, 1<<20)) || got[32<<20] != 0x11 {
		t.Fatal("nbdcopy of the snapshot has wrong content")
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, s.uri("vol@s1"))
	src := filepath.Join(s.dir, "src.img")
	os.WriteFile(src, bytes.Repeat([]byte{0x5a}, 64<<20), 0o600)
	run(t, "nbdcopy", src, s.uri("vol"))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri("vol"))
	// The snapshot still reads its commit point.
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, s.uri("vol@s1"))
	// qemu-img convert from the export.
	conv := filepath.Join(s.dir, "conv.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", s.uri("vol@s1"), conv)
	run(t, "qemu-img", "compare", "-F", "raw", conv, img)
}

func TestFio(t *testing.T) {
	need(t, "fio")
	s := serve(t, 64<<20)
	out := run(t, "fio", "--name=nbd", "--ioengine=nbd", "--uri="+s.uri("vol"), "--rw=randrw", "--bs=4k",
		"--iodepth=16", "--size=16M", "--time_based", "--runtime=2", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0")
	if !strings.Contains(out, "IOPS") {
		t.Fatalf("fio printed no IOPS:\n%s", out)
	}
}

// handshake performs the client side of a fixed newstyle handshake up to
// the option phase.
func handshake(t *testing.T, sock string) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(testutil.HangGuard))
	hdr := make([]byte, 18)
	if _, err := io.ReadFull(c, hdr); err != nil {
		t.Fatal(err)
	}
	if string(hdr[:8]) != "NBDMAGIC" || string(hdr[8:16]) != "IHAVEOPT" {
		t.Fatalf("bad greeting %q", hdr)
	}
	c.Write([]byte{0, 0, 0, 3}) // fixed newstyle, no zeroes
	return c
}

func sendOpt(c net.Conn, code uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, 0x49484156454f5054)
	b = binary.BigEndian.AppendUint32(b, code)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.Write(append(b, data...))
}

func readOptReply(t *testing.T, c net.Conn) (typ uint32, data []byte) {
	t.Helper()
	h := make([]byte, 20)
	if _, err := io.ReadFull(c, h); err != nil {
		t.Fatalf("option reply: %v", err)
	}
	typ = binary.BigEndian.Uint32(h[12:])
	data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	io.ReadFull(c, data)
	return typ, data
}

// goExport negotiates NBD_OPT_GO for name and returns the connection in
// the transmission phase.
func goExport(t *testing.T, sock, name string) net.Conn {
	c := handshake(t, sock)
	d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	d = append(d, name...)
	d = append(d, 0, 0)
	sendOpt(c, 7, d)
	for {
		typ, _ := readOptReply(t, c)
		if typ == 1 {
			return c
		}
		if typ&(1<<31) != 0 {
			t.Fatalf("GO %q refused: %#x", name, typ)
		}
	}
}

func request(c net.Conn, typ uint16, cookie, off uint64, length uint32) {
	b := binary.BigEndian.AppendUint32(nil, 0x25609513)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	c.Write(b)
}

func simpleReply(t *testing.T, c net.Conn) (errno uint32, cookie uint64) {
	t.Helper()
	h := make([]byte, 16)
	if _, err := io.ReadFull(c, h); err != nil {
		t.Fatalf("reply: %v", err)
	}
	return binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
}

func TestBadInput(t *testing.T) {
	s := serve(t, 1<<20)
	alive := func() {
		t.Helper()
		c := goExport(t, s.sock, "vol")
		request(c, 3, 1, 0, 0) // flush
		if errno, _ := simpleReply(t, c); errno != 0 {
			t.Fatalf("flush after bad input: errno %d", errno)
		}
		c.Close()
	}

	// Garbage instead of client flags and options.
	c, _ := net.Dial("unix", s.sock)
	io.ReadFull(c, make([]byte, 18))
	c.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
	c.Close()
	alive()

	// Unknown option: ERR_UNSUP, and the session goes on.
	c = handshake(t, s.sock)
	sendOpt(c, 999, nil)
	if typ, _ := readOptReply(t, c); typ != 1<<31+1 {
		t.Fatalf("unknown option answered %#x, want ERR_UNSUP", typ)
	}
	// Unknown export: ERR_UNKNOWN.
	d := binary.BigEndian.AppendUint32(nil, 4)
	sendOpt(c, 7, append(append(d, "nope"...), 0, 0))
	if typ, msg := readOptReply(t, c); typ != 1<<31+6 {
		t.Fatalf("GO for an unknown export answered %#x %q", typ, msg)
	}
	// Malformed INFO payload: ERR_INVALID.
	sendOpt(c, 6, []byte{0, 0, 0, 200})
	if typ, _ := readOptReply(t, c); typ != 1<<31+3 {
		t.Fatalf("malformed INFO answered %#x, want ERR_INVALID", typ)
	}
	c.Close()
	alive()

	c = goExport(t, s.sock, "vol")
	request(c, 0, 7, 1<<20, 4096) // read beyond the end
	if errno, cookie := simpleReply(t, c); errno != 22 || cookie != 7 {
		t.Fatalf("out-of-range read: errno %d cookie %d", errno, cookie)
	}
	request(c, 42, 8, 0, 0) // unknown command
	if errno, _ := simpleReply(t, c); errno != 22 {
		t.Fatalf("unknown command: errno %d, want EINVAL", errno)
	}
	// A write that ends past the end: ENOSPC, payload consumed.
	request(c, 1, 9, 1<<20-10, 20)
	c.Write(make([]byte, 20))
	if errno, _ := simpleReply(t, c); errno != 28 {
		t.Fatalf("write past the end: errno %d, want ENOSPC", errno)
	}
	// Vanish in the middle of a write payload.
	request(c, 1, 10, 0, 4096)
	c.Write(make([]byte, 100))
	c.Close()
	alive()

	// Writes to a snapshot export: EPERM.
	if _, err := s.vol.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "ro"}); err != nil {
		t.Fatal(err)
	}
	c = goExport(t, s.sock, "vol@ro")
	request(c, 1, 11, 0, 4)
	c.Write([]byte{1, 2, 3, 4})
	if errno, _ := simpleReply(t, c); errno != 1 {
		t.Fatalf("write to a snapshot: errno %d, want EPERM", errno)
	}
	c.Close()
	alive()
}

// TestHoldStallsOnlyWrites: small writes run on the goroutine that read
// them (TryWriter), but one that meets a hold goes to a goroutine of its
// own: a read sent after it on the same connection is answered while the
// write waits, and the write completes when the hold is released.
func TestHoldStallsOnlyWrites(t *testing.T) {
	s := serve(t, 1<<20)
	c := goExport(t, s.sock, "vol")
	defer c.Close()
	block := func(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }
	write := func(cookie, off uint64, p []byte) {
		request(c, 1, cookie, off, uint32(len(p)))
		c.Write(p)
	}
	write(1, 0, block(0xa1))
	if errno, cookie := simpleReply(t, c); errno != 0 || cookie != 1 {
		t.Fatalf("write: errno %d cookie %d", errno, cookie)
	}
	h, err := s.vol.Hold(context.Background(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	released := false
	defer func() {
		if !released {
			h.Release()
		}
	}()
	write(2, 4096, block(0xb2))
	request(c, 0, 3, 0, 4096) // a read after the held write
	c.SetReadDeadline(time.Now().Add(testutil.HangGuard))
	errno, cookie := simpleReply(t, c)
	if errno != 0 || cookie != 3 {
		t.Fatalf("first reply during the hold: errno %d cookie %d, want the read (3)", errno, cookie)
	}
	got := make([]byte, 4096)
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, block(0xa1)) {
		t.Fatalf("read during the hold: %v", err)
	}
	h.Release()
	released = true
	if errno, cookie := simpleReply(t, c); errno != 0 || cookie != 2 {
		t.Fatalf("held write after release: errno %d cookie %d", errno, cookie)
	}
	s.vol.ReadAt(got, 4096)
	if !bytes.Equal(got, block(0xb2)) {
		t.Fatal("the held write did not land")
	}
}

// TestInlineAndHandedReads: small reads of cached blocks are served on
// the goroutine that received them, large ones from the origin's mapping
// (a unix socket; TestMappedReads), and
// reads that would wait for the disk (here: blocks evicted from the page
// cache) by goroutines of their own with a copy; many pipelined on one
// connection, mixed with writes, every reply carries its own cookie's
// bytes.
func TestInlineAndHandedReads(t *testing.T) {
	const size = 4 << 20
	s := serve(t, size)
	want := make([]byte, size)
	for i := range want {
		want[i] = byte(i*7 + i>>12)
	}
	if _, err := s.vol.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.vol.Flush(); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(s.dir, "vol.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for off := int64(0); off < size; off += 128 << 10 { // evict every other 64 KiB
		unix.Fadvise(int(f.Fd()), off, 64<<10, unix.FADV_DONTNEED)
	}
	c := goExport(t, s.sock, "vol")
	defer c.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	type read struct{ off, n uint64 }
	reads := map[uint64]read{}
	var writes []uint64
	go func() { // the requests, pipelined
		for cookie := uint64(1); cookie <= 400; cookie++ {
			n := uint64(512 << rng.IntN(12)) // 512 B .. 1 MiB
			off := rng.Uint64N(size-n) &^ 511
			if cookie%10 == 0 { // a write of bytes equal to what is there
				request(c, 1, cookie, off, uint32(n))
				c.Write(want[off : off+n])
				continue
			}
			request(c, 0, cookie, off, uint32(n))
		}
	}()
	// The generator runs ahead with the same sequence: replay it here.
	rng2 := rand.New(rand.NewPCG(3, 4))
	for cookie := uint64(1); cookie <= 400; cookie++ {
		n := uint64(512 << rng2.IntN(12))
		off := rng2.Uint64N(size-n) &^ 511
		if cookie%10 == 0 {
			writes = append(writes, cookie)
			continue
		}
		reads[cookie] = read{off, n}
	}
	c.SetReadDeadline(time.Now().Add(testutil.HangGuard))
	for range 400 {
		errno, cookie := simpleReply(t, c)
		if errno != 0 {
			t.Fatalf("request %d: errno %d", cookie, errno)
		}
		r, ok := reads[cookie]
		if !ok {
			if !slices.Contains(writes, cookie) {
				t.Fatalf("reply to unknown or repeated cookie %d", cookie)
			}
			writes = slices.DeleteFunc(writes, func(w uint64) bool { return w == cookie })
			continue
		}
		delete(reads, cookie)
		readPayload(t, c, cookie, r.off, want[r.off:r.off+r.n])
	}
	if len(reads)+len(writes) != 0 {
		t.Fatalf("%d replies missing", len(reads)+len(writes))
	}
}

// TestSplicedWrites: writes larger than 64 KiB go from the socket into
// the origin file with splice(2). Pipelined batches of them, some with
// FUA, land byte-exact; a snapshot taken between batches keeps its bytes
// while the next batch overwrites them (the engine preserves before the
// splice); a large write that meets a hold goes the ordinary way and a
// read sent after it is answered during the hold.
func TestSplicedWrites(t *testing.T) {
	t.Run("file", func(t *testing.T) { splicedWrites(t, serve(t, 16<<20)) })
	// A block device origin: splice(2) into it and sendfile(2) and
	// cachestat(2) from it take other kernel paths than a file's.
	t.Run("blockdev", func(t *testing.T) {
		testutil.NeedRoot(t)
		testutil.Need(t, "losetup")
		dir := t.TempDir()
		back := filepath.Join(dir, "back.img")
		testutil.SparseFile(t, back, 16<<20)
		splicedWrites(t, serveOrigin(t, dir, testutil.Losetup(t, back, false, false)))
	})
}

func splicedWrites(t *testing.T, s *served) {
	const size = 16 << 20
	c := goExport(t, s.sock, "vol")
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(5, 6))
	cookie := uint64(0)
	batch := func() {
		t.Helper()
		// Non-overlapping writes: 1 MiB slots, each written at most once.
		slots := rng.Perm(size >> 20)[:8]
		sent := map[uint64]bool{}
		for _, slot := range slots {
			n := uint64(64<<10+512) << rng.IntN(4) // 64.5 KiB .. 516 KiB
			off := uint64(slot)<<20 + rng.Uint64N(1<<20-n)&^511
			p := make([]byte, n)
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
			copy(model[off:], p)
			cookie++
			var flags uint16
			if cookie%3 == 0 {
				flags = 1 // FUA
			}
			b := binary.BigEndian.AppendUint32(nil, 0x25609513)
			b = binary.BigEndian.AppendUint16(b, flags)
			b = binary.BigEndian.AppendUint16(b, 1)
			b = binary.BigEndian.AppendUint64(b, cookie)
			b = binary.BigEndian.AppendUint64(b, off)
			b = binary.BigEndian.AppendUint32(b, uint32(n))
			c.Write(append(b, p...))
			sent[cookie] = true
		}
		for range slots {
			errno, ck := simpleReply(t, c)
			if errno != 0 || !sent[ck] {
				t.Fatalf("write %d: errno %d", ck, errno)
			}
			delete(sent, ck)
		}
	}
	readBack := func(export string, want []byte) {
		t.Helper()
		rc := goExport(t, s.sock, export)
		defer rc.Close()
		got := make([]byte, 1<<20)
		for off := 0; off < size; off += len(got) {
			request(rc, 0, 1, uint64(off), uint32(len(got)))
			if errno, _ := simpleReply(t, rc); errno != 0 {
				t.Fatalf("read %s at %d: errno %d", export, off, errno)
			}
			if _, err := io.ReadFull(rc, got); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want[off:off+len(got)]) {
				t.Fatalf("%s: wrong bytes in [%d, +1 MiB)", export, off)
			}
		}
	}
	batch()
	batch()
	readBack("vol", model)
	if _, err := s.vol.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "mid"}); err != nil {
		t.Fatal(err)
	}
	atSnap := slices.Clone(model)
	batch()
	batch()
	readBack("vol", model)
	readBack("vol@mid", atSnap)

	// A hold: the large write waits on a goroutine of its own.
	h, err := s.vol.Hold(context.Background(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0xc3}, 256<<10)
	request(c, 1, 100, 0, uint32(len(p)))
	c.Write(p)
	request(c, 0, 101, 0, 4096)
	if errno, ck := simpleReply(t, c); errno != 0 || ck != 101 {
		h.Release()
		t.Fatalf("first reply during the hold: errno %d cookie %d, want the read (101)", errno, ck)
	}
	io.ReadFull(c, make([]byte, 4096))
	h.Release()
	if errno, ck := simpleReply(t, c); errno != 0 || ck != 100 {
		t.Fatalf("held write after release: errno %d cookie %d", errno, ck)
	}
	copy(model, p)
	readBack("vol", model)
}

// readPayload reads the payload of read reply cookie (for [off, +len(want)))
// and checks it is want.
func readPayload(t *testing.T, c net.Conn, cookie, off uint64, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d [%d,+%d): wrong bytes", cookie, off, len(want))
	}
}

// serveOne serves exports on a unix socket in dir until the test ends.
func serveOne(t *testing.T, dir string, exports nbd.Exports) (sock string, srv *nbd.Server) {
	t.Helper()
	sock = filepath.Join(dir, "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv = nbd.NewServer(exports, nbd.Options{})
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	return sock, srv
}

// oneExport serves one backend as the export it names.
type oneExport struct {
	name string
	b    nbd.Backend
}

func (e oneExport) List() []string { return []string{e.name} }
func (e oneExport) Lookup(name string) (*nbd.Export, error) {
	if name != e.name {
		return nil, os.ErrNotExist
	}
	return &nbd.Export{Name: e.name, Backend: e.b}, nil
}

// fileBackend is a file behind nbd.SpliceWriter. While refuse is set,
// writes go to bad, a file that fails them after the server has begun
// moving their payload; otherwise to good.
type fileBackend struct {
	bad, good *os.File
	refuse    atomic.Bool
}

func (b *fileBackend) ReadAt(p []byte, off int64) (int, error)  { return b.good.ReadAt(p, off) }
func (b *fileBackend) WriteAt(p []byte, off int64) (int, error) { return b.good.WriteAt(p, off) }
func (b *fileBackend) Size() int64                              { return 4 << 20 }
func (b *fileBackend) Flush() error                             { return nil }
func (b *fileBackend) TryWriteFrom(off, n int64, fill func(*os.File, int64) error) (bool, error) {
	if b.refuse.Load() {
		return true, fill(b.bad, off)
	}
	return true, fill(b.good, off)
}

// TestSplicedWriteRefused: when the file refuses a spliced write the
// client gets an error reply for it, the rest of its payload is skipped
// (whether it was already read into the server's buffer, in the pipe or
// still in the socket), and the next requests on the connection are
// served: a read, and a spliced write that lands exactly.
func TestSplicedWriteRefused(t *testing.T) {
	// Read-only: pwrite and splice fail (EBADF). O_APPEND: pwrite goes
	// to the end, splice fails (EINVAL) with payload bytes in the pipe.
	for _, flag := range []int{os.O_RDONLY, os.O_WRONLY | os.O_APPEND} {
		t.Run(fmt.Sprint("flag=", flag), func(t *testing.T) { refusedWrites(t, flag) })
	}
}

func refusedWrites(t *testing.T, flag int) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f.img")
	want := bytes.Repeat([]byte{7}, 4<<20)
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	bad, err := os.OpenFile(filepath.Join(dir, "bad.img"), os.O_CREATE|flag, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	good, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	b := &fileBackend{bad: bad, good: good}
	sock, _ := serveOne(t, dir, oneExport{"f", b})
	c := goExport(t, sock, "f")
	defer c.Close()
	for i, n := range []int{100 << 10, 1 << 20, 3 << 20} {
		ck := uint64(10 * (i + 1))
		b.refuse.Store(true)
		request(c, 1, ck, 0, uint32(n))
		c.Write(bytes.Repeat([]byte{9}, n))
		request(c, 0, ck+1, 4096, 4096)
		if errno, got := simpleReply(t, c); errno == 0 || got != ck {
			t.Fatalf("write of %d bytes to a refusing file: errno %d cookie %d, want an error for %d", n, errno, got, ck)
		}
		if errno, got := simpleReply(t, c); errno != 0 || got != ck+1 {
			t.Fatalf("read after the refused write: errno %d cookie %d", errno, got)
		}
		got := make([]byte, 4096)
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, want[4096:8192]) {
			t.Fatalf("read after the refused write: %v or wrong bytes", err)
		}
		b.refuse.Store(false)
		p := bytes.Repeat([]byte{byte(0x40 + i)}, n)
		request(c, 1, ck+2, 0, uint32(n))
		c.Write(p)
		if errno, got := simpleReply(t, c); errno != 0 || got != ck+2 {
			t.Fatalf("write after the refused one: errno %d cookie %d", errno, got)
		}
		copy(want, p)
		if on, _ := os.ReadFile(path); !bytes.Equal(on, want) {
			t.Fatalf("the write after the refused one (%d bytes) did not land exactly", n)
		}
	}
}

// TestStructuredOKIsSimple: with structured replies negotiated, a write,
// a flush and a trim that succeed are answered with a 16-byte simple
// reply (the protocol allows it for anything but a read; clients take it
// in one receive), a failed write with a structured error chunk that
// carries the message, and a read with a structured chunk.
func TestStructuredOKIsSimple(t *testing.T) {
	s := serve(t, 1<<20)
	c := handshake(t, s.sock)
	defer c.Close()
	sendOpt(c, 8, nil) // NBD_OPT_STRUCTURED_REPLY
	if typ, _ := readOptReply(t, c); typ != 1 {
		t.Fatalf("structured replies refused: %#x", typ)
	}
	sendOpt(c, 7, append(binary.BigEndian.AppendUint32(nil, 3), 'v', 'o', 'l', 0, 0))
	for {
		typ, _ := readOptReply(t, c)
		if typ == 1 {
			break
		}
		if typ&(1<<31) != 0 {
			t.Fatalf("GO refused: %#x", typ)
		}
	}
	magic := func() uint32 {
		t.Helper()
		h := make([]byte, 4)
		if _, err := io.ReadFull(c, h); err != nil {
			t.Fatal(err)
		}
		return binary.BigEndian.Uint32(h)
	}
	for _, op := range []uint16{1, 3, 4} { // write, flush, trim
		n := uint32(4096)
		if op == 3 {
			n = 0
		}
		request(c, op, uint64(op), 0, n)
		if op == 1 {
			c.Write(make([]byte, n))
		}
		if m := magic(); m != 0x67446698 {
			t.Fatalf("command %d: reply magic %#x, want a simple reply", op, m)
		}
		io.ReadFull(c, make([]byte, 12))
	}
	request(c, 1, 9, 1<<20, 4096) // beyond the end
	c.Write(make([]byte, 4096))
	if m := magic(); m != 0x668e33ef {
		t.Fatalf("failed write: reply magic %#x, want a structured error chunk", m)
	}
	h := make([]byte, 16)
	io.ReadFull(c, h)
	io.ReadFull(c, make([]byte, binary.BigEndian.Uint32(h[12:])))
	request(c, 0, 10, 0, 4096)
	if m := magic(); m != 0x668e33ef {
		t.Fatalf("read: reply magic %#x, want a structured chunk", m)
	}
}

// TestExportUsers: a volume counts an NBD client as a user from NBD_OPT_GO
// (or EXPORT_NAME) until it disconnects, and an NBD_OPT_INFO query not at
// all once answered — what the engine's revert refusal relies on.
func TestExportUsers(t *testing.T) {
	s := serve(t, 1<<20)
	users := func(want int) {
		t.Helper()
		testutil.WaitFor(t, fmt.Sprintf("%d NBD connection(s) among the volume's users", want), func() bool {
			got := s.vol.Users()
			return want == 0 && len(got) == 0 || want == 1 && slices.Equal(got, []string{"1 NBD connection(s)"})
		})
	}
	c := handshake(t, s.sock)
	d := binary.BigEndian.AppendUint32(nil, 3)
	d = append(d, "vol"...)
	d = append(d, 0, 0)
	sendOpt(c, 6, d) // NBD_OPT_INFO
	for typ := uint32(0); typ != 1; {
		typ, _ = readOptReply(t, c)
	}
	users(0)
	c.Close()

	c = goExport(t, s.sock, "vol")
	users(1)
	c.Close()
	users(0)

	c = handshake(t, s.sock)
	sendOpt(c, 1, []byte("vol")) // NBD_OPT_EXPORT_NAME
	io.ReadFull(c, make([]byte, 10))
	users(1)
	c.Close()
	users(0)
}

// mappedBackend is a file behind nbd.MappedReader: it lends slices of its
// own mapping of the file and counts loans and returns.
type mappedBackend struct {
	f              *os.File
	m              []byte
	lent, returned atomic.Int64
}

func (b *mappedBackend) ReadAt(p []byte, off int64) (int, error)  { return b.f.ReadAt(p, off) }
func (b *mappedBackend) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }
func (b *mappedBackend) Size() int64                              { return int64(len(b.m)) }
func (b *mappedBackend) Flush() error                             { return nil }
func (b *mappedBackend) MappedRange(off, n int64) ([]byte, func(), bool) {
	b.lent.Add(1)
	return b.m[off : off+n], func() { b.returned.Add(1) }, true
}

// TestMappedReads: on a unix socket, reads larger than 64 KiB of a
// MappedReader are sent from its mapping, pipelined replies each with its
// own bytes, every loan returned. When the mapping no longer has the bytes
// (the file was cut short under it: the kernel's copy faults) the
// connection is closed — the server does not crash, since it never reads
// the mapping itself — and the next connection is served.
func TestMappedReads(t *testing.T) {
	const size = 4 << 20
	dir := t.TempDir()
	path := filepath.Join(dir, "m.img")
	want := make([]byte, size)
	for i := range want {
		want[i] = byte(i*13 + i>>14)
	}
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	b := &mappedBackend{f: f, m: m}
	sock, srv := serveOne(t, dir, oneExport{"m", b})

	c := goExport(t, sock, "m")
	type read struct{ off, n uint64 }
	reads := map[uint64]read{}
	rng := rand.New(rand.NewPCG(5, 6))
	for cookie := uint64(1); cookie <= 64; cookie++ {
		n := uint64(128<<10) << rng.IntN(4) // 128 KiB .. 1 MiB
		r := read{rng.Uint64N(size-n) &^ 511, n}
		reads[cookie] = r
		request(c, 0, cookie, r.off, uint32(r.n))
	}
	c.SetReadDeadline(time.Now().Add(testutil.HangGuard))
	for range 64 {
		errno, cookie := simpleReply(t, c)
		r, ok := reads[cookie]
		if errno != 0 || !ok {
			t.Fatalf("reply to %d: errno %d, expected %v", cookie, errno, ok)
		}
		delete(reads, cookie)
		readPayload(t, c, cookie, r.off, want[r.off:r.off+r.n])
	}
	c.Close()
	if b.lent.Load() != 64 {
		t.Fatalf("%d of 64 large reads went through the mapping", b.lent.Load())
	}

	// Cut the file short under the mapping: the kernel's copy meets
	// pages past the end (SIGBUS if the server read them itself).
	if err := f.Truncate(size / 2); err != nil {
		t.Fatal(err)
	}
	c = goExport(t, sock, "m")
	request(c, 0, 1, size-(1<<20), 1<<20)
	c.SetReadDeadline(time.Now().Add(testutil.HangGuard))
	if _, err := io.ReadAll(c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read past the cut: %v (want the connection closed)", err)
	}
	c.Close()
	c = goExport(t, sock, "m") // the server is still up
	request(c, 0, 2, 0, 128<<10)
	c.SetReadDeadline(time.Now().Add(testutil.HangGuard))
	if errno, cookie := simpleReply(t, c); errno != 0 || cookie != 2 {
		t.Fatalf("after the cut: errno %d cookie %d", errno, cookie)
	}
	got := make([]byte, 128<<10)
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, want[:128<<10]) {
		t.Fatalf("after the cut: %v", err)
	}
	c.Close()
	srv.Shutdown(context.Background())
	if b.lent.Load() != b.returned.Load() {
		t.Fatalf("%d loans, %d returned", b.lent.Load(), b.returned.Load())
	}
}

// nbdsh runs a Python script under nbdsh (the handle is h) and returns
// its output. nbdsh runs the first python3 on PATH, which must be the one
// with Debian's libnbd module (python3-libnbd): /usr/bin goes first.
func nbdsh(t *testing.T, script string) string {
	t.Helper()
	need(t, "nbdsh")
	cmd := exec.Command("nbdsh", "-c", script)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "No module named nbd") {
			t.Skip("needs libnbd's Python module (apt-get install python3-libnbd)")
		}
		t.Fatalf("nbdsh -c %s: %v\n%s", script, err, out)
	}
	return string(out)
}

// TestZeroLengthRead: a read of 0 bytes succeeds with structured replies
// (libnbd's default) and without; the connection stays usable. libnbd
// drops a connection that answers it with an OFFSET_DATA chunk of length
// 8, which the protocol forbids.
func TestZeroLengthRead(t *testing.T) {
	s := serve(t, 1<<20)
	for _, structured := range []string{"True", "False"} {
		out := nbdsh(t, fmt.Sprintf(`
h.set_request_structured_replies(%s)
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ZERO_SIZE)  # let 0-byte requests through
h.connect_uri(%q)
assert h.get_structured_replies_negotiated() == %s
assert h.pread(0, 0) == b""
assert h.pread(0, 1<<20) == b""
h.pwrite(b"umbra", 4096)
assert h.pread(5, 4096) == b"umbra"
assert h.pread(0, 4096) == b""
print("ok")
`, structured, s.uri("vol"), structured))
		if !strings.Contains(out, "ok") {
			t.Fatalf("structured %s: %s", structured, out)
		}
	}
}

// TestListMetaContexts: NBD_OPT_LIST_META_CONTEXT with no query lists
// every context of the export, and a namespace query that namespace's:
// umbra:changed:SNAP for each snapshot.
func TestListMetaContexts(t *testing.T) {
	s := serve(t, 1<<20)
	for _, id := range []string{"s1", "s2"} {
		if _, err := s.vol.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	list := func(export string, queries ...string) []string {
		t.Helper()
		script := "h.set_opt_mode(True)\n"
		for _, q := range queries {
			script += fmt.Sprintf("h.add_meta_context(%q)\n", q)
		}
		script += fmt.Sprintf("h.connect_uri(%q)\n", s.uri(export))
		script += "h.opt_list_meta_context(lambda name: print(\"ctx\", name))\nh.opt_abort()\n"
		var got []string
		for _, l := range strings.Split(nbdsh(t, script), "\n") {
			if name, ok := strings.CutPrefix(l, "ctx "); ok {
				got = append(got, name)
			}
		}
		slices.Sort(got)
		return got
	}
	all := []string{"base:allocation", "umbra:changed:s1", "umbra:changed:s2"}
	for _, tc := range []struct {
		export  string
		queries []string
		want    []string
	}{
		{"vol", nil, all},
		{"vol", []string{"umbra:"}, all[1:]},
		{"vol", []string{"umbra:changed:"}, all[1:]},
		{"vol", []string{"base:"}, all[:1]},
		{"vol", []string{"umbra:changed:s2"}, all[2:]},
		{"vol", []string{"umbra:changed:nosuch"}, nil},
		{"vol", []string{"other:"}, nil},
		{"vol@s1", nil, all[:2]},
		{"vol@s2", []string{"umbra:"}, all[1:]},
	} {
		if got := list(tc.export, tc.queries...); !slices.Equal(got, tc.want) {
			t.Errorf("%s %q: listed %q, want %q", tc.export, tc.queries, got, tc.want)
		}
	}
	// nbdinfo shows an export's contexts from the same listing.
	need(t, "nbdinfo")
	info := run(t, "nbdinfo", s.uri("vol"))
	for _, ctx := range all {
		if !strings.Contains(info, ctx) {
			t.Errorf("nbdinfo does not show context %s:\n%s", ctx, info)
		}
	}
}

// TestMalformedExportNames: every malformed export name is refused, by a
// real client and on the wire, and none reaches an export: "vol@" once
// served the live volume read-write.
func TestMalformedExportNames(t *testing.T) {
	need(t, "nbdinfo", "qemu-io")
	s := serve(t, 1<<20)
	if _, err := s.vol.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s1"}); err != nil {
		t.Fatal(err)
	}
	uri := func(name string) string {
		return "nbd+unix:///" + url.PathEscape(name) + "?socket=" + s.sock
	}
	run(t, "nbdinfo", uri("vol"))
	run(t, "nbdinfo", uri("vol@s1"))
	for _, name := range []string{"vol@", "@s1", "@", "vol@s1@s1", "vol@@s1", "vol@s1 ", "vol@../s1", "vol@s1\t", "vol\u00e9@s1", "vol@-s1"} {
		fails(t, "nbdinfo", uri(name))
	}
	// A write through "vol@" is refused and changes nothing.
	fails(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4k", uri("vol@"))
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 4k", uri("vol"))

	// On the wire: NBD_OPT_GO of a malformed or overlong name gets an
	// error reply and the connection stays in the option phase.
	for _, name := range []string{"vol@", strings.Repeat("v", 5000)} {
		c := handshake(t, s.sock)
		d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
		d = append(append(d, name...), 0, 0)
		sendOpt(c, 7, d)
		if typ, msg := readOptReply(t, c); typ&(1<<31) == 0 || !strings.Contains(string(msg), "export name") {
			t.Errorf("GO of a %d-byte malformed name answered %#x %q, want an error naming the export name", len(name), typ, msg)
		}
		sendOpt(c, 3, nil) // NBD_OPT_LIST still works
		if typ, _ := readOptReply(t, c); typ != 2 {
			t.Errorf("LIST after a refused GO answered %#x", typ)
		}
		c.Close()
	}
}
