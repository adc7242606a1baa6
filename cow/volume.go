package cow

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"golang.org/x/sys/unix"

	"umbra/internal/owner"
	"umbra/internal/zero"
	"umbra/provider"
)

// Policy says what happens when a chunk cannot be preserved.
type Policy string

const (
	// PolicyDeleteOldest drops the oldest snapshots until the copy fits
	// (Windows VSS's behaviour).
	PolicyDeleteOldest Policy = "delete-oldest"
	// PolicyInvalidate stops preserving for the snapshots that needed the
	// chunk and marks them invalid (SnapBack sbotman's behaviour).
	PolicyInvalidate Policy = "invalidate"
)

const (
	// DefaultChunkSize is the COW granularity when Options.ChunkSize is 0;
	// docs/benchmarks.md has the table behind the choice.
	DefaultChunkSize = 4 << 10
	MinChunkSize     = 4 << 10
	MaxChunkSize     = 1 << 20
	// DefaultHoldLimit bounds a write hold, as VSS bounds its flush-and-hold.
	DefaultHoldLimit = 10 * time.Second
	// DefaultMaxSnapshots is how many live snapshots a volume keeps
	// (Windows allows 64 by default, 512 at most).
	DefaultMaxSnapshots = 4096

	zeroSlot   = -1
	numStripes = 1024
)

// Typed errors.
var (
	ErrReleased   = errors.New("snapshot data behind the backup cursor was released")
	ErrOutOfRange = errors.New("request beyond the end of the volume")
	ErrClosed     = errors.New("volume is closed")
	ErrBadID      = provider.ErrBadID
	// ErrInUse: a front-end client has the origin open (Revert) or the
	// snapshot open (DeleteSnapshot).
	ErrInUse = errors.New("volume in use")
	// ErrSnapshotInUse is ErrInUse for a snapshot (errors.Is matches both).
	ErrSnapshotInUse error = snapshotInUse{}
)

type snapshotInUse struct{}

func (snapshotInUse) Error() string        { return "snapshot in use" }
func (snapshotInUse) Is(target error) bool { return target == ErrInUse }

// Options configure a volume.
type Options struct {
	// ChunkSize is the COW granularity: a power of two, 4 KiB to 1 MiB.
	ChunkSize int64
	// StorageDir is the shadow storage (diff area) directory; "" means no
	// association, and snapshots are refused with provider.ErrNoStorage.
	StorageDir string
	// MaxStorage bounds the diff-area data in bytes; 0 is unlimited.
	MaxStorage int64
	// Policy applies when a chunk cannot be preserved.
	Policy Policy
	// MaxSnapshots bounds live snapshots (0: DefaultMaxSnapshots).
	MaxSnapshots int
	// FS is the file layer (nil: the OS). Tests inject faults through it.
	FS FS
}

// StorageInfo describes a volume's shadow storage association.
type StorageInfo struct {
	Dir string `json:"dir"`
	Max int64  `json:"max"`
	// Used is what live snapshots' preserved chunks take.
	Used int64 `json:"used"`
	// Allocated is what the diff area's files occupy on their filesystem
	// (VSS's "allocated shadow copy storage space"): Used, plus freed
	// space kept for reuse (at most the max; released 15 s after the last
	// snapshot goes) and the metadata log. It is never less than Used.
	Allocated int64  `json:"allocated"`
	Policy    Policy `json:"policy"`
}

type entry struct {
	chunk uint64
	gen   uint64
	slot  int64
}

func entryLess(a, b entry) bool {
	if a.chunk != b.chunk {
		return a.chunk < b.chunk
	}
	return a.gen < b.gen
}

type snap struct {
	gen        uint64
	id, setID  string
	created    time.Time
	persistent bool
	invalid    string // reason; "" while valid
	hasCursor  bool
	cursor     uint64          // chunks below it are released
	changed    *roaring.Bitmap // chunks first written while this was the newest
	owned      *roaring.Bitmap // chunks with an entry at this generation
	nonzero    int64           // owned entries that hold a diff-area slot
	reliable   bool            // changed is complete
}

func (s *snap) needs(c uint64) bool {
	return s.invalid == "" && (!s.hasCursor || c >= s.cursor)
}

// Volume is an origin (file or block device) protected by copy-on-write
// snapshots. It is safe for concurrent use.
type Volume struct {
	name       string
	originPath string
	fs         FS
	origin     File
	size       int64
	chunk      int64
	shift      uint
	nchunks    uint64
	maxSnaps   int

	gate     gate
	stripes  stripes
	hasSnaps atomic.Int32
	copies   atomic.Int64 // chunks preserved since open (for metrics)
	wbFailed atomic.Bool  // a write-behind copy failed: settleWriteBehind
	settleMu sync.Mutex   // one settleWriteBehind at a time
	isClosed atomic.Bool
	bufs     sync.Pool

	slotMu sync.RWMutex // held shared while a diff-area slot is read; exclusively to free slots

	usersMu   sync.Mutex                // guards users, snapUsers and usersLeft
	users     map[string]int            // front-end clients with the origin open, by kind
	snapUsers map[uint64]map[string]int // clients with a snapshot open, by generation and kind
	usersLeft chan struct{}             // closed (and replaced) when a snapshot's client leaves

	mapMu     sync.RWMutex // held shared while the kernel may copy from mapped
	mapped    []byte       // the origin mapped read-only (MappedRange), once asked for
	mapFailed bool         // the origin cannot be mapped: do not try again
	mapClosed bool         // Close unmapped it
	mapLent   atomic.Int64 // bytes lent from mapped, ever

	mu         sync.RWMutex // guards everything below
	closed     bool
	storageDir string
	storageOwn *owner.Dir // this process's claim on storageDir (nil: none, or an FS that claims nothing)
	maxStorage int64
	policy     Policy
	snaps      []*snap // live, ascending generation
	lastGen    uint64
	entries    *entryMap
	store      *store   // nil until the first snapshot
	log        *metaLog // non-nil while a persistent snapshot lives
	persistent int      // live persistent snapshots
	recovery   []error  // problems found when opening
	recovering bool     // replaying the log: frees must not touch the store
}

