// Package nbd is Umbra's NBD server: it serves volumes and snapshots to
// every NBD client (the kernel's nbd-client, qemu, libnbd's nbdinfo,
// nbdcopy and nbdfuse, fio) over a unix socket or TCP.
//
// It speaks the fixed newstyle handshake with NBD_OPT_GO/INFO/LIST/ABORT/
// EXPORT_NAME, STARTTLS, structured replies and meta contexts
// (base:allocation and umbra:changed:<snapshot>, Umbra's counterpart of
// qemu's qemu:dirty-bitmap:; NBD_OPT_LIST_META_CONTEXT with no query lists
// them all, with "umbra:" the umbra: ones), and the commands READ, WRITE (+FUA), FLUSH,
// TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), BLOCK_STATUS, CACHE and DISC.
// Requests on a connection run concurrently; replies are written whole
// under a lock, in completion order. Small writes and reads that need not
// wait (TryWriter, TryReader) run on the goroutine that read them, large
// cached reads go out with sendfile(2) (FileReader) and large writes come
// in with splice(2) (SpliceWriter), so the bytes skip a copy through user
// space; anything that would wait gets a goroutine of its own. On a plain
// socket requests and replies are read and written with raw system calls
// (rawSocket), which do not wake Go's monitor thread each time the server
// comes back from idle.
//
// Memory is bounded: a connection holds at most Options.ConnBuffer (64
// MiB) of read replies not yet written to the socket and write payloads
// not yet written to the export; past it, it stops reading requests until
// its client reads replies or its writes finish, whatever the client
// sends. A server serves at most Options.MaxConns (64) connections at
// once, so its buffers stay under 64 × 64 MiB = 4 GiB.
//
// Why our own: the Go NBD libraries found are clients or unmaintained
// servers without structured replies or meta contexts; the server is the
// front door to the COW engine and its change tracking, so Umbra owns it.
package nbd

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"umbra/provider"
)

// Extent is a run of an export for base:allocation.
type Extent struct {
	Off, Len   int64
	Hole, Zero bool
}

// Backend is the data an export serves: the same contract as a FUSE
// file's (fusefile.Backend), one interface for both.
type Backend = provider.Device

// TryWriter is a Backend that can tell a write that would wait for
// something besides its own I/O (a hold, a writer on the same blocks):
// TryWriteAt then writes nothing and returns ok false. The server writes
// small requests of such a backend on the goroutine that read them, the
// way nbdkit's threads do, and hands a goroutine only those that would
// wait — so a hold still stalls only the writes it holds.
type TryWriter interface {
	TryWriteAt(p []byte, off int64) (n int, ok bool, err error)
}

// TryReader is a Backend that can tell a read that would wait for a
// disk: TryReadAt then returns ok false. The server reads small requests
// that need not wait on the goroutine that received them (no hand-off,
// replies sent together) and gives the others a goroutine each, so reads
// from the disk still overlap.
type TryReader interface {
	TryReadAt(p []byte, off int64) (n int, ok bool, err error)
}

// FileReader is a Backend whose bytes lie in an OS file at the same
// offsets. CachedFile returns that file when [off, off+n) is in memory,
// so the server sends large reads with sendfile(2) — no copy through user
// space — without waiting for a disk while it holds the connection's
// reply stream; ok false means read the ordinary way.
type FileReader interface {
	CachedFile(off, n int64) (f *os.File, ok bool)
}

// MappedReader is a Backend that can lend [off, off+n) of a memory
// mapping when it is in memory, for the server to write to the socket
// (the kernel copies it once; the server never reads it itself, so a
// fault in it is an EFAULT from write, not a crash). release returns it.
// On a unix socket the server prefers it to sendfile(2), which hands the
// receiver the file's pages one by one and costs the client more than
// the copy saves the server (docs/benchmarks.md, measured 2026-12-03).
type MappedReader interface {
	MappedRange(off, n int64) (b []byte, release func(), ok bool)
}

// SpliceWriter is a Backend whose writes can go straight into its file:
// TryWriteFrom prepares [off, off+n) as WriteAt would and calls fill to
// put the bytes into f at off. The server then moves a large write's
// payload from the socket into the file with splice(2), without copying
// it through user space; ok false means the write would wait (a hold)
// and nothing happened, so it goes the ordinary way.
type SpliceWriter interface {
	TryWriteFrom(off, n int64, fill func(f *os.File, off int64) error) (ok bool, err error)
}

// Export is one named export. Optional capabilities are function fields;
// nil means not supported (or emulated, for WriteZeroes).
type Export struct {
	Name        string
	Description string
	Backend     Backend
	ReadOnly    bool
	// Trim discards a range (NBD_CMD_TRIM).
	Trim func(off, length int64) error
	// WriteZeroes writes zeros; noHole keeps the range allocated.
	WriteZeroes func(off, length int64, noHole bool) error
	// Extents describes allocation for base:allocation.
	Extents func(off, length int64) ([]Extent, error)
	// Changed returns what changed since a snapshot, for the meta context
	// umbra:changed:<snapshot>.
	Changed func(since string) (*provider.Bitmap, bool, error)
	// ChangedBases lists the snapshots Changed accepts, for
	// NBD_OPT_LIST_META_CONTEXT to offer as umbra:changed:<snapshot>.
	ChangedBases func() []string
	// Release is called once when the connection using the export ends
	// (or the handshake that looked it up does).
	Release func()
}

func (e *Export) release() {
	if e.Release != nil {
		e.Release()
	}
}

// Exports resolves export names; the set may change at any time.
type Exports interface {
	Lookup(name string) (*Export, error)
	List() []string
}

// Options configure a server.
type Options struct {
	// TLS enables NBD_OPT_STARTTLS; with RequireTLS, no export is served
	// before it.
	TLS        *tls.Config
	RequireTLS bool
	Logger     *slog.Logger
	// MaxInflight bounds concurrent requests per connection (default 32).
	MaxInflight int
	// ConnBuffer bounds the bytes one connection holds for its requests:
	// read replies not yet written to the socket and write payloads not
	// yet written to the export (default DefaultConnBuffer; smaller
	// values are raised to MinConnBuffer, what one request may need).
	// Past it the connection stops reading requests until its client
	// reads replies or its writes finish.
	ConnBuffer int64
	// MaxConns bounds the connections served at once (default
	// DefaultMaxConns); one more is closed as soon as it is accepted.
	// The server's buffers are bounded by MaxConns × ConnBuffer.
	MaxConns int
	// Observe, when set, is told of every request (its command name) and
	// of every error reply; it must be cheap and safe for concurrent use.
	Observe func(cmd string, failed bool)
	// Attached, when set, is told that connection nc (the accepted
	// socket, under any TLS) now serves export; the function it returns
	// runs when the connection lets the export go. The service learns
	// from it which kernel nbd devices are its clients (writers).
	Attached func(nc net.Conn, export string) (detached func())
}

