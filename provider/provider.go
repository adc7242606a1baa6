// Package provider defines the Provider interface: the thing that makes a
// point-in-time copy of a volume (VSS's "provider" role), and a registry of
// the providers a service runs.
//
// The built-in software provider is the copy-on-write engine (package cow);
// system providers wrap snapshots a filesystem makes natively (reflink
// files, btrfs subvolumes). Every provider passes the same conformance
// suite (provider/providertest).
//
// The coordinator drives a provider through one snapshot in phases:
//
//	txn := p.Prepare(ctx, vol, opts)   // check space, validate; no I/O held
//	txn.PreCommit(ctx, limit)          // flush and hold writes (≤ limit)
//	snap := txn.Commit(ctx)            // O(1), inside the hold window
//	txn.PostCommit(ctx)                // release held writes
//	txn.Abort(ctx)                     // any time: release, delete what exists
//
// A Txn is used by one goroutine. Abort after PostCommit deletes the
// committed snapshot; Abort is always safe to call and idempotent.
// PostCommit is also safe after PreCommit whatever Commit did (or if it
// was never called): an aborting set calls it first on every member so
// that no write waits on a hold while the rest of the abort runs.
package provider

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"regexp"
	"sort"
	"sync"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
)

// Typed errors callers decide on.
var (
	ErrNotSupported    = errors.New("not supported by this provider")
	ErrNotFound        = errors.New("not found")
	ErrExists          = errors.New("already exists")
	ErrHoldTimeout     = errors.New("write hold exceeded its limit and was released")
	ErrSnapshotInvalid = errors.New("snapshot is invalid")
	ErrNoStorage       = errors.New("no shadow storage association")
	ErrBadID           = errors.New("invalid name")
)