// Open opens the origin at originPath (a regular file or a block device)
// as volume name, and recovers its persistent snapshots from the shadow
// storage. A damaged diff area does not stop the origin from opening: the
// affected snapshots are invalid and RecoveryErrors names the files.
func Open(name, originPath string, opts Options) (*Volume, error) {
	if err := validName(name); err != nil {
		return nil, fmt.Errorf("open volume: %w", err)
	}
	if opts.ChunkSize == 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	if err := validChunkSize(opts.ChunkSize); err != nil {
		return nil, fmt.Errorf("open volume %s: %w", name, err)
	}
	if opts.Policy == "" {
		opts.Policy = PolicyDeleteOldest
	}
	if opts.Policy != PolicyDeleteOldest && opts.Policy != PolicyInvalidate {
		return nil, fmt.Errorf("open volume %s: unknown policy %q (want %q or %q)", name, opts.Policy, PolicyDeleteOldest, PolicyInvalidate)
	}
	if opts.MaxStorage < 0 {
		return nil, fmt.Errorf("open volume %s: negative max storage %d", name, opts.MaxStorage)
	}
	if opts.FS == nil {
		opts.FS = OSFS{}
	}
	if opts.MaxSnapshots <= 0 {
		opts.MaxSnapshots = DefaultMaxSnapshots
	}
	// A block device is opened exclusively: while the volume is open the
	// kernel refuses to mount it or hand it to another exclusive opener
	// (mkfs, another volume), whose writes would bypass the engine and
	// change what the snapshots read; and a device already mounted is
	// refused here.
	flag := os.O_RDWR
	if fi, err := os.Stat(originPath); err == nil && fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0 {
		flag |= os.O_EXCL
	}
	f, err := opts.FS.OpenFile(originPath, flag, 0)
	if errors.Is(err, syscall.EBUSY) {
		return nil, fmt.Errorf("open volume %s origin: %w: the device is in use (mounted, or held by another program); every write to a volume must go through Umbra: unmount it first", name, err)
	}
	if err != nil {
		return nil, fmt.Errorf("open volume %s origin: %w", name, err)
	}
	// A regular file has no O_EXCL: it is claimed instead, and so is the
	// shadow storage (one owner: a second service writing the same file
	// or diff area would change this one's snapshots behind its back).
	storageOwn, err := claim(opts.FS, f, originPath, opts.StorageDir)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open volume %s: %w", name, err)
	}
	size, err := f.Size()
	if err != nil {
		f.Close()
		storageOwn.Release()
		return nil, fmt.Errorf("open volume %s origin %s: size: %w", name, originPath, err)
	}
	v := &Volume{
		name:       name,
		originPath: originPath,
		fs:         opts.FS,
		origin:     f,
		size:       size,
		chunk:      opts.ChunkSize,
		maxSnaps:   opts.MaxSnapshots,
		storageDir: opts.StorageDir,
		storageOwn: storageOwn,
		maxStorage: opts.MaxStorage,
		policy:     opts.Policy,
		entries:    newEntryMap(),
	}
	for v.chunk>>v.shift > 1 {
		v.shift++
	}
	v.nchunks = uint64((size + v.chunk - 1) / v.chunk)
	if v.nchunks > 1<<32 {
		f.Close()
		storageOwn.Release()
		return nil, fmt.Errorf("open volume %s: %d chunks of %d bytes exceed 2^32; use a larger chunk size", name, v.nchunks, v.chunk)
	}
	v.bufs.New = func() any { b := make([]byte, v.chunk); return &b }
	if v.storageDir != "" {
		if err := v.recover(); err != nil {
			f.Close()
			storageOwn.Release()
			return nil, err
		}
	}
	return v, nil
}

// Hints of the refusals of claim.
const (
	originHint  = "another Umbra service serves this file (writes through a second would change the first's snapshots): use that service, or stop it first"
	storageHint = "another Umbra service keeps its diff areas there: give this volume its own shadow storage directory (--storage), or stop that service first"
)

// claim claims a regular-file origin and the shadow storage directory
// (when dir is not "") for this process, where fsys can (a block device
// is held by O_EXCL instead).
func claim(fsys FS, origin File, originPath, dir string) (*owner.Dir, error) {
	c, ok := fsys.(claimer)
	if !ok {
		return nil, nil
	}
	if fi, err := fsys.Stat(originPath); err == nil && fi.Mode().IsRegular() {
		if err := c.claimFile(origin, "volume file", originPath, originHint); err != nil {
			return nil, err
		}
	}
	return claimStorage(fsys, dir)
}

// claimStorage claims shadow storage directory dir for this process. A
// directory that cannot be made yet does not keep the origin from
// opening: the first snapshot claims it (openStore) and reports why it
// cannot; only another owner is refused here.
func claimStorage(fsys FS, dir string) (*owner.Dir, error) {
	c, ok := fsys.(claimer)
	if !ok || dir == "" {
		return nil, nil
	}
	own, err := c.claimDir(dir, "shadow storage directory", storageHint)
	if err != nil && !errors.Is(err, owner.ErrHeld) {
		return nil, nil
	}
	return own, err
}

func validName(name string) error { return provider.ValidateID(name) }

func validChunkSize(c int64) error {
	if c < MinChunkSize || c > MaxChunkSize || c&(c-1) != 0 {
		return fmt.Errorf("chunk size %d: want a power of two from %d to %d", c, MinChunkSize, MaxChunkSize)
	}
	return nil
}

// Name returns the volume's name.
func (v *Volume) Name() string { return v.name }

// Size returns the volume's size in bytes.
func (v *Volume) Size() int64 { return v.size }

// ChunkSize returns the COW granularity.
func (v *Volume) ChunkSize() int64 { return v.chunk }

// OriginPath returns the origin's path.
func (v *Volume) OriginPath() string { return v.originPath }

// RecoveryErrors returns the problems found when the volume was opened.
func (v *Volume) RecoveryErrors() []error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return append([]error(nil), v.recovery...)
}

func (v *Volume) checkRange(off, n int64) error {
	if off < 0 || n < 0 || off > v.size || n > v.size-off {
		return fmt.Errorf("volume %s: [%d, %d) of %d bytes: %w", v.name, off, off+n, v.size, ErrOutOfRange)
	}
	return nil
}

// ReadAt reads the live volume.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	if off >= v.size && len(p) > 0 {
		return 0, io.EOF
	}
	if off < 0 {
		return 0, v.checkRange(off, int64(len(p)))
	}
	want := len(p)
	if int64(want) > v.size-off {
		p = p[:v.size-off]
	}
	n, err := v.origin.ReadAt(p, off)
	if err == nil && n < want {
		err = io.EOF
	}
	if err == io.EOF && n == len(p) && n < want {
		return n, io.EOF
	}
	if err == io.EOF && n == want {
		err = nil
	}
	return n, err
}

// TryReadAt is ReadAt when the bytes can be had without waiting for a
// disk (from the page cache, or an origin in memory); otherwise it reads
// nothing and ok is false. A server can then read cached data on the
// goroutine that received the request and hand only the reads that would
// wait to another, so they still overlap.
func (v *Volume) TryReadAt(p []byte, off int64) (n int, ok bool, err error) {
	nw, can := v.origin.(NoWaitReader)
	if !can {
		return 0, false, nil
	}
	if v.checkRange(off, int64(len(p))) != nil {
		return 0, false, nil // ReadAt says what is wrong
	}
	return nw.ReadAtNoWait(p, off)
}

// CachedFile returns the open file that holds the live volume's bytes
// [off, off+n) at the same offsets, when those bytes are in memory (in
// the page cache, or an origin on tmpfs or ramfs), so a server can send
// them with sendfile(2) without a copy through user space and without
// waiting for a disk. ok is false otherwise: read them with ReadAt.
func (v *Volume) CachedFile(off, n int64) (f *os.File, ok bool) {
	of, isOS := v.origin.(osFile)
	if !isOS || n <= 0 || v.checkRange(off, n) != nil {
		return nil, false
	}
	return of.File, of.cached(off, n)
}

// MappedRange returns [off, off+n) of the origin as part of a read-only
// shared mapping of it, for a server that hands the bytes straight to the
// kernel (a write to a socket): the kernel copies them once, from the page
// cache into the socket — nbdkit's pread+send without the pread. Unlike
// sendfile(2) into a unix socket, which queues the file's pages themselves
// and leaves the receiver to take them 4 KiB at a time (fio's receiving
// thread at 92 % system time), the receiver reads large buffers
// (docs/benchmarks.md, measured 2026-12-03). ok is false unless the origin is a
// regular file and the range is in memory (as CachedFile).
//
// The caller must not read the slice in Go code: a fault there (the file
// cut short behind Umbra's back, an I/O error paging it in) would kill the
// process, where the kernel's own copy returns EFAULT. It calls release
// once the kernel is done with the bytes; Close waits for that.
func (v *Volume) MappedRange(off, n int64) (b []byte, release func(), ok bool) {
	of, isOS := v.origin.(osFile)
	if !isOS || n <= 0 || v.checkRange(off, n) != nil || !of.cached(off, n) {
		return nil, nil, false
	}
	v.mapMu.RLock()
	if v.mapped == nil {
		v.mapMu.RUnlock()
		if !v.mapOrigin(of) {
			return nil, nil, false
		}
		v.mapMu.RLock()
	}
	if v.mapped == nil || int64(len(v.mapped)) < off+n {
		v.mapMu.RUnlock()
		return nil, nil, false
	}
	b = v.mapped[off : off+n : off+n]
	return b, func() {
		// Pages the kernel's copy touched stay mapped and count in the
		// process's RSS: past the budget their page-table entries are
		// dropped, as the diff area's mapping does (trimDue; the page
		// cache stays: MADV_DONTNEED on a shared mapping discards
		// nothing).
		if trimDue(v.mapLent.Add(n), n) {
			_ = unix.Madvise(v.mapped, unix.MADV_DONTNEED)
		}
		v.mapMu.RUnlock()
	}, true
}