// Memory bounds (package doc): with the defaults a server holds at most
// DefaultMaxConns × DefaultConnBuffer = 4 GiB of request and reply
// buffers, and a connection whose client stops reading replies at most
// 64 MiB. 64 MiB is two reads of the largest block or 64 of 1 MiB in
// flight, more than a client needs to keep the connection busy.
const (
	DefaultConnBuffer = 64 << 20
	MinConnBuffer     = MaxBlock + 4096 // the largest request and its reply header
	DefaultMaxConns   = 64
)

// CommandName names an NBD command for logs and metrics.
func CommandName(typ uint16) string {
	switch typ {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write_zeroes"
	case cmdBlockStatus:
		return "block_status"
	}
	return "unknown"
}

// Server serves exports over NBD.
type Server struct {
	exports Exports
	opts    Options
	log     *slog.Logger

	mu        sync.Mutex // guards listeners, conns, closing
	listeners map[net.Listener]bool
	conns     map[*conn]bool
	closing   bool
	wg        sync.WaitGroup // connections

	held     atomic.Int64 // bytes held by all connections' budgets
	peakConn atomic.Int64 // the most one connection has held
	waiting  atomic.Int64 // connections waiting for their budget
}

// BufferStats tells what a server holds in request and reply buffers.
type BufferStats struct {
	Held     int64 // bytes held now, all connections
	PeakConn int64 // the most one connection has held at once
	Waiting  int   // connections not reading requests until their client reads replies (or writes finish)
}

// BufferStats reports the server's buffered bytes (what Options.ConnBuffer
// bounds).
func (s *Server) BufferStats() BufferStats {
	return BufferStats{Held: s.held.Load(), PeakConn: s.peakConn.Load(), Waiting: int(s.waiting.Load())}
}

// NewServer returns a server for exports.
func NewServer(exports Exports, opts Options) *Server {
	if opts.MaxInflight <= 0 {
		opts.MaxInflight = 32
	}
	if opts.ConnBuffer <= 0 {
		opts.ConnBuffer = DefaultConnBuffer
	}
	opts.ConnBuffer = max(opts.ConnBuffer, MinConnBuffer)
	if opts.MaxConns <= 0 {
		opts.MaxConns = DefaultMaxConns
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Server{exports: exports, opts: opts, log: log, listeners: map[net.Listener]bool{}, conns: map[*conn]bool{}}
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("nbd: server closed")

// Serve accepts connections on l until Shutdown or ctx ends.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[l] = true
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			delete(s.listeners, l)
			s.mu.Unlock()
			if closing || ctx.Err() != nil {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		// stopping is made here, before Shutdown can see the conn.
		c := &conn{srv: s, nc: nc, log: s.log.With("remote", nc.RemoteAddr().String()), stopping: make(chan struct{})}
		c.budget.max = s.opts.ConnBuffer
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			nc.Close()
			return ErrServerClosed
		}
		if len(s.conns) >= s.opts.MaxConns {
			s.mu.Unlock()
			s.log.Warn("NBD connection refused: too many connections", "max", s.opts.MaxConns, "remote", nc.RemoteAddr().String())
			nc.Close()
			continue
		}
		s.conns[c] = true
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			c.serve()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// Shutdown stops accepting, lets requests in flight finish, flushes every
// writable export and closes the connections. It returns when all are
// done or ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.stop()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.conns {
			c.nc.Close()
		}
		s.mu.Unlock()
		return ctx.Err()
	}
}

type metaCtx struct {
	id    uint32
	name  string
	since string // for umbra:changed:
}

type conn struct {
	srv *Server
	nc  net.Conn
	log *slog.Logger

	rw         net.Conn // nc, or its TLS wrapper
	structured bool
	tls        bool
	exp        *Export
	metas      []metaCtx

	wmu       sync.Mutex      // guards bw
	unflushed bool            // inline replies in bw (reading goroutine only)
	scratch   []byte          // an inline read's reply (reading goroutine only)
	pipe      [2]int          // splice pipe for large writes (reading goroutine only)
	raw       syscall.RawConn // the socket, for sendfile and splice; nil under TLS
	unix      bool            // a unix socket without TLS (sendMapped)
	bw        *bufio.Writer   // replies: from the reply writer, or inline
	replies   chan reply      // to the reply writer, during transmission
	written   chan struct{}   // closed when the reply writer is done
	stopping  chan struct{}
	stopOnce  sync.Once
	inflight  sync.WaitGroup
	budget    budget // bytes held for requests and replies
}

// budget bounds the bytes a connection holds (Options.ConnBuffer).
type budget struct {
	mu   sync.Mutex    // guards used, wake
	used int64         // bytes taken
	wake chan struct{} // closed when bytes come back, if someone waits
	max  int64         // set before the connection starts
}

// take waits until n bytes fit in the connection's budget (n larger than
// the budget runs alone) and takes them; false if the connection stops
// first. Reading goroutine only.
func (c *conn) take(n int64) bool {
	if n <= 0 {
		return true
	}
	b, s := &c.budget, c.srv
	waited := false
	defer func() {
		if waited {
			s.waiting.Add(-1)
		}
	}()
	for {
		b.mu.Lock()
		if b.used == 0 || b.used+n <= b.max {
			b.used += n
			used := b.used
			b.mu.Unlock()
			s.held.Add(n)
			for p := s.peakConn.Load(); used > p && !s.peakConn.CompareAndSwap(p, used); p = s.peakConn.Load() {
			}
			return true
		}
		if b.wake == nil {
			b.wake = make(chan struct{})
		}
		wake := b.wake
		b.mu.Unlock()
		if !waited {
			waited = true
			s.waiting.Add(1)
		}
		select {
		case <-wake:
		case <-c.stopping:
			return false
		}
	}
}

// give returns n bytes taken with take.
func (c *conn) give(n int64) {
	if n <= 0 {
		return
	}
	b := &c.budget
	b.mu.Lock()
	b.used -= n
	if b.wake != nil {
		close(b.wake)
		b.wake = nil
	}
	b.mu.Unlock()
	c.srv.held.Add(-n)
}

func (c *conn) stop() {
	c.stopOnce.Do(func() {
		if c.stopping != nil {
			close(c.stopping)
		}
		c.nc.SetReadDeadline(time.Now())
	})
}

