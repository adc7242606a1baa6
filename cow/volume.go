package cow

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"golang.org/x/sys/unix"

	"umbra/internal/owner"
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

	zeroSlot = -1
	// numStripes is how many chunk locks a volume has (stripes.go): 96
	// KiB of them. Chunks numStripes apart share one, so two writers of
	// different chunks can wait on each other. With 1024, two to four NBD
	// connections' random 4 KiB first writes under a snapshot over 8192
	// chunks met on a stripe 3-8 times a pass, and those few waits were
	// most of the time they waited on locks (BenchmarkWrite4KConns,
	// mutex profile, measured 2026-12-07); with 4096, 0-1 times.
	numStripes = 4096
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

// Volume is an origin (file or block device) protected by copy-on-write
// snapshots. It is safe for concurrent use.
//
// It coordinates owned parts, each with one job: the gate admits origin
// writes and lets a hold close it (gate.go); the stripes order a write's
// preservation against snapshot reads of the same chunks (stripes.go);
// the preserver copies originals to the diff area before a write
// (preserver.go), through the store (store.go) and its write-behind
// (writebehind.go); the metadata log keeps persistent snapshots across a
// restart (metalog.go; recover.go has the volume's side). The Volume
// keeps the snapshots and their mapping (guarded by mu; snaps.go has
// their bookkeeping: lookups, deletion, invalidation, the policy when
// the diff area is full, freeing slots) and answers the public calls:
// reads, writes, snapshots and the storage association.
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

	gate     gate      // admits origin writes; holds close it (gate.go)
	stripes  stripes   // chunk locks: a preservation against reads of its chunks (stripes.go)
	pre      preserver // the copy-before-write path (preserver.go)
	hasSnaps atomic.Int32
	isClosed atomic.Bool
	// metaBroken: a metadata sync failed and the snapshots' invalidation
	// could not be made durable; writes under them are refused
	// (metaRefused). Set and cleared under mu.
	metaBroken atomic.Bool

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
	metaErr    string   // why the last metadata sync failed (logFailed)
	persistent int      // live persistent snapshots
	recovery   []error  // problems found when opening
	recovering bool     // replaying the log: frees must not touch the store
	// MAP records with a data checksum the last open's replay kept
	// (verified) and dropped because their data had not reached the disk
	// (tests read them).
	replayVerified, replayDropped int
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
	v.pre.v = v
	v.pre.bufs.New = func() any { b := make([]byte, v.chunk); return &b }
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
	// A write tried on a server's reading goroutine (!wait) is made with
	// raw system calls (quickio.go).
	if !locks.held() {
		n, err = v.writeOrigin(p, off, !wait)
		return n, true, err
	}
	defer locks.unlock()
	n, err = v.pre.preserveAndWrite(p, off, !wait)
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
	if v.pre.wbFailed.Load() {
		v.pre.settleWriteBehind(false)
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
// one for a persistent snapshot, which costs a sync of the diff area and
// its log before the write may go on (the ordering invariant). A server that tries writes on the
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
		if err := v.pre.preserveRange(uint64(off)>>v.shift, uint64(off+n-1)>>v.shift, false); err != nil {
			return true, err
		}
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
		if err := v.pre.preserveRange(c0, c1, false); err != nil {
			return err
		}
	}
	if !noHole {
		if err := v.origin.Punch(off, length); err == nil {
			return nil
		}
	}
	if done, err := writeZeros(v.origin, off, length); err != nil {
		return fmt.Errorf("volume %s: write zeroes at %d: %w", v.name, off+done, err)
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
			if rerr := v.logSyncFailedLocked(err); rerr != nil {
				err = rerr
			}
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
	v.pre.settleWriteBehind(true)
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
			// Deleted in memory, its slots free for others' copies: the
			// log is rewritten so that it does not come back at restart
			// over them.
			v.mu.Lock()
			if rerr := v.logSyncFailedLocked(err); rerr != nil {
				err = rerr
			}
			v.mu.Unlock()
			return users, fmt.Errorf("delete snapshot %s@%s: %w", v.name, id, err)
		}
	}
	return users, nil
}

// Preserved counts the chunks preserved since the volume was opened.
func (v *Volume) Preserved() int64 { return v.pre.copies.Load() }

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
	// The union as it is, a compressed bitmap: a map of a bit a chunk
	// took 32 MiB for a 1 TiB volume however little changed.
	if v.nchunks <= math.MaxUint32 {
		acc.RemoveRange(v.nchunks, math.MaxUint32+1)
	}
	return &provider.Bitmap{Granule: v.chunk, Size: v.size, Marks: acc}, reliable, nil
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