// mapOrigin maps a regular-file origin, once; false if it cannot be.
func (v *Volume) mapOrigin(of osFile) bool {
	v.mapMu.Lock()
	defer v.mapMu.Unlock()
	if v.mapped != nil {
		return true
	}
	if v.mapFailed || v.mapClosed || v.size == 0 || int64(int(v.size)) != v.size {
		return false
	}
	if fi, err := of.Stat(); err != nil || !fi.Mode().IsRegular() {
		v.mapFailed = true
		return false
	}
	m, err := unix.Mmap(int(of.Fd()), 0, int(v.size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		v.mapFailed = true
		return false
	}
	v.mapped = m
	return true
}

// unmapOrigin drops the origin's mapping once no caller of MappedRange
// holds it; later calls get ok false.
func (v *Volume) unmapOrigin() {
	v.mapMu.Lock()
	defer v.mapMu.Unlock()
	v.mapClosed = true
	if v.mapped != nil {
		unix.Munmap(v.mapped)
		v.mapped = nil
	}
}

// WriteAt writes the live volume, preserving first what live snapshots
// still need. A snapshot problem never fails the write: the policy applies
// and the affected snapshots say why on their next call.
func (v *Volume) WriteAt(p []byte, off int64) (int, error) {
	n, _, err := v.write(p, off, true)
	return n, err
}

// TryWriteAt is WriteAt unless the write would have to wait for something
// other than its own I/O — a hold, another writer or a snapshot reader on
// the same chunks, or the fsyncs that preserving a chunk for a persistent
// snapshot costs: then it writes nothing and ok is false.
// A server can run such writes on the goroutine that read them and hand
// only the ones that would wait to another.
func (v *Volume) TryWriteAt(p []byte, off int64) (n int, ok bool, err error) {
	return v.write(p, off, false)
}

// write is WriteAt (wait) or TryWriteAt (!wait: ok is false when it would
// have waited for the gate or a stripe lock, and nothing was written).
func (v *Volume) write(p []byte, off int64, wait bool) (n int, ok bool, err error) {
	if len(p) == 0 {
		return 0, true, v.checkRange(off, 0)
	}
	locks, ok, err := v.beginWrite(off, int64(len(p)), wait)
	if !ok || err != nil {
		return 0, ok, err
	}
	defer v.gate.leave()
	if !locks.held() {
		n, err = v.origin.WriteAt(p, off)
		return n, true, err
	}
	defer locks.unlock()
	n, err = v.preserveAndWrite(p, off)
	return n, true, err
}

// beginWrite admits a write of [off, off+n), n > 0: the range, the gate
// (a hold), a closed volume, a failed write-behind to settle and, while
// snapshots are live, the chunks' stripe locks. When it returns ok and no
// error the caller is inside the gate (v.gate.leave when done) and, if
// locks are held, holds the stripe locks (unlock before leaving the
// gate). With !wait, ok is false when it would have waited, and nothing
// is held.
func (v *Volume) beginWrite(off, n int64, wait bool) (locks chunkLocks, ok bool, err error) {
	if err := v.checkRange(off, n); err != nil {
		return chunkLocks{}, true, err
	}
	if wait {
		v.gate.enter()
	} else if !v.gate.tryEnter() {
		return chunkLocks{}, false, nil
	}
	if v.isClosed.Load() {
		v.gate.leave()
		return chunkLocks{}, true, fmt.Errorf("write volume %s: %w", v.name, ErrClosed)
	}
	if v.wbFailed.Load() {
		v.settleWriteBehind(false)
	}
	if v.hasSnaps.Load() == 0 {
		return chunkLocks{}, true, nil
	}
	c0, c1 := uint64(off)>>v.shift, uint64(off+n-1)>>v.shift
	if wait {
		return v.stripes.lock(c0, c1, false), true, nil
	}
	if locks, ok = v.stripes.tryLock(c0, c1); !ok {
		v.gate.leave()
		return chunkLocks{}, false, nil
	}
	if v.syncedPreserve(c0, c1) {
		locks.unlock()
		v.gate.leave()
		return chunkLocks{}, false, nil
	}
	return locks, true, nil
}

// syncedPreserve reports whether a write of chunks c0..c1 would preserve
// one for a persistent snapshot, which costs two fsyncs before the write
// may go on (the ordering invariant). A server that tries writes on the
// goroutine reading its requests hands such a write to another: waiting
// there would serialize the connection's requests, and the fsyncs of
// concurrent first writes could not be shared (group commit). Measured
// 2026-12-07 through the kernel's nbd client at iodepth 16 in the VM of
// bench/vm.sh: every first write paid its own two fsyncs, one request
// at a time.
func (v *Volume) syncedPreserve(c0, c1 uint64) bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	n := v.newest()
	if n == nil || v.log == nil {
		return false
	}
	for c := c0; c <= c1; c++ {
		if !n.changed.Contains(uint32(c)) {
			return true
		}
	}
	return false
}

// TryWriteFrom is TryWriteAt for bytes that fill puts straight into the
// origin file — with splice(2) from a socket, so they never pass through
// user space. The volume preserves first what live snapshots need of
// [off, off+n), calls fill with the origin file and off, and completes the
// preservation when fill returns, whatever it returns; fill must write
// nothing outside [off, off+n). ok is false, and fill is not called, when
// the write would wait (a hold, chunks another writer or reader holds, a
// persistent snapshot's fsyncs) or the origin is not an OS file.
func (v *Volume) TryWriteFrom(off, n int64, fill func(f *os.File, off int64) error) (ok bool, err error) {
	of, isOS := v.origin.(osFile)
	if !isOS || n <= 0 {
		return false, nil
	}
	locks, ok, err := v.beginWrite(off, n, false)
	if !ok || err != nil {
		return ok, err
	}
	defer v.gate.leave()
	if locks.held() {
		defer locks.unlock()
		v.preserveRange(uint64(off)>>v.shift, uint64(off+n-1)>>v.shift)
	}
	return true, fill(of.File, off)
}

// Flush makes acknowledged writes durable.
func (v *Volume) Flush() error {
	if err := v.origin.Sync(); err != nil {
		return fmt.Errorf("flush volume %s: %w", v.name, err)
	}
	return nil
}

// Trim discards [off, off+length): the range reads as zeros afterwards
// (hole-punched on files). Snapshots keep their view.
func (v *Volume) Trim(off, length int64) error {
	return v.zero(off, length, false)
}

// WriteZeroes writes zeros to [off, off+length); with noHole the range
// stays allocated, otherwise it may be punched.
func (v *Volume) WriteZeroes(off, length int64, noHole bool) error {
	return v.zero(off, length, noHole)
}