// socketBuffer is the send and receive buffer asked for on each
// connection: a 1 MiB reply then leaves in one or two wakeups of the
// client instead of five (unix sockets default to ~208 KiB); the kernel
// caps it at net.core.[rw]mem_max.
const socketBuffer = 4 << 20

func (c *conn) serve() {
	c.rw = c.nc
	if b, ok := c.nc.(interface {
		SetReadBuffer(int) error
		SetWriteBuffer(int) error
	}); ok {
		b.SetWriteBuffer(socketBuffer) // best effort: the defaults work too
		b.SetReadBuffer(socketBuffer)
	}
	if c.stopping == nil {
		c.stopping = make(chan struct{})
	}
	defer c.nc.Close()
	if err := c.handshake(); err != nil {
		if !errors.Is(err, io.EOF) && !errors.Is(err, errAbort) {
			c.log.Debug("handshake ended", "err", err)
		}
		return
	}
	defer c.exp.release()
	c.transmission()
}

var errAbort = errors.New("client aborted")

// reply is one encoded reply; bp, if set, goes back to the pool once
// written, and cost bytes to the connection's budget. With ok set it is
// a simple success reply to cookie instead, encoded by the reply writer
// straight into its buffer (nothing allocated for the commonest reply).
type reply struct {
	b      []byte
	bp     *[]byte
	cost   int64
	ok     bool
	cookie uint64
}

// write queues a reply for the reply writer.
func (c *conn) write(b []byte) { c.replies <- reply{b: b} }

// writeCost queues a reply whose cost bytes of the connection's budget
// are given back once it is written.
func (c *conn) writeCost(b []byte, cost int64) { c.replies <- reply{b: b, cost: cost} }

// writeOwned queues a pooled buffer holding a reply, likewise.
func (c *conn) writeOwned(bp *[]byte, cost int64) { c.replies <- reply{b: *bp, bp: bp, cost: cost} }

// replyWriter writes replies in completion order, coalescing those that
// are ready together into one write (many requests in flight finish at
// once). After a write error it only drains.
func (c *conn) replyWriter() {
	defer close(c.written)
	bw := c.bw
	var err error
	put := func(r reply) {
		switch {
		case err != nil:
		case r.ok:
			_, err = bw.Write(simpleReplyHeader(bw.AvailableBuffer(), 0, r.cookie))
		default:
			_, err = bw.Write(r.b)
		}
		if r.bp != nil {
			putBuf(r.bp)
		}
		c.give(r.cost)
	}
	for r := range c.replies {
		c.wmu.Lock()
		put(r)
	more:
		for {
			select {
			case r2, ok := <-c.replies:
				if !ok {
					break more
				}
				put(r2)
			default:
				break more
			}
		}
		if err == nil {
			err = bw.Flush()
		}
		c.wmu.Unlock()
		if err != nil {
			c.nc.Close() // the client is gone: stop reading too
		}
	}
	if err == nil {
		c.wmu.Lock()
		bw.Flush()
		c.wmu.Unlock()
	}
}

// inRange reports whether req's range lies within the export (its end
// computed without wrapping around 2^64).
func (c *conn) inRange(req request) bool {
	size := uint64(c.exp.Backend.Size())
	return req.offset <= size && uint64(req.length) <= size-req.offset
}

// plainWrite reports whether write request req is one the fast paths
// (inline, splice) may serve: the export takes writes, the range is
// within it and no flag but FUA is set. Anything else goes to handle,
// which answers it with the error it deserves.
func (c *conn) plainWrite(req request) bool {
	return !c.exp.ReadOnly && c.inRange(req) && req.flags&^cmdFlagFUA == 0
}

// inlineMax: writes to a TryWriter and reads from a TryReader up to this
// size are tried on the reading goroutine.
const inlineMax = 64 << 10

// writeInline tries write request req on the reading goroutine and
// buffers its reply; false means it must go to a goroutine (it would
// wait, or is not a small plain in-range write to a TryWriter).
func (c *conn) writeInline(req request, payload []byte) bool {
	tw, ok := c.exp.Backend.(TryWriter)
	if !ok || !c.plainWrite(req) || req.flags&cmdFlagFUA != 0 || req.length > inlineMax {
		return false
	}
	_, done, err := tw.TryWriteAt(payload, int64(req.offset))
	if !done {
		return false
	}
	c.replyInline(req, err)
	return true
}

// replyInline counts request req and buffers its reply (success, or err)
// for flushInline; reading goroutine only.
func (c *conn) replyInline(req request, err error) {
	if o := c.srv.opts.Observe; o != nil {
		o(CommandName(req.typ), false)
		if err != nil {
			o(CommandName(req.typ), true)
		}
	}
	if err != nil {
		c.bufferReply(c.errorReply(req, errnoOf(err), err.Error()))
		return
	}
	// Encoded in the write buffer's free room: no allocation.
	c.wmu.Lock()
	c.bw.Write(simpleReplyHeader(c.bw.AvailableBuffer(), 0, req.cookie))
	c.wmu.Unlock()
	c.unflushed = true
}

// bufferReply adds an encoded reply (copied) to those flushInline sends;
// a write error shows on that flush. Reading goroutine only.
func (c *conn) bufferReply(b []byte) {
	c.wmu.Lock()
	c.bw.Write(b)
	c.wmu.Unlock()
	c.unflushed = true
}

// flushUnlessMore sends the buffered inline replies unless another
// request is already in r: then they wait and go out together.
func (c *conn) flushUnlessMore(r *bufio.Reader) {
	if r.Buffered() < requestSize {
		c.flushInline()
	}
}

// readInline serves read request req on the reading goroutine when the
// backend has the bytes at hand, buffering the reply; false means it
// goes to a goroutine (it would wait, failed, or is not a small plain
// in-range read of a TryReader).
func (c *conn) readInline(req request) bool {
	tr, ok := c.exp.Backend.(TryReader)
	if !ok || req.flags != 0 || !c.inRange(req) {
		return false
	}
	n := int(req.length)
	hdrLen := c.readHeaderLen(n)
	if c.scratch == nil {
		c.scratch = make([]byte, 28+inlineMax)
	}
	b := c.scratch[:hdrLen+n]
	if got, ok, err := tr.TryReadAt(b[hdrLen:], int64(req.offset)); !ok || err != nil || got != n {
		return false // the goroutine's ReadAt reports any error
	}
	if o := c.srv.opts.Observe; o != nil {
		o(CommandName(req.typ), false)
	}
	c.appendReadHeader(b[:0], req)
	c.bufferReply(b) // copied: scratch is reused
	return true
}