// idRE is compiled on first use: its bounded repetition compiles to
// ~1 700 allocations (1.6 ms at the start of every command, measured
// 2026-12-07), and most commands never check a name.
var idRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`) })

// ValidateID checks a volume or snapshot name: 1 to 128 of [A-Za-z0-9._-],
// starting with a letter or digit (names become file names and export
// names, so nothing else is allowed).
func ValidateID(id string) error {
	if !idRE().MatchString(id) {
		return fmt.Errorf("%w %q: use 1-128 of [A-Za-z0-9._-], starting with a letter or digit", ErrBadID, id)
	}
	return nil
}

// SnapshotOptions are chosen when a snapshot is created.
type SnapshotOptions struct {
	// ID names the snapshot within its volume; empty lets the provider
	// choose. IDs use [A-Za-z0-9._-] only.
	ID string
	// Persistent snapshots survive a restart and an unclean stop.
	// Non-persistent ones cost no fsync and vanish on restart.
	Persistent bool
	// SetID groups the snapshots of one snapshot set (informational).
	SetID string
}

// Snapshot describes one shadow copy.
type Snapshot struct {
	Volume     string    `json:"volume"`
	ID         string    `json:"id"`
	Provider   string    `json:"provider"`
	SetID      string    `json:"set_id,omitempty"`
	Created    time.Time `json:"created"`
	Persistent bool      `json:"persistent"`
	Valid      bool      `json:"valid"`
	Reason     string    `json:"reason,omitempty"` // why it is invalid
	Size       int64     `json:"size"`             // bytes of the volume image
	Path       string    `json:"path,omitempty"`   // for providers whose snapshots have a path
	DiffBytes  int64     `json:"diff_bytes"`       // shadow storage used by this snapshot
	// State is StateBackupBase for a snapshot whose data a backup
	// released (Reason says how far); empty means StateValid or
	// StateInvalid, as Valid says (see StateOf).
	State string `json:"state,omitempty"`
}

// Snapshot states, as listed.
const (
	StateValid   = "valid"
	StateInvalid = "invalid"
	// StateBackupBase: kept by a backup as the base of the volume's next
	// incremental image; the data behind the backup cursor was released,
	// so it is no longer readable, only the changes since it are known.
	// It is neither exported nor exposed; Valid stays true, as a base to
	// count changes from.
	StateBackupBase = "backup-base"
)

// StateOf is s's state: valid, invalid or backup-base.
func StateOf(s Snapshot) string {
	switch {
	case s.State != "":
		return s.State
	case !s.Valid:
		return StateInvalid
	}
	return StateValid
}

// Capabilities say what a provider can do, for `umbra providers list`.
type Capabilities struct {
	Kind          string `json:"kind"`        // "software" or "system"
	CommitCost    string `json:"commit_cost"` // e.g. "O(1)"
	Revert        bool   `json:"revert"`
	Tracking      bool   `json:"tracking"`       // changed-block tracking
	StorageLimit  bool   `json:"storage_limit"`  // enforces a max shadow storage size
	BlockImage    bool   `json:"block_image"`    // snapshots read as block images (backup-able)
	Persistent    bool   `json:"persistent"`     // supports persistent snapshots
	NonPersistent bool   `json:"non_persistent"` // supports auto-release snapshots
	Notes         string `json:"notes,omitempty"`
}

// Device is a volume or snapshot as the frontends serve it (an NBD
// export, a FUSE file): bytes at offsets, a fixed size, and a flush that
// makes what was written durable. A read-only one refuses WriteAt.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Size() int64
	Flush() error
}

// Image is a read-only view of a snapshot as a block image.
type Image interface {
	io.ReaderAt
	Size() int64
	Close() error
}

// Cursorer is implemented by images whose provider can release preserved
// data behind a reader that streams in ascending order (the backup cursor).
type Cursorer interface {
	// SetCursor says that the reader will never read below off again.
	SetCursor(off int64)
}

// Bitmap lists changed regions in units of Granule bytes.
type Bitmap struct {
	Granule int64    // bytes per bit
	Size    int64    // volume size in bytes
	Bits    []uint64 // bit i set: bytes [i*Granule, (i+1)*Granule) may differ
	// Marks, when not nil, holds the set bits instead of Bits: a
	// compressed bitmap, a few bytes a changed granule. Bits costs a
	// bit a granule whatever changed (32 MiB for a 1 TiB volume at 4
	// KiB), so a provider that tracks changes in a compressed bitmap
	// hands that over instead.
	Marks *roaring.Bitmap
}

// Set reports whether bit i is set.
func (b *Bitmap) Set(i int64) bool {
	if b.Marks != nil {
		return i >= 0 && i <= math.MaxUint32 && b.Marks.Contains(uint32(i))
	}
	w := i / 64
	return i >= 0 && w < int64(len(b.Bits)) && b.Bits[w]&(1<<(uint(i)%64)) != 0
}

// Each calls fn with the set bits in [lo, hi), in ascending order,
// until fn returns false; it skips unset bits a word (or a compressed
// container) at a time.
func (b *Bitmap) Each(lo, hi int64, fn func(i int64) bool) {
	lo = max(lo, 0)
	if b.Marks != nil {
		if lo > math.MaxUint32 {
			return
		}
		it := b.Marks.Iterator()
		it.AdvanceIfNeeded(uint32(lo))
		for it.HasNext() {
			i := int64(it.Next())
			if i >= hi || !fn(i) {
				return
			}
		}
		return
	}
	for i := lo; i < hi; {
		w := i / 64
		if w >= int64(len(b.Bits)) {
			return
		}
		word := b.Bits[w] >> (i % 64)
		if word == 0 {
			i = (w + 1) * 64
			continue
		}
		i += int64(bits.TrailingZeros64(word))
		if i >= hi || !fn(i) {
			return
		}
		i++
	}
}

// Txn is one snapshot being made; see the package doc for the phases.
type Txn interface {
	PreCommit(ctx context.Context, holdLimit time.Duration) error
	Commit(ctx context.Context) (Snapshot, error)
	PostCommit(ctx context.Context) error
	Abort(ctx context.Context) error
}

// ForceDeleter is implemented by a provider whose Delete refuses while
// front-end clients read the snapshot: ForceDelete deletes it anyway and
// names the users it cut off.
type ForceDeleter interface {
	ForceDelete(ctx context.Context, vol, id string) (cut []string, err error)
}

// HoldTimer is implemented by a Txn that knows when its volume's writes
// were held: HeldSince is when they began to wait (after the flush its
// PreCommit does while they still flow; zero before PreCommit), HeldUntil
// when they resumed (zero until PostCommit or Abort). A set's hold window
// then counts only the time writes were actually held, not that flush,
// nor the time the coordinator takes to run again after a release.
type HoldTimer interface {
	HeldSince() time.Time
	HeldUntil() time.Time
}

// Provider makes, lists and removes point-in-time copies of volumes.
// A volume is named by a string the provider understands: a COW volume's
// name, a file path, a subvolume path.
type Provider interface {
	Name() string
	Capabilities() Capabilities
	// Supports returns nil when vol can be snapshotted by this provider,
	// otherwise an error saying why not.
	Supports(ctx context.Context, vol string) error
	Prepare(ctx context.Context, vol string, opts SnapshotOptions) (Txn, error)
	Delete(ctx context.Context, vol, id string) error
	List(ctx context.Context, vol string) ([]Snapshot, error)
	// Open exposes a snapshot as a read-only block image
	// (ErrNotSupported when the provider's snapshots are not block images).
	Open(ctx context.Context, vol, id string) (Image, error)
	// Revert rolls vol back to snapshot id; later snapshots are deleted.
	Revert(ctx context.Context, vol, id string) error
}

// Tracker is implemented by providers with changed-block tracking.
type Tracker interface {
	// Changed returns the regions of vol that may differ from snapshot
	// since, up to snapshot upto (empty: the live volume). reliable is
	// false when tracking may be incomplete (e.g. after an unclean stop):
	// the caller must then read everything.
	Changed(ctx context.Context, vol, since, upto string) (bm *Bitmap, reliable bool, err error)
}

// Registry holds the providers of one service, by name.
type Registry struct {
	mu        sync.Mutex // guards providers
	providers map[string]Provider
}

// Register adds p; a second provider with the same name is an error.
func (r *Registry) Register(p Provider) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.providers == nil {
		r.providers = map[string]Provider{}
	}
	if _, ok := r.providers[p.Name()]; ok {
		return fmt.Errorf("register provider %q: %w", p.Name(), ErrExists)
	}
	r.providers[p.Name()] = p
	return nil
}

// Get returns the provider called name.
func (r *Registry) Get(name string) (Provider, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, ok := r.providers[name]
	if !ok {
		return nil, fmt.Errorf("provider %q: %w", name, ErrNotFound)
	}
	return p, nil
}

// All returns the providers sorted by name.
func (r *Registry) All() []Provider {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Provider, 0, len(r.providers))
	for _, p := range r.providers {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name() < out[j].Name() })
	return out
}

// For returns the first provider (by name) that supports vol.
func (r *Registry) For(ctx context.Context, vol string) (Provider, error) {
	var why []error
	for _, p := range r.All() {
		err := p.Supports(ctx, vol)
		if err == nil {
			return p, nil
		}
		why = append(why, fmt.Errorf("%s: %w", p.Name(), err))
	}
	return nil, fmt.Errorf("no provider supports volume %q: %w", vol, errors.Join(why...))
}