func (v *Volume) zero(off, length int64, noHole bool) error {
	if err := v.checkRange(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	v.gate.enter()
	defer v.gate.leave()
	if v.isClosed.Load() {
		return fmt.Errorf("write volume %s: %w", v.name, ErrClosed)
	}
	if v.hasSnaps.Load() > 0 {
		c0, c1 := uint64(off)>>v.shift, uint64(off+length-1)>>v.shift
		locks := v.stripes.lock(c0, c1, false)
		defer locks.unlock()
		v.preserveRange(c0, c1)
	}
	if !noHole {
		if err := v.origin.Punch(off, length); err == nil {
			return nil
		}
	}
	zeros := make([]byte, min(length, 1<<20))
	for done := int64(0); done < length; {
		n := min(int64(len(zeros)), length-done)
		if _, err := v.origin.WriteAt(zeros[:n], off+done); err != nil {
			return fmt.Errorf("volume %s: write zeroes at %d: %w", v.name, off+done, err)
		}
		done += n
	}
	return nil
}

// Allocation describes [off, off+length) of the live volume as extents.
func (v *Volume) Allocation(off, length int64) ([]Extent, error) {
	if err := v.checkRange(off, length); err != nil {
		return nil, err
	}
	return v.originExtents(off, length), nil
}

func (v *Volume) originExtents(off, length int64) []Extent {
	if of, ok := v.origin.(osFile); ok {
		if ext, ok := of.dataExtents(off, length); ok {
			return ext
		}
	}
	return []Extent{{Off: off, Len: length}}
}

// chunkIn returns chunk c's bytes in buf, which holds chunks from first
// on.
func (v *Volume) chunkIn(buf []byte, first, c uint64) []byte {
	o := int64(c-first) << v.shift
	return buf[o : o+v.chunkLen(c)]
}

// chunkLen is the length of chunk c (the last one may be short).
func (v *Volume) chunkLen(c uint64) int64 {
	return min(v.chunk, v.size-int64(c)<<v.shift)
}

// preserveRange preserves, for each chunk in c0..c1 written for the first
// time since the newest snapshot, what live snapshots need. The caller
// holds the chunks' stripe locks and writes the origin after it returns.
func (v *Volume) preserveRange(c0, c1 uint64) {
	v.mu.RLock()
	n := v.newest()
	if n == nil {
		v.mu.RUnlock()
		return
	}
	var todoBuf [64]uint64 // a 256 KiB piece of 4 KiB chunks
	todo := todoBuf[:0]
	for c := c0; c <= c1; c++ {
		if !n.changed.Contains(uint32(c)) {
			todo = append(todo, c)
		}
	}
	v.mu.RUnlock()
	// Preserve runs of consecutive chunks with one read and as few
	// writes as their slots allow; a run fits one write-behind batch.
	maxRun := max(int(min(preserveBatch, int64(wbBatchBytes))/v.chunk), 1)
	for i := 0; i < len(todo); {
		j := i + 1
		for j < len(todo) && todo[j] == todo[j-1]+1 && j-i < maxRun {
			j++
		}
		v.preserveRun(todo[i], j-i)
		i = j
	}
}

// writePiece is how much of a large write is preserved and written at a
// time: for non-persistent snapshots the write-behind writes one piece's
// originals to the diff area while the writer writes that piece of the
// origin and reads the next piece's originals, a pipeline over two
// cores. (A variable: the model test makes pieces small.)
var writePiece = 256 << 10

// preserveAndWrite preserves what p overwrites and writes p, piece by
// piece; the caller holds the stripe locks of all its chunks. Each
// piece's original is read (and, for persistent snapshots, made durable
// with its mapping) before that piece of the origin is written.
func (v *Volume) preserveAndWrite(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		at := off + int64(done)
		n := len(p) - done
		// A piece is at least a chunk and ends on a chunk boundary, so it
		// is never empty.
		if step := max(int64(writePiece), v.chunk); int64(n) > step {
			n = int((at+step)>>v.shift<<v.shift - at)
		}
		v.preserveRange(uint64(at)>>v.shift, uint64(at+int64(n)-1)>>v.shift)
		k, err := v.origin.WriteAt(p[done:done+n], at)
		done += k
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// preserveBatch bounds the bytes one preserveRun reads at once.
const preserveBatch = 1 << 20

func (v *Volume) newest() *snap {
	if len(v.snaps) == 0 {
		return nil
	}
	return v.snaps[len(v.snaps)-1]
}

// maxGen returns the newest generation with an entry for chunk c, or 0.
func (v *Volume) maxGen(c uint64) uint64 {
	var g uint64
	v.entries.DescendLessOrEqual(entry{chunk: c, gen: ^uint64(0)}, func(e entry) bool {
		if e.chunk == c {
			g = e.gen
		}
		return false
	})
	return g
}

// usersAbove reports whether a live snapshot with generation in
// (maxGen(c), upper] still needs the origin's chunk c. Every entry
// belongs to a live snapshot's owned set (deleting a snapshot hands its
// entries to the one before or drops them), so maxGen(c) is the newest
// snapshot owning c: scanning from the newest, the first owner ends the
// search, and a snapshot in range that needs c before it answers yes —
// one bitmap lookup for a first write under the newest snapshot instead
// of a walk down the B-tree of all entries.
func (v *Volume) usersAbove(c, upper uint64) bool {
	for i := len(v.snaps) - 1; i >= 0; i-- {
		s := v.snaps[i]
		if s.owned.Contains(uint32(c)) {
			return false
		}
		if s.gen <= upper && s.needs(c) {
			return true
		}
	}
	return false
}

// preserveRun copies chunks c0..c0+n-1, those written for the first time
// since the newest snapshot and still needed by a live snapshot, to the
// diff area. The caller holds their stripe locks. For non-persistent
// snapshots the copies go to the write-behind (writebehind.go), which
// writes them to the diff area off the writer's path, many at a time;
// readers find them in memory until then. Persistent snapshots keep the
// order their crash invariant needs: the originals and their mapping are
// durable when it returns, before the origin is written.
func (v *Volume) preserveRun(c0 uint64, n int) {
	v.mu.Lock()
	nw := v.newest()
	if nw == nil {
		v.mu.Unlock()
		return
	}
	gen := nw.gen
	// A short run (a 4 KiB write's one chunk) needs no allocation.
	var needBuf [4]preserved
	need := needBuf[:0]
	for c := c0; c < c0+uint64(n); c++ {
		if !nw.changed.CheckedAdd(uint32(c)) {
			continue
		}
		if v.usersAbove(c, gen) {
			if left := c0 + uint64(n) - c; len(need) == 0 && left > uint64(cap(need)) {
				need = make([]preserved, 0, left)
			}
			need = append(need, preserved{c: c})
		}
	}
	lsync, ssync, wb := v.log.syncer(), v.store.sync, v.store.wb
	v.mu.Unlock()
	if len(need) == 0 {
		return
	}
	first, last := need[0].c, need[len(need)-1].c
	span := int64(last-first)<<v.shift + v.chunkLen(last)
	// A run for the write-behind is read straight into its batch.
	behind := lsync == nil && wb.fitsSpace(span)
	var (
		sp  wbSpace
		bp  *[]byte
		buf []byte
	)
	if behind {
		sp = wb.reserve(span)
		buf = sp.buf
	} else {
		bp = v.bufs.Get().(*[]byte)
		if int64(cap(*bp)) < span {
			*bp = make([]byte, max(span, preserveBatch))
		}
		buf = (*bp)[:span]
	}
	if err := v.readOriginal(buf, int64(first)<<v.shift); err != nil {
		v.releaseRun(wb, sp, bp)
		v.mu.Lock()
		for _, p := range need {
			v.invalidateUsers(p.c, gen, fmt.Sprintf("reading original of chunk %d from origin %s failed: %v", p.c, v.originPath, err))
		}
		v.mu.Unlock()
		v.syncInvalidation(lsync)
		return
	}
	anyData := false
	v.mu.Lock()
	for i := range need {
		p := &need[i]
		if zero.All(v.chunkIn(buf, first, p.c)) {
			p.slot, p.keep = zeroSlot, true
			continue
		}
		p.slot, p.keep = v.allocSlot(p.c, gen)
		anyData = anyData || p.keep
	}
	v.mu.Unlock()
	if behind {
		var itemBuf [4]wbItem
		items := itemBuf[:0]
		if len(need) > len(itemBuf) {
			items = make([]wbItem, 0, len(need))
		}
		for _, p := range need {
			if !p.keep || p.slot == zeroSlot {
				continue
			}
			off, n := int(p.c-first)<<v.shift, int(v.chunkLen(p.c))
			items = append(items, wbItem{slot: p.slot, chunk: p.c, off: off, data: sp.buf[off : off+n : off+n]})
		}
		wb.addAll(sp, items)
		v.releaseRun(wb, sp, bp)
		v.placeAll(need, gen)
		return
	}
	defer v.releaseRun(wb, sp, bp)
	v.storeRun(need, anyData, first, gen, buf, lsync, ssync)
}

// readOriginal reads the originals at off into p, before the write that
// overwrites them. A run of 64 KiB or more of an origin in memory (tmpfs)
// is copied from its mapping (MappedRange's): pread goes through tmpfs a
// page at a time, 0.19-0.22 ms a MiB here against 0.09-0.10 for a copy
// from pages already mapped (0.2 with a fault per 64 KiB the first time),
// and this read is on the writer's path. A shorter one is read with
// pread: a first copy from a page not yet mapped costs a fault, ~2.6 us,
// more than a 4 KiB pread (~1.2 us). A copy that faults on an error falls
// back to pread, which reports what is wrong.
func (v *Volume) readOriginal(p []byte, off int64) error {
	if of, ok := v.origin.(osFile); ok && len(p) >= mapOriginalMin && of.nowait.Load() == nowaitMemory {
		if b, release, ok := v.MappedRange(off, int64(len(p))); ok {
			ok = copyMapped(p, b)
			release()
			if ok {
				return nil
			}
		}
	}
	if _, err := v.origin.ReadAt(p, off); err != nil && err != io.EOF {
		return err
	}
	return nil
}

const mapOriginalMin = 64 << 10

// preserved is a chunk preserveRun preserves: the slot it got (zeroSlot
// for an all-zero original) and whether it is kept (false when the
// policy gave it up).
type preserved struct {
	c    uint64
	slot int64
	keep bool
}

// releaseRun hands back what preserveRun read a run into: room in the
// write-behind (sp) or a pooled buffer (bp).
func (v *Volume) releaseRun(wb *writeBehind, sp wbSpace, bp *[]byte) {
	if bp == nil {
		wb.release(sp)
	} else {
		v.bufs.Put(bp)
	}
}

// storeRun writes preserved chunks to their slots (runs of consecutive
// slots at once), makes them durable when a persistent snapshot needs
// it, and records them in the mapping.
func (v *Volume) storeRun(need []preserved, anyData bool, first, gen uint64, buf []byte, lsync, ssync *groupSyncer) {
	// Write runs of consecutive chunks that got consecutive slots at once.
	for i := 0; i < len(need); {
		if !need[i].keep || need[i].slot == zeroSlot {
			i++
			continue
		}
		j := i + 1
		for j < len(need) && need[j].keep && need[j].c == need[j-1].c+1 && need[j].slot == need[j-1].slot+1 {
			j++
		}
		lo := int64(need[i].c-first) << v.shift
		hi := int64(need[j-1].c-first)<<v.shift + v.chunkLen(need[j-1].c)
		if _, err := v.store.f.WriteAt(buf[lo:hi], need[i].slot*v.chunk); err != nil {
			// Retry one by one: the slow path applies the policy.
			v.mu.Lock()
			for _, p := range need[i:j] {
				v.store.release(p.slot)
			}
			v.mu.Unlock()
			for k := i; k < j; k++ {
				p := &need[k]
				p.slot, p.keep = v.writeSlot(p.c, gen, v.chunkIn(buf, first, p.c))
			}
		}
		i = j
	}
	if anyData && lsync != nil {
		if err := ssync.sync(); err != nil {
			v.failAll(fmt.Sprintf("syncing diff area %s failed: %v", v.storePath(), err))
			return
		}
	}
	v.mu.Lock()
	v.placeLocked(need, gen)
	lsync = v.log.syncer()
	v.mu.Unlock()
	if lsync != nil {
		if err := lsync.sync(); err != nil {
			v.failAll(fmt.Sprintf("syncing metadata %s failed: %v", v.metaPath(), err))
		}
	}
}

// placeAll records the kept chunks of need in the mapping at their
// slots. Chunks queued in the write-behind are recorded at once: readers
// find pending slots in memory.
func (v *Volume) placeAll(need []preserved, gen uint64) {
	v.mu.Lock()
	v.placeLocked(need, gen)
	v.mu.Unlock()
}

// placeLocked records the kept chunks of need, preserved for generation
// gen. If that snapshot was deleted meanwhile, they go where deleting it
// would have put them.
func (v *Volume) placeLocked(need []preserved, gen uint64) {
	s := v.snapByGen(gen)
	if s == nil {
		s = v.predecessor(gen)
	}
	run := make([]entry, 0, len(need))
	for _, p := range need {
		if p.keep && v.claim(s, p.c, p.slot) {
			run = append(run, entry{chunk: p.c, gen: s.gen, slot: p.slot})
		}
	}
	v.entries.insertRun(run)
}

// settleWriteBehind deals with write-behind copies whose diff-area write
// failed, as a synchronous write would have: each is written to a new
// slot, or, when that fails for lack of space, the policy applies; on
// another error the snapshots that read it are invalidated. With wait,
// it first waits for what is pending, so the outcome shows in the next
// listing.
func (v *Volume) settleWriteBehind(wait bool) {
	v.mu.RLock()
	st := v.store
	v.mu.RUnlock()
	if st == nil {
		return
	}
	if wait {
		st.wb.drain()
	}
	if !st.wb.hasFailed.Load() {
		return
	}
	v.settleMu.Lock()
	defer v.settleMu.Unlock()
	v.wbFailed.Store(false)
	for _, it := range st.wb.failures() {
		v.resettle(st, it)
	}
}

// resettle moves a failed write-behind copy to a new slot (see
// settleWriteBehind).
func (v *Volume) resettle(st *store, it *wbItem) {
	v.mu.Lock()
	defer v.mu.Unlock()
	// current is the copy's entry as it stands now: each time mu was let
	// go the entry may have been dropped and its slot freed (and handed
	// out again), and acting on an older value would free that slot a
	// second time. Not found: the copy was cancelled with it.
	current := func() (entry, bool) {
		if v.store != st {
			return entry{}, false
		}
		return v.entryAt(it.chunk, it.slot)
	}
	for {
		e, ok := current()
		if !ok {
			return
		}
		ns, full := st.alloc(v.maxSlots())
		if full {
			if v.lackRoom(e, fmt.Sprintf("shadow storage limit of %d bytes in %s reached", v.maxStorage, v.storageDir)) {
				continue
			}
			return
		}
		v.mu.Unlock()
		_, err := st.f.WriteAt(it.data, ns*v.chunk)
		v.mu.Lock()
		if err != nil {
			st.release(ns)
			if e, ok = current(); !ok {
				return
			}
			if isNoSpace(err) {
				if v.lackRoom(e, fmt.Sprintf("filesystem of shadow storage %s is full", v.storageDir)) {
					continue
				}
				return
			}
			v.dropReaders(e, fmt.Sprintf("writing diff area %s failed: %v", v.storePath(), err))
			return
		}
		if e, ok = current(); !ok {
			if v.store == st { // else that store is gone, ns with it
				v.freeSlots([]int64{ns})
			}
			return
		}
		e.slot, ns = ns, e.slot
		v.entries.ReplaceOrInsert(e)
		v.freeSlots([]int64{ns}) // the failed slot: cancels the copy
		return
	}
}

// entryAt finds chunk c's entry that holds slot. Caller holds mu.
func (v *Volume) entryAt(c uint64, slot int64) (entry, bool) {
	var found entry
	ok := false
	v.entries.AscendRange(entry{chunk: c}, entry{chunk: c + 1}, func(e entry) bool {
		if e.slot == slot {
			found, ok = e, true
			return false
		}
		return true
	})
	return found, ok
}

// lackRoom applies the policy when entry e's copy finds no room; true
// means try again (the oldest snapshot was deleted). Caller holds mu.
func (v *Volume) lackRoom(e entry, why string) bool {
	if v.policy == PolicyInvalidate || len(v.snaps) == 0 {
		v.dropReaders(e, why)
		return false
	}
	v.deleteLocked(v.snaps[0], true)
	return true
}

// dropReaders invalidates the snapshots that read chunk e.chunk through
// entry e and drops it. Caller holds mu.
func (v *Volume) dropReaders(e entry, why string) {
	var below uint64
	v.entries.DescendLessOrEqual(entry{chunk: e.chunk, gen: e.gen - 1}, func(x entry) bool {
		if x.chunk == e.chunk {
			below = x.gen
		}
		return false
	})
	for _, s := range v.snaps {
		if s.gen > below && s.gen <= e.gen && s.needs(e.chunk) {
			v.invalidate(s, why)
		}
	}
	var freed []int64
	v.dropEntry(e, &freed)
	v.freeSlots(freed)
}

// allocSlot allocates a diff-area slot for chunk c, applying the policy
// when the storage is full; ok is false when the chunk no longer needs
// preserving. Caller holds mu.
func (v *Volume) allocSlot(c, gen uint64) (slot int64, ok bool) {
	for {
		if !v.usersAbove(c, gen) {
			return 0, false
		}
		s, full := v.store.alloc(v.maxSlots())
		if !full {
			return s, true
		}
		if !v.makeRoom(c, gen, fmt.Sprintf("shadow storage limit of %d bytes in %s reached", v.maxStorage, v.storageDir)) {
			return 0, false
		}
	}
}

// writeSlot allocates a diff-area slot for chunk c (applying the policy
// when full) and writes data to it. ok is false when the chunk is not
// preserved (its users were invalidated or deleted).
func (v *Volume) writeSlot(c, gen uint64, data []byte) (slot int64, ok bool) {
	for {
		v.mu.Lock()
		s, ok := v.allocSlot(c, gen)
		v.mu.Unlock()
		if !ok {
			return 0, false
		}
		_, err := v.store.f.WriteAt(data, s*v.chunk)
		if err == nil {
			return s, true
		}
		v.mu.Lock()
		v.store.release(s)
		if isNoSpace(err) {
			if !v.makeRoom(c, gen, fmt.Sprintf("filesystem of shadow storage %s is full", v.storageDir)) {
				v.mu.Unlock()
				return 0, false
			}
			v.mu.Unlock()
			continue
		}
		v.invalidateUsers(c, gen, fmt.Sprintf("writing diff area %s failed: %v", v.storePath(), err))
		v.mu.Unlock()
		return 0, false
	}
}

// makeRoom applies the policy when chunk c cannot be preserved for lack of
// space. It returns true when the caller should try again.
func (v *Volume) makeRoom(c, gen uint64, why string) bool {
	if v.policy == PolicyInvalidate {
		v.invalidateUsers(c, gen, why)
		return false
	}
	if len(v.snaps) == 0 {
		return false
	}
	v.deleteLocked(v.snaps[0], true)
	return true
}

func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) || errors.Is(err, syscall.EFBIG)
}