const (
	spliceNot    = iota // not taken: nothing consumed, go the ordinary way
	spliceDone          // the payload consumed and the reply buffered
	spliceBroken        // the connection failed mid-payload
)

// spliceWrite serves large write request req on the reading goroutine
// when the backend is a SpliceWriter that need not wait and the
// connection a plain socket: the payload part already read goes in with
// one pwrite, the rest with splice(2) socket -> pipe -> file.
func (c *conn) spliceWrite(r *bufio.Reader, req request) int {
	sw, ok := c.exp.Backend.(SpliceWriter)
	if !ok || c.raw == nil || !c.plainWrite(req) || !c.openPipe() {
		return spliceNot
	}
	n := int(req.length)
	consumed := 0
	var sockErr error
	ok, err := sw.TryWriteFrom(int64(req.offset), int64(n), func(f *os.File, at int64) error {
		head, _ := r.Peek(min(r.Buffered(), n))
		_, werr := f.WriteAt(head, at)
		r.Discard(len(head))
		consumed = len(head)
		if werr != nil {
			return werr
		}
		frc, err := f.SyscallConn()
		if err != nil {
			return err
		}
		var res spliced
		if cerr := frc.Control(func(ffd uintptr) { res = c.spliceIn(int(ffd), at, consumed, n) }); cerr != nil {
			return cerr
		}
		consumed, sockErr = res.consumed, res.sockErr
		return res.fileErr
	})
	if !ok {
		return spliceNot
	}
	if sockErr != nil {
		c.log.Debug("client gone mid-write", "err", sockErr)
		return spliceBroken
	}
	if consumed < n { // the file refused: keep the stream in step
		if _, derr := io.CopyN(io.Discard, r, int64(n-consumed)); derr != nil {
			return spliceBroken
		}
	}
	if err == nil && req.flags&cmdFlagFUA != 0 {
		err = c.exp.Backend.Flush()
	}
	c.replyInline(req, err)
	return spliceDone
}

// spliced is what spliceIn did.
type spliced struct {
	// consumed is how many payload bytes were taken from the socket: all
	// of them unless the socket failed (bytes the file refused are read
	// out of the pipe and dropped).
	consumed int
	sockErr  error // the socket failed: the stream is broken
	fileErr  error // the file refused bytes: the request fails
}

// spliceIn moves payload bytes consumed..n from the socket into file
// descriptor ffd at at+consumed through the connection's pipe.
func (c *conn) spliceIn(ffd int, at int64, consumed, n int) spliced {
	pos := at + int64(consumed)
	for consumed < n {
		var k int
		var err error
		if rerr := c.raw.Read(func(sfd uintptr) bool {
			var k64 int64
			k64, err = unix.Splice(int(sfd), nil, c.pipe[1], nil, n-consumed, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			k = int(k64)
			return err != unix.EAGAIN
		}); rerr != nil {
			return spliced{consumed: consumed, sockErr: rerr}
		}
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return spliced{consumed: consumed, sockErr: err}
		case k == 0:
			return spliced{consumed: consumed, sockErr: io.ErrUnexpectedEOF}
		}
		consumed += k
		for k > 0 {
			m, err := unix.Splice(c.pipe[0], nil, ffd, &pos, k, unix.SPLICE_F_MOVE)
			if err == unix.EINTR {
				continue
			}
			if err != nil || m == 0 {
				if derr := c.drainPipe(k); derr != nil {
					return spliced{consumed: consumed, sockErr: derr}
				}
				return spliced{consumed: consumed, fileErr: cmp.Or(err, io.ErrShortWrite)}
			}
			k -= int(m)
		}
	}
	return spliced{consumed: consumed}
}

// drainPipe reads and drops k bytes left in the connection's pipe.
func (c *conn) drainPipe(k int) error {
	var b [64 << 10]byte
	for k > 0 {
		m, err := unix.Read(c.pipe[0], b[:min(k, len(b))])
		if err == unix.EINTR {
			continue
		}
		if err != nil || m == 0 {
			return cmp.Or(err, io.ErrUnexpectedEOF)
		}
		k -= m
	}
	return nil
}

// openPipe makes the connection's splice pipe (1 MiB where the system
// allows, else the default 64 KiB: it only takes more rounds); false if
// there is none.
func (c *conn) openPipe() bool {
	if c.pipe[1] != 0 {
		return true
	}
	var p [2]int
	if unix.Pipe2(p[:], unix.O_CLOEXEC) != nil {
		return false
	}
	unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, 1<<20)
	c.pipe = p
	return true
}

// flushInline sends the replies writeInline buffered, if any.
func (c *conn) flushInline() {
	if !c.unflushed {
		return
	}
	c.unflushed = false
	c.wmu.Lock()
	if c.bw.Buffered() > 0 && c.bw.Flush() != nil {
		c.nc.Close()
	}
	c.wmu.Unlock()
}