// invalidateUsers marks invalid every live snapshot that needed chunk c of
// the origin (those in (maxGen(c), gen]).
func (v *Volume) invalidateUsers(c, gen uint64, why string) {
	g := v.maxGen(c)
	for _, s := range v.snaps {
		if s.gen > g && s.gen <= gen && s.needs(c) {
			v.invalidate(s, why)
		}
	}
}

func (v *Volume) invalidate(s *snap, why string) {
	if s.invalid != "" {
		return
	}
	s.invalid = why
	v.log.append(record{Type: recInvalid, Gen: s.gen, Reason: why})
}

// syncInvalidation makes invalidation records durable before the origin
// write that caused them is issued.
func (v *Volume) syncInvalidation(lsync *groupSyncer) {
	if lsync != nil {
		if err := lsync.sync(); err != nil {
			v.failAll(fmt.Sprintf("syncing metadata %s failed: %v", v.metaPath(), err))
		}
	}
}

// failAll invalidates every live snapshot after an fsync of the diff area
// failed: what it covered may be lost.
func (v *Volume) failAll(why string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, s := range v.snaps {
		if s.invalid == "" {
			s.invalid = why
		}
	}
}

// claim makes snapshot s (nil: gone) the owner of chunk c's copy in slot
// and logs it, unless s is gone or owns c already: then the slot is
// freed. True means the caller puts the entry in the mapping.
func (v *Volume) claim(s *snap, c uint64, slot int64) bool {
	if s == nil || !s.owned.CheckedAdd(uint32(c)) {
		if slot != zeroSlot {
			v.freeSlots([]int64{slot})
		}
		return false
	}
	v.copies.Add(1)
	if slot != zeroSlot {
		s.nonzero++
	}
	v.log.append(record{Type: recMap, Chunk: c, Gen: s.gen, Slot: slot})
	return true
}

func (v *Volume) snapIndex(gen uint64) int {
	i := sort.Search(len(v.snaps), func(i int) bool { return v.snaps[i].gen >= gen })
	if i < len(v.snaps) && v.snaps[i].gen == gen {
		return i
	}
	return -1
}

func (v *Volume) snapByGen(gen uint64) *snap {
	if i := v.snapIndex(gen); i >= 0 {
		return v.snaps[i]
	}
	return nil
}

// predecessor returns the newest live snapshot older than gen.
func (v *Volume) predecessor(gen uint64) *snap {
	i := sort.Search(len(v.snaps), func(i int) bool { return v.snaps[i].gen >= gen })
	if i == 0 {
		return nil
	}
	return v.snaps[i-1]
}

func (v *Volume) snapByID(id string) *snap {
	for _, s := range v.snaps {
		if s.id == id {
			return s
		}
	}
	return nil
}

// deleteLocked removes snapshot s: each of its entries goes to its
// predecessor when the predecessor has none for that chunk, and is freed
// otherwise. log says whether to record the deletion.
func (v *Volume) deleteLocked(s *snap, log bool) {
	i := v.snapIndex(s.gen)
	if i < 0 {
		return
	}
	var p *snap
	if i > 0 {
		p = v.snaps[i-1]
	}
	var freed []int64
	it := s.owned.Iterator()
	for it.HasNext() {
		c := uint64(it.Next())
		e, ok := v.entries.Delete(entry{chunk: c, gen: s.gen})
		if !ok {
			continue
		}
		if p != nil && !p.owned.Contains(uint32(c)) {
			e.gen = p.gen
			v.entries.ReplaceOrInsert(e)
			p.owned.Add(uint32(c))
			if e.slot != zeroSlot {
				p.nonzero++
			}
		} else if e.slot != zeroSlot {
			freed = append(freed, e.slot)
		}
	}
	if p != nil {
		p.changed.Or(s.changed)
		p.reliable = p.reliable && s.reliable
	}
	v.snaps = append(v.snaps[:i], v.snaps[i+1:]...)
	v.hasSnaps.Store(int32(len(v.snaps)))
	if log {
		v.log.append(record{Type: recSnapDelete, Gen: s.gen})
	}
	v.freeSlots(freed)
	if s.persistent {
		v.persistent--
		if v.persistent == 0 && log {
			v.dropLog()
		}
	}
	if log {
		v.maybeResetStore()
	}
}