func (c *conn) handshake() error {
	hdr := make([]byte, 18)
	binary.BigEndian.PutUint64(hdr, magicNBD)
	binary.BigEndian.PutUint64(hdr[8:], magicIHaveOpt)
	binary.BigEndian.PutUint16(hdr[16:], flagFixedNewstyle|flagNoZeroes)
	c.nc.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.nc.Write(hdr); err != nil {
		return err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.nc, cf[:]); err != nil {
		return err
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&clientFixedNewstyle == 0 {
		return fmt.Errorf("client does not speak fixed newstyle: %w", ErrProtocol)
	}
	if clientFlags&^uint32(clientFixedNewstyle|clientNoZeroes) != 0 {
		return fmt.Errorf("unknown client flags %#x: %w", clientFlags, ErrProtocol)
	}
	noZeroes := clientFlags&clientNoZeroes != 0
	for n := 0; n < 1000; n++ {
		var oh [16]byte
		if _, err := io.ReadFull(c.rw, oh[:]); err != nil {
			return err
		}
		code, length, err := decodeOptionHeader(oh[:])
		if err != nil {
			return err
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.rw, data); err != nil {
			return err
		}
		done, err := c.option(code, data, noZeroes)
		if err != nil || done {
			if done {
				c.nc.SetDeadline(time.Time{})
			}
			return err
		}
	}
	return fmt.Errorf("more than 1000 options: %w", ErrProtocol)
}

// reply sends one option reply.
func (c *conn) reply(opt, typ uint32, data []byte) error {
	_, err := c.rw.Write(optReply(opt, typ, data))
	return err
}

func (c *conn) replyErr(opt, typ uint32, msg string) error {
	return c.reply(opt, typ, []byte(clipString(msg)))
}

// maxString is the NBD protocol's bound on a string (an export name, an
// error message): at most 4096 bytes.
const maxString = 4096

// clipString cuts msg to maxString bytes on a UTF-8 boundary: an error
// message quoting a client's long export name must stay a valid string,
// and an error chunk's message length is only 16 bits.
func clipString(msg string) string {
	if len(msg) <= maxString {
		return msg
	}
	i := maxString
	for i > maxString-utf8.UTFMax && !utf8.RuneStart(msg[i]) {
		i--
	}
	return msg[:i]
}

// option handles one option; done means the transmission phase starts.
func (c *conn) option(code uint32, data []byte, noZeroes bool) (done bool, err error) {
	needTLS := c.srv.opts.RequireTLS && c.srv.opts.TLS != nil && !c.tls
	if needTLS && code != optStartTLS && code != optAbort {
		if code == optExportName {
			return false, fmt.Errorf("EXPORT_NAME before STARTTLS: %w", ErrProtocol)
		}
		return false, c.replyErr(code, repErrTLSReqd, "TLS is required: send NBD_OPT_STARTTLS first")
	}
	switch code {
	case optAbort:
		c.reply(code, repAck, nil)
		return false, errAbort
	case optList:
		if len(data) != 0 {
			return false, c.replyErr(code, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, name := range c.srv.exports.List() {
			b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
			if err := c.reply(code, repServer, append(b, name...)); err != nil {
				return false, err
			}
		}
		return false, c.reply(code, repAck, nil)
	case optStartTLS:
		if c.srv.opts.TLS == nil {
			return false, c.replyErr(code, repErrUnsup, "TLS is not configured on this server")
		}
		if c.tls || len(data) != 0 {
			return false, c.replyErr(code, repErrInvalid, "TLS already started or data given")
		}
		if err := c.reply(code, repAck, nil); err != nil {
			return false, err
		}
		t := tls.Server(c.nc, c.srv.opts.TLS)
		if err := t.Handshake(); err != nil {
			return false, fmt.Errorf("TLS handshake: %w", err)
		}
		c.rw, c.tls = t, true
		return false, nil
	case optStructuredReply:
		if len(data) != 0 {
			return false, c.replyErr(code, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return false, c.reply(code, repAck, nil)
	case optExportName:
		if len(data) > maxString {
			return false, fmt.Errorf("export name of %d bytes: %w", len(data), ErrProtocol)
		}
		exp, err := c.srv.exports.Lookup(string(data))
		if err != nil {
			return false, fmt.Errorf("export %q: %w", data, err)
		}
		b := binary.BigEndian.AppendUint64(nil, uint64(exp.Backend.Size()))
		b = binary.BigEndian.AppendUint16(b, transmissionFlags(exp))
		if !noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		if _, err := c.rw.Write(b); err != nil {
			exp.release()
			return false, err
		}
		c.attach(exp)
		c.exp = exp
		c.metas = nil
		return true, nil
	case optInfo, optGo:
		req, err := decodeInfoRequest(data)
		if err != nil {
			return false, c.replyErr(code, repErrInvalid, err.Error())
		}
		exp, err := c.srv.exports.Lookup(req.name)
		if err != nil {
			return false, c.replyErr(code, repErrUnknown, fmt.Sprintf("export %q: %v; NBD_OPT_LIST shows the exports", req.name, err))
		}
		kept := false // by the connection, after NBD_OPT_GO
		defer func() {
			if !kept {
				exp.release()
			}
		}()
		info := binary.BigEndian.AppendUint16(nil, infoExport)
		info = binary.BigEndian.AppendUint64(info, uint64(exp.Backend.Size()))
		info = binary.BigEndian.AppendUint16(info, transmissionFlags(exp))
		if err := c.reply(code, repInfo, info); err != nil {
			return false, err
		}
		bs := binary.BigEndian.AppendUint16(nil, infoBlockSize)
		bs = binary.BigEndian.AppendUint32(bs, 1)
		bs = binary.BigEndian.AppendUint32(bs, 4096)
		bs = binary.BigEndian.AppendUint32(bs, MaxBlock)
		if err := c.reply(code, repInfo, bs); err != nil {
			return false, err
		}
		for _, want := range req.infos {
			var b []byte
			switch want {
			case infoName:
				b = append(binary.BigEndian.AppendUint16(nil, infoName), clipString(exp.Name)...)
			case infoDescription:
				b = append(binary.BigEndian.AppendUint16(nil, infoDescription), clipString(exp.Description)...)
			default:
				continue
			}
			if err := c.reply(code, repInfo, b); err != nil {
				return false, err
			}
		}
		if err := c.reply(code, repAck, nil); err != nil {
			return false, err
		}
		if code == optGo {
			c.attach(exp)
			c.exp, kept = exp, true
			return true, nil
		}
		return false, nil
	case optListMetaContext, optSetMetaContext:
		return false, c.metaContext(code, data)
	default:
		return false, c.replyErr(code, repErrUnsup, fmt.Sprintf("option %d is not supported", code))
	}
}

// attach tells Options.Attached that the connection keeps exp, and has
// exp's release tell it the connection let go.
func (c *conn) attach(exp *Export) {
	if c.srv.opts.Attached == nil {
		return
	}
	detached := c.srv.opts.Attached(c.nc, exp.Name)
	prev := exp.Release
	exp.Release = func() {
		detached()
		if prev != nil {
			prev()
		}
	}
}

func transmissionFlags(exp *Export) uint16 {
	f := uint16(tfHasFlags | tfSendFlush | tfSendFUA | tfCanMultiConn | tfSendCache)
	if exp.ReadOnly {
		f |= tfReadOnly
		return f
	}
	f |= tfSendWriteZeroes | tfSendFastZero
	if exp.Trim != nil {
		f |= tfSendTrim
	}
	return f
}

const changedPrefix = "umbra:changed:"

func (c *conn) metaContext(code uint32, data []byte) error {
	if code == optSetMetaContext && !c.structured {
		return c.replyErr(code, repErrInvalid, "NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first")
	}
	req, err := decodeMetaRequest(data)
	if err != nil {
		return c.replyErr(code, repErrInvalid, err.Error())
	}
	exp, err := c.srv.exports.Lookup(req.export)
	if err != nil {
		return c.replyErr(code, repErrUnknown, fmt.Sprintf("export %q: %v", req.export, err))
	}
	defer exp.release()
	var picked []metaCtx
	seen := map[string]bool{}
	add := func(name, since string) {
		if !seen[name] {
			seen[name] = true
			picked = append(picked, metaCtx{id: uint32(len(picked) + 1), name: name, since: since})
		}
	}
	// Every umbra:changed: context the export has, for listing.
	addChanged := func() {
		if exp.Changed == nil || exp.ChangedBases == nil {
			return
		}
		for _, since := range exp.ChangedBases() {
			add(changedPrefix+since, since)
		}
	}
	list := code == optListMetaContext
	if list && len(req.queries) == 0 {
		// No query lists every context the export has.
		add("base:allocation", "")
		addChanged()
	}
	for _, q := range req.queries {
		switch {
		case q == "base:allocation" || (list && q == "base:"):
			add("base:allocation", "")
		case list && (q == "umbra:" || q == changedPrefix):
			// A namespace (or a leaf prefix) lists what is in it;
			// NBD_OPT_SET_META_CONTEXT selects only whole names.
			addChanged()
		case strings.HasPrefix(q, changedPrefix) && len(q) > len(changedPrefix) && exp.Changed != nil:
			since := q[len(changedPrefix):]
			if _, _, err := exp.Changed(since); err == nil {
				add(q, since)
			}
		}
	}
	if code == optSetMetaContext {
		c.metas = picked
	}
	for _, m := range picked {
		b := binary.BigEndian.AppendUint32(nil, m.id)
		if err := c.reply(code, repMetaContext, append(b, m.name...)); err != nil {
			return err
		}
	}
	return c.reply(code, repAck, nil)
}

// Request and reply buffers come from pools by size: 4 KiB, 64 KiB and
// 1 MiB of data, each with room for a reply header. One pool of 1 MiB
// buffers made every small request that missed it (a write waiting for a
// hold, when no inline write is possible) allocate and zero 1 MiB: ~130 us
// of the reading goroutine's time each, on both cores while a hold waits
// for them, measured. Larger buffers are not pooled.
var bufClasses = [...]int{4<<10 + bufSlack, 64<<10 + bufSlack, 1<<20 + bufSlack}

// bufSlack is the room past a power of two for a reply header.
const bufSlack = 64

var bufPools [len(bufClasses)]sync.Pool

func init() {
	for i, n := range bufClasses {
		bufPools[i].New = func() any { b := make([]byte, 0, n); return &b }
	}
}

// getBuf returns a buffer of length n; putBuf hands it back.
func getBuf(n int) *[]byte {
	for i, c := range bufClasses {
		if n <= c {
			bp := bufPools[i].Get().(*[]byte)
			*bp = (*bp)[:n]
			return bp
		}
	}
	b := make([]byte, n)
	return &b
}

func putBuf(bp *[]byte) {
	for i, c := range bufClasses {
		if cap(*bp) == c {
			bufPools[i].Put(bp)
			return
		}
	}
}

func (c *conn) transmission() {
	sem := make(chan struct{}, c.srv.opts.MaxInflight)
	var hdr [requestSize]byte
	// Buffered: a request header and a small payload cost one read
	// syscall, not two.
	if sc, ok := c.nc.(syscall.Conn); ok && !c.tls {
		c.raw, _ = sc.SyscallConn() // nil on error: the copying paths
		_, c.unix = c.nc.(*net.UnixConn)
	}
	var sock io.ReadWriter = c.rw
	if c.raw != nil {
		sock = newRawSocket(c.raw)
	}
	r := bufio.NewReaderSize(sock, 256<<10)
	c.replies, c.written = make(chan reply, 2*c.srv.opts.MaxInflight), make(chan struct{})
	c.bw = bufio.NewWriterSize(sock, 256<<10)
	go c.replyWriter()
	defer func() {
		if c.pipe[1] != 0 {
			unix.Close(c.pipe[0])
			unix.Close(c.pipe[1])
		}
		c.inflight.Wait()
		close(c.replies)
		<-c.written
		if !c.exp.ReadOnly {
			c.exp.Backend.Flush()
		}
	}()
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return
		}
		req, err := decodeRequest(hdr[:])
		if err != nil {
			c.log.Debug("bad request, closing", "err", err)
			return
		}
		var payload *[]byte
		var cost int64 // bytes of the budget the request holds
		if req.typ == cmdWrite {
			if req.length > MaxBlock {
				// Consume it so the stream stays in sync, then refuse.
				if _, err := io.CopyN(io.Discard, r, int64(req.length)); err != nil {
					return
				}
				c.sendError(req, errOverflow, "write larger than the maximum block size")
				continue
			}
			if req.length <= inlineMax {
				// Written from the read buffer itself when it can be done
				// here (no copy), else copied out for a goroutine.
				data, err := r.Peek(int(req.length))
				if err != nil {
					return
				}
				if c.writeInline(req, data) {
					r.Discard(len(data))
					c.flushUnlessMore(r)
					continue
				}
			} else {
				switch c.spliceWrite(r, req) {
				case spliceDone:
					c.flushUnlessMore(r)
					continue
				case spliceBroken:
					return
				}
			}
			// The payload waits in memory for the export: it counts
			// against the budget until written.
			cost = int64(req.length)
			c.flushInline()
			if !c.take(cost) {
				return
			}
			payload = getBuf(int(req.length))
			if _, err := io.ReadFull(r, *payload); err != nil {
				putBuf(payload)
				c.give(cost)
				return
			}
		}
		if req.typ == cmdRead && req.length <= inlineMax && c.readInline(req) {
			c.flushUnlessMore(r)
			continue
		}
		if req.typ == cmdDisc {
			c.flushInline()
			return
		}
		c.flushInline()
		// A read's reply, and a block status's, waits in memory for the
		// client: it counts against the budget until written.
		switch {
		case req.typ == cmdRead && req.length <= MaxBlock:
			cost = int64(c.readHeaderLen(int(req.length))) + int64(req.length)
		case req.typ == cmdBlockStatus:
			cost = int64(len(c.metas)) * (24 + 8*maxDescriptors)
		}
		if req.typ != cmdWrite && !c.take(cost) {
			return
		}
		select {
		case sem <- struct{}{}:
		case <-c.stopping:
			c.give(cost)
			if payload != nil {
				putBuf(payload)
			}
			return
		}
		c.inflight.Add(1)
		go func() {
			defer func() { <-sem; c.inflight.Done() }()
			kept := c.handle(req, payload, cost)
			if payload != nil {
				putBuf(payload)
			}
			c.give(cost - kept)
		}()
	}
}

func (c *conn) sendError(req request, errno uint32, msg string) {
	if o := c.srv.opts.Observe; o != nil {
		o(CommandName(req.typ), true)
	}
	c.write(c.errorReply(req, errno, msg))
}

// errorReply is the reply to req failing with errno.
func (c *conn) errorReply(req request, errno uint32, msg string) []byte {
	msg = clipString(msg)
	if c.structured {
		b := structuredHeader(nil, replyFlagDone, replyError, req.cookie, uint32(6+len(msg)))
		b = binary.BigEndian.AppendUint32(b, errno)
		b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
		return append(b, msg...)
	}
	return simpleReplyHeader(nil, errno, req.cookie)
}

// sendOK answers a request that succeeded without a payload (anything but
// a read) with a simple reply, structured replies negotiated or not, as
// the protocol allows: 16 bytes that a client takes in one receive, where
// libnbd reads a 20-byte structured chunk header in two.
func (c *conn) sendOK(req request) { c.replies <- reply{ok: true, cookie: req.cookie} }

// errnoOf is the NBD error a backend's error is reported as: a full
// disk as ENOSPC (the client's filesystem then says "no space", not an
// I/O error), a refused write as EPERM, anything else — a snapshot gone
// or invalid, a disk that failed — as EIO.
func errnoOf(err error) uint32 {
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errNoSpc
	case errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EACCES):
		return errPerm
	default:
		return errIO
	}
}

// handle serves request req; cost bytes of the budget were taken for it,
// and kept of them go back when its reply is written (the rest when
// handle returns).
func (c *conn) handle(req request, payload *[]byte, cost int64) (kept int64) {
	if o := c.srv.opts.Observe; o != nil {
		o(CommandName(req.typ), false)
	}
	exp := c.exp
	inRange := c.inRange(req)
	known := uint16(cmdFlagFUA | cmdFlagNoHole | cmdFlagDF | cmdFlagReqOne | cmdFlagFastZero)
	if req.flags&^known != 0 {
		c.sendError(req, errInval, fmt.Sprintf("unknown command flags %#x", req.flags))
		return
	}
	off, n := int64(req.offset), int64(req.length)
	switch req.typ {
	case cmdRead:
		if !inRange {
			c.sendError(req, errInval, "read beyond the end of the export")
			return
		}
		if req.length > MaxBlock {
			c.sendError(req, errOverflow, "read larger than the maximum block size")
			return
		}
		return c.read(req, cost)
	case cmdWrite:
		switch {
		case exp.ReadOnly:
			c.sendError(req, errPerm, "the export is read-only")
		case !inRange:
			c.sendError(req, errNoSpc, "write beyond the end of the export")
		default:
			if _, err := exp.Backend.WriteAt(*payload, off); err != nil {
				c.sendError(req, errnoOf(err), err.Error())
				return
			}
			if req.flags&cmdFlagFUA != 0 {
				if err := exp.Backend.Flush(); err != nil {
					c.sendError(req, errnoOf(err), err.Error())
					return
				}
			}
			c.sendOK(req)
		}
	case cmdFlush:
		if err := exp.Backend.Flush(); err != nil {
			c.sendError(req, errnoOf(err), err.Error())
			return
		}
		c.sendOK(req)
	case cmdTrim, cmdWriteZeroes:
		switch {
		case exp.ReadOnly:
			c.sendError(req, errPerm, "the export is read-only")
			return
		case !inRange:
			c.sendError(req, errNoSpc, "request beyond the end of the export")
			return
		case req.typ == cmdTrim && exp.Trim == nil:
			c.sendError(req, errInval, "trim is not supported")
			return
		}
		var err error
		if req.typ == cmdTrim {
			err = exp.Trim(off, n)
		} else if exp.WriteZeroes != nil {
			err = exp.WriteZeroes(off, n, req.flags&cmdFlagNoHole != 0)
		} else {
			err = writeZeroes(exp.Backend, off, n)
		}
		if err == nil && req.flags&cmdFlagFUA != 0 {
			err = exp.Backend.Flush()
		}
		if err != nil {
			c.sendError(req, errnoOf(err), err.Error())
			return
		}
		c.sendOK(req)
	case cmdCache:
		if !inRange {
			c.sendError(req, errInval, "cache beyond the end of the export")
			return
		}
		c.sendOK(req)
	case cmdBlockStatus:
		if !inRange || n == 0 {
			c.sendError(req, errInval, "block status range beyond the end of the export or empty")
			return
		}
		if !c.structured || len(c.metas) == 0 {
			c.sendError(req, errInval, "block status needs structured replies and a meta context")
			return
		}
		return c.blockStatus(req, cost)
	default:
		c.sendError(req, errInval, fmt.Sprintf("unknown command %d", req.typ))
	}
	return 0
}

// zeroes is what writeZeroes writes, shared: a backend's WriteAt does not
// modify its argument (io.WriterAt), and requests in flight must not
// each allocate their own.
var zeroes = make([]byte, 1<<20)

func writeZeroes(b Backend, off, n int64) error {
	z := zeroes
	for n > 0 {
		k := min(n, int64(len(z)))
		if _, err := b.WriteAt(z[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// read serves read request req; the reply, when buffered, keeps cost
// bytes of the budget until written.
func (c *conn) read(req request, cost int64) (kept int64) {
	n := int(req.length)
	if n > inlineMax && (c.sendMapped(req) || c.sendFile(req)) {
		return 0 // sent from the page cache: nothing buffered
	}
	hdrLen := c.readHeaderLen(n)
	bp := getBuf(hdrLen + n)
	b := *bp
	got, err := c.exp.Backend.ReadAt(b[hdrLen:], int64(req.offset))
	if err != nil && !(errors.Is(err, io.EOF) && got == n) {
		putBuf(bp)
		c.sendError(req, errnoOf(err), err.Error())
		return 0
	}
	c.appendReadHeader(b[:0], req)
	c.writeOwned(bp, cost)
	return cost
}

// readHeaderLen is the length of the header before the data of the
// reply to a read of n bytes: an NBD_REPLY_TYPE_OFFSET_DATA chunk's with
// structured replies (a NONE chunk's for n 0), else a simple reply's.
func (c *conn) readHeaderLen(n int) int {
	switch {
	case c.structured && n == 0:
		return 20
	case c.structured:
		return 28
	}
	return 16
}

// appendReadHeader appends the header of the reply to read request req.
// A structured reply to a read of 0 bytes is one NBD_REPLY_TYPE_NONE
// chunk: an OFFSET_DATA chunk must describe at least one byte (its length
// is at least 9), and NONE with the done flag is a success for any
// request (NBD protocol, "Structured reply types").
func (c *conn) appendReadHeader(b []byte, req request) []byte {
	switch {
	case c.structured && req.length == 0:
		return structuredHeader(b, replyFlagDone, replyNone, req.cookie, 0)
	case c.structured:
		b = structuredHeader(b, replyFlagDone, replyOffsetData, req.cookie, 8+req.length)
		return binary.BigEndian.AppendUint64(b, req.offset)
	}
	return simpleReplyHeader(b, 0, req.cookie)
}

// sendMapped sends the reply to read request req from the backend's
// mapping of its bytes, when it is a MappedReader holding them in memory
// and the connection is a plain unix socket (on TCP, sendfile's pages go
// to the network card as they are); false means it sent nothing.
func (c *conn) sendMapped(req request) bool {
	mr, ok := c.exp.Backend.(MappedReader)
	if !ok || !c.unix {
		return false
	}
	b, release, ok := mr.MappedRange(int64(req.offset), int64(req.length))
	if !ok {
		return false
	}
	defer release()
	if o := c.srv.opts.Observe; o != nil {
		o(CommandName(req.typ), false)
	}
	h := c.appendReadHeader(nil, req)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := c.bw.Write(h)
	if err == nil {
		err = c.bw.Flush()
	}
	if err == nil {
		_, err = c.rw.Write(b)
	}
	if err != nil {
		// The header may be out: the stream cannot be resynchronized.
		c.log.Debug("mapped read reply failed, closing", "err", err)
		c.nc.Close()
	}
	return true
}

// sendFile sends the reply to read request req straight from the
// backend's file with sendfile(2), when the backend is a FileReader whose
// bytes are cached and the connection a plain (not TLS) socket. False
// means nothing was sent.
func (c *conn) sendFile(req request) bool {
	fr, ok := c.exp.Backend.(FileReader)
	if !ok || c.raw == nil || sendfileRefused.Load() {
		return false
	}
	n := int(req.length)
	f, ok := fr.CachedFile(int64(req.offset), int64(n))
	if !ok {
		return false
	}
	frc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	h := c.appendReadHeader(nil, req)
	if o := c.srv.opts.Observe; o != nil {
		o(CommandName(req.typ), false)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err = c.bw.Write(h)
	if err == nil {
		err = c.bw.Flush()
	}
	if err == nil {
		// Control keeps the file open while the bytes go; the socket's
		// Write waits in the poller while its buffer is full.
		off, left := int64(req.offset), n
		var werr, serr error
		cerr := frc.Control(func(ffd uintptr) {
			werr = c.raw.Write(func(sfd uintptr) bool {
				for left > 0 {
					k, e := unix.Sendfile(int(sfd), int(ffd), &off, left)
					switch {
					case e == unix.EAGAIN:
						return false
					case e == unix.EINTR:
						continue
					case e != nil:
						serr = e
						return true
					case k == 0:
						serr = io.ErrUnexpectedEOF // the file shrank under the export
						return true
					}
					left -= k
				}
				return true
			})
		})
		err = cmp.Or(serr, werr, cerr)
		if err == nil && left > 0 {
			err = io.ErrShortWrite
		}
	}
	if err != nil {
		// The header is out: the stream cannot be resynchronized.
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) {
			sendfileRefused.Store(true)
			c.log.Warn("sendfile(2) refused; large reads are copied from now on", "export", c.exp.Name, "err", err)
		}
		c.log.Debug("sendfile reply failed, closing", "err", err)
		c.nc.Close()
	}
	return true
}

// sendfileRefused is set when the kernel refuses sendfile(2) for an
// export's file: the connection that met it is closed (its reply was half
// sent) and no later read tries again.
var sendfileRefused atomic.Bool

// maxDescriptors bounds one block-status reply; clients ask again.
const maxDescriptors = 2048

// blockStatus answers block status request req; its reply keeps cost
// bytes of the budget until written.
func (c *conn) blockStatus(req request, cost int64) (kept int64) {
	var out []byte
	for i, m := range c.metas {
		var desc []byte
		var err error
		if m.since == "" {
			desc, err = c.allocation(req)
		} else {
			desc, err = c.changed(req, m.since)
		}
		if err != nil {
			c.sendError(req, errIO, err.Error())
			return 0
		}
		flags := uint16(0)
		if i == len(c.metas)-1 {
			flags = replyFlagDone
		}
		out = structuredHeader(out, flags, replyBlockStatus, req.cookie, uint32(4+len(desc)))
		out = binary.BigEndian.AppendUint32(out, m.id)
		out = append(out, desc...)
	}
	c.writeCost(out, cost)
	return cost
}

func appendDesc(desc []byte, length int64, flags uint32) []byte {
	desc = binary.BigEndian.AppendUint32(desc, uint32(length))
	return binary.BigEndian.AppendUint32(desc, flags)
}

// maxDescLen keeps a descriptor's length within 32 bits, block aligned.
const maxDescLen = 1<<32 - 4096

func (c *conn) allocation(req request) ([]byte, error) {
	off, n := int64(req.offset), int64(req.length)
	var ext []Extent
	if c.exp.Extents != nil {
		var err error
		if ext, err = c.exp.Extents(off, n); err != nil {
			return nil, err
		}
	}
	if len(ext) == 0 {
		ext = []Extent{{Off: off, Len: n}}
	}
	var desc []byte
	pos := off
	for _, e := range ext {
		if e.Off+e.Len <= pos || pos >= off+n {
			continue
		}
		l := min(e.Off+e.Len, off+n) - pos
		var f uint32
		if e.Hole {
			f |= stateHole
		}
		if e.Zero || e.Hole {
			f |= stateZero
		}
		for l > 0 {
			k := min(l, maxDescLen)
			desc = appendDesc(desc, k, f)
			pos, l = pos+k, l-k
			if req.flags&cmdFlagReqOne != 0 || len(desc)/8 >= maxDescriptors {
				return desc, nil
			}
		}
	}
	if len(desc) == 0 { // extents did not cover the start: call it data
		desc = appendDesc(desc, min(n, maxDescLen), 0)
	}
	return desc, nil
}

func (c *conn) changed(req request, since string) ([]byte, error) {
	bm, _, err := c.exp.Changed(since)
	if err != nil {
		return nil, err
	}
	off, end := int64(req.offset), int64(req.offset)+int64(req.length)
	g := bm.Granule
	var desc []byte
	pos := off
	for pos < end {
		dirty := bm.Set(pos / g)
		run := pos
		for run < end && bm.Set(run/g) == dirty {
			run = (run/g + 1) * g
			if run-pos >= maxDescLen {
				break
			}
		}
		run = min(run, end)
		var f uint32
		if dirty {
			f = stateDirty
		}
		desc = appendDesc(desc, run-pos, f)
		pos = run
		if req.flags&cmdFlagReqOne != 0 || len(desc)/8 >= maxDescriptors {
			break
		}
	}
	return desc, nil
}