// maybeResetStore empties the diff area once no snapshot lives and no
// preservation still holds a slot (one may be in flight: its copy is then
// discarded by place).
func (v *Volume) maybeResetStore() {
	st := v.store
	if st == nil || len(v.snaps) > 0 || st.used() > 0 {
		return
	}
	st.reset(st.keep * v.chunk)
	if st.idle != nil {
		st.idle.Reset(idleRelease)
		return
	}
	st.idle = time.AfterFunc(idleRelease, func() {
		v.mu.Lock()
		defer v.mu.Unlock()
		if v.store == st && !st.shut && len(v.snaps) == 0 && st.used() == 0 {
			st.reset(0)
		}
	})
}

// freeSlots returns slots to the allocator once no reader is reading them.
func (v *Volume) freeSlots(slots []int64) {
	// While recovering, the log's frees are history: the slot may hold
	// data a later record maps. rebuildFree derives the allocator after.
	if len(slots) == 0 || v.store == nil || v.recovering {
		return
	}
	// Readers that found these slots may still be reading them, from the
	// write-behind's memory or from the file: only once they are done may
	// pending copies be dropped (a reader would otherwise miss the copy in
	// memory and read the file, which never got it) and the slots reused.
	v.slotMu.Lock()
	v.store.wb.cancel(slots)
	for _, s := range slots {
		v.store.release(s)
	}
	v.slotMu.Unlock()
	v.store.punch(slots, v.chunk)
	v.maybeResetStore()
}

func (v *Volume) maxSlots() int64 {
	if v.maxStorage <= 0 {
		return 0
	}
	return max(v.maxStorage/v.chunk, 0)
}

// CreateSnapshot commits a snapshot now (O(1)): it briefly holds writes so
// none is half-applied at the commit point. Persistent snapshots flush the
// origin first.
func (v *Volume) CreateSnapshot(ctx context.Context, opts provider.SnapshotOptions) (provider.Snapshot, error) {
	h, err := v.hold(ctx, DefaultHoldLimit, opts.Persistent)
	if err != nil {
		return provider.Snapshot{}, err
	}
	s, err := h.CreateSnapshot(ctx, opts)
	if rerr := h.Release(); err == nil && rerr != nil {
		err = rerr
	}
	return s, err
}

// commit creates the snapshot. No write is in flight.
func (v *Volume) commit(opts provider.SnapshotOptions) (provider.Snapshot, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return provider.Snapshot{}, ErrClosed
	}
	if v.storageDir == "" {
		return provider.Snapshot{}, fmt.Errorf("snapshot volume %s: %w; add one with `umbra storage add %s DIR --max SIZE`", v.name, provider.ErrNoStorage, v.name)
	}
	if len(v.snaps) >= v.maxSnaps {
		return provider.Snapshot{}, fmt.Errorf("snapshot volume %s: %d live snapshots is the limit; delete some first", v.name, v.maxSnaps)
	}
	gen := v.lastGen + 1
	id := opts.ID
	if id == "" {
		id = fmt.Sprintf("snap-%d", gen)
	}
	if err := validName(id); err != nil {
		return provider.Snapshot{}, fmt.Errorf("snapshot volume %s: %w", v.name, err)
	}
	if len(opts.SetID) > 255 {
		return provider.Snapshot{}, fmt.Errorf("snapshot volume %s: set id longer than 255 bytes", v.name)
	}
	if v.snapByID(id) != nil {
		return provider.Snapshot{}, fmt.Errorf("snapshot %s@%s: %w", v.name, id, provider.ErrExists)
	}
	if err := v.openStore(); err != nil {
		return provider.Snapshot{}, err
	}
	s := &snap{
		gen: gen, id: id, setID: opts.SetID, created: time.Now().UTC(),
		persistent: opts.Persistent, reliable: true,
		changed: roaring.New(), owned: roaring.New(),
	}
	rec := record{Type: recSnapCreate, Gen: gen, ID: id, SetID: opts.SetID, Persistent: opts.Persistent, Created: s.created.UnixNano()}
	v.snaps = append(v.snaps, s)
	switch {
	case opts.Persistent && v.log == nil:
		// The first persistent snapshot starts the log; older
		// non-persistent ones need not be in it.
		if err := v.checkpoint(false); err != nil {
			v.snaps = v.snaps[:len(v.snaps)-1]
			return provider.Snapshot{}, fmt.Errorf("snapshot volume %s: %w", v.name, err)
		}
	case opts.Persistent:
		v.log.append(rec)
		if err := v.log.flush(); err != nil {
			v.snaps = v.snaps[:len(v.snaps)-1]
			return provider.Snapshot{}, fmt.Errorf("snapshot volume %s: %w", v.name, err)
		}
	default:
		v.log.append(rec)
	}
	if opts.Persistent {
		v.persistent++
	}
	v.lastGen = gen
	v.hasSnaps.Store(int32(len(v.snaps)))
	return v.info(s), nil
}

func (v *Volume) info(s *snap) provider.Snapshot {
	out := provider.Snapshot{
		Volume: v.name, ID: s.id, Provider: ProviderName, SetID: s.setID,
		Created: s.created, Persistent: s.persistent, Valid: s.invalid == "",
		Reason: s.invalid, Size: v.size, DiffBytes: s.nonzero * v.chunk,
	}
	if s.invalid == "" && s.hasCursor && s.cursor > 0 {
		out.State = provider.StateBackupBase
		out.Reason = fmt.Sprintf("kept as a backup's base; its data below byte %d was released as the backup read past it", int64(s.cursor)<<v.shift)
	}
	return out
}

// Snapshots lists the live snapshots, oldest first.
func (v *Volume) Snapshots() []provider.Snapshot {
	v.settleWriteBehind(true)
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make([]provider.Snapshot, len(v.snaps))
	for i, s := range v.snaps {
		out[i] = v.info(s)
	}
	return out
}

// DeleteSnapshot deletes snapshot id; other snapshots read the same bytes
// afterwards, and its diff-area space is reused. It refuses with
// ErrSnapshotInUse, naming them, while front-end clients have the
// snapshot open (a loop device over its FUSE file, an NBD client): their
// reads would fail from then on (ForceDeleteSnapshot does it anyway).
func (v *Volume) DeleteSnapshot(id string) error {
	_, err := v.deleteSnapshot(id, false)
	return err
}

// ForceDeleteSnapshot is DeleteSnapshot even while clients have the
// snapshot open; it returns the users it cut off (their reads fail with
// provider.ErrNotFound from now on).
func (v *Volume) ForceDeleteSnapshot(id string) (cut []string, err error) {
	return v.deleteSnapshot(id, true)
}

func (v *Volume) deleteSnapshot(id string, force bool) ([]string, error) {
	v.mu.Lock()
	s := v.snapByID(id)
	if s == nil {
		v.mu.Unlock()
		return nil, fmt.Errorf("snapshot %s@%s: %w", v.name, id, provider.ErrNotFound)
	}
	// Under mu: a client opening the snapshot now waits for the delete
	// and then finds it gone.
	users := v.snapshotUsers(s.gen)
	if len(users) > 0 && !force {
		v.mu.Unlock()
		return nil, fmt.Errorf("delete snapshot %s@%s: %w: %s; detach the loop device over its FUSE file (umount, losetup -d) and disconnect its NBD clients, or delete with --force",
			v.name, id, ErrSnapshotInUse, strings.Join(users, ", "))
	}
	v.deleteLocked(s, true)
	lsync := v.log.syncer()
	v.mu.Unlock()
	if lsync != nil {
		if err := lsync.sync(); err != nil {
			return users, fmt.Errorf("delete snapshot %s@%s: %w", v.name, id, err)
		}
	}
	return users, nil
}

// Preserved counts the chunks preserved since the volume was opened.
func (v *Volume) Preserved() int64 { return v.copies.Load() }

// Storage describes the shadow storage association.
func (v *Volume) Storage() StorageInfo {
	v.mu.RLock()
	st := StorageInfo{Dir: v.storageDir, Max: v.maxStorage, Policy: v.policy}
	if v.store != nil {
		st.Used = v.store.used() * v.chunk
	}
	var store, meta string
	if v.storageDir != "" {
		store, meta = v.storePath(), v.metaPath()
	}
	v.mu.RUnlock()
	// Stat outside the lock: a diff area on a filesystem that hangs must
	// not stall the origin's writers behind a listing.
	if store != "" {
		// Never less than used: a copy in the write-behind takes its
		// space a moment after it is counted used.
		st.Allocated = max(v.allocated(store), st.Used) + v.allocated(meta)
	}
	return st
}

// allocated is the space a diff-area file occupies: its blocks where the
// file layer tells them, else its size; 0 when it does not exist.
func (v *Volume) allocated(name string) int64 {
	fi, err := v.fs.Stat(name)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// SetStorage changes the association. The directory can change only while
// no snapshot lives; max and policy can change any time, and shrinking
// below what is used applies the policy now.
func (v *Volume) SetStorage(dir string, maxBytes int64, policy Policy) error {
	if maxBytes < 0 {
		return fmt.Errorf("storage for %s: negative max %d", v.name, maxBytes)
	}
	if policy == "" {
		policy = PolicyDeleteOldest
	}
	if policy != PolicyDeleteOldest && policy != PolicyInvalidate {
		return fmt.Errorf("storage for %s: unknown policy %q (want %q or %q)", v.name, policy, PolicyDeleteOldest, PolicyInvalidate)
	}
	v.mu.Lock()
	if dir != v.storageDir {
		if len(v.snaps) > 0 {
			v.mu.Unlock()
			return fmt.Errorf("storage for %s: cannot move shadow storage from %s to %s while %d snapshots live; delete them first", v.name, v.storageDir, dir, len(v.snaps))
		}
		own, err := claimStorage(v.fs, dir)
		if err != nil {
			v.mu.Unlock()
			return fmt.Errorf("storage for %s: %w", v.name, err)
		}
		if v.store != nil {
			v.store.close()
			v.store = nil
		}
		v.storageOwn.Release()
		v.storageDir, v.storageOwn = dir, own
	}
	v.policy = policy
	v.mu.Unlock()
	return v.SetMaxStorage(maxBytes)
}

// SetMaxStorage resizes the association while snapshots live.
func (v *Volume) SetMaxStorage(maxBytes int64) error {
	if maxBytes < 0 {
		return fmt.Errorf("storage for %s: negative max %d", v.name, maxBytes)
	}
	v.mu.Lock()
	v.maxStorage = maxBytes
	for v.store != nil && maxBytes > 0 && v.store.used() > v.maxSlots() && len(v.snaps) > 0 {
		why := fmt.Sprintf("shadow storage shrunk to %d bytes", maxBytes)
		if v.policy == PolicyDeleteOldest {
			v.deleteLocked(v.snaps[0], true)
			continue
		}
		// Invalidate the oldest valid snapshot and free what only invalid
		// snapshots could read.
		var victim *snap
		for _, s := range v.snaps {
			if s.invalid == "" {
				victim = s
				break
			}
		}
		if victim == nil {
			v.releaseInvalid()
			break
		}
		v.invalidate(victim, why)
		v.releaseInvalid()
	}
	if v.store != nil {
		v.store.setKeep(v.keepSlots(), v.chunk)
	}
	lsync := v.log.syncer()
	v.mu.Unlock()
	if lsync != nil {
		return lsync.sync()
	}
	return nil
}

// releaseInvalid frees entries that no valid snapshot can read.
func (v *Volume) releaseInvalid() {
	var freed []int64
	var drop []entry
	prev := map[uint64]uint64{} // chunk -> previous entry generation
	v.entries.Ascend(func(e entry) bool {
		lo := prev[e.chunk]
		prev[e.chunk] = e.gen
		for _, s := range v.snaps {
			if s.gen > lo && s.gen <= e.gen && s.needs(e.chunk) {
				return true
			}
		}
		drop = append(drop, e)
		return true
	})
	for _, e := range drop {
		v.dropEntry(e, &freed)
	}
	v.freeSlots(freed)
}

func (v *Volume) dropEntry(e entry, freed *[]int64) {
	v.entries.Delete(e)
	if s := v.snapByGen(e.gen); s != nil {
		s.owned.Remove(uint32(e.chunk))
		if e.slot != zeroSlot {
			s.nonzero--
		}
	}
	if e.slot != zeroSlot {
		*freed = append(*freed, e.slot)
	}
	v.log.append(record{Type: recUnmap, Chunk: e.chunk, Gen: e.gen})
}

// Changed returns the chunks that may differ between snapshot since and
// snapshot upto ("" for the live volume). reliable is false when tracking
// may be incomplete (an unclean stop): read everything then.
func (v *Volume) Changed(since, upto string) (*provider.Bitmap, bool, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	s := v.snapByID(since)
	if s == nil {
		return nil, false, fmt.Errorf("changed blocks of %s since %q: %w", v.name, since, provider.ErrNotFound)
	}
	end := ^uint64(0)
	if upto != "" {
		u := v.snapByID(upto)
		if u == nil {
			return nil, false, fmt.Errorf("changed blocks of %s up to %q: %w", v.name, upto, provider.ErrNotFound)
		}
		if u.gen < s.gen {
			return nil, false, fmt.Errorf("changed blocks of %s: snapshot %s is older than %s", v.name, upto, since)
		}
		end = u.gen
	}
	acc := roaring.New()
	reliable := true
	for _, k := range v.snaps {
		if k.gen >= s.gen && k.gen < end {
			acc.Or(k.changed)
			reliable = reliable && k.reliable
		}
	}
	bm := &provider.Bitmap{Granule: v.chunk, Size: v.size, Bits: make([]uint64, (v.nchunks+63)/64)}
	it := acc.Iterator()
	for it.HasNext() {
		c := it.Next()
		if uint64(c) < v.nchunks {
			bm.Bits[c/64] |= 1 << (c % 64)
		}
	}
	return bm, reliable, nil
}

// Close flushes the origin, records a clean stop and closes the files.
// Non-persistent snapshots end with it.
func (v *Volume) Close() error {
	// Wait for writes in flight and any hold; later writes get ErrClosed.
	if err := v.gate.close(context.Background()); err != nil {
		return err
	}
	v.isClosed.Store(true)
	v.gate.reopen()
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil
	}
	v.closed = true
	var errs []error
	if err := v.origin.Sync(); err != nil {
		errs = append(errs, fmt.Errorf("flush origin %s: %w", v.originPath, err))
	}
	for i := len(v.snaps) - 1; i >= 0; i-- {
		if !v.snaps[i].persistent {
			v.deleteLocked(v.snaps[i], false)
		}
	}
	if v.log != nil {
		if err := v.checkpoint(true); err != nil {
			errs = append(errs, err)
		}
		v.log.f.Close()
		v.log = nil
	}
	if v.store != nil {
		if len(v.snaps) == 0 {
			v.store.reset(0)
		}
		if err := v.store.f.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("sync diff area %s: %w", v.storePath(), err))
		}
		v.store.close()
	}
	v.unmapOrigin()
	if err := v.origin.Close(); err != nil {
		errs = append(errs, err)
	}
	v.storageOwn.Release()
	if len(errs) > 0 {
		return fmt.Errorf("close volume %s: %w", v.name, errors.Join(errs...))
	}
	return nil
}
