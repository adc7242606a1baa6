// Package reflink is a system provider for volumes that are regular files
// (VM disk images, database files) on a filesystem with reflinks (XFS with
// reflink=1, btrfs): committing a snapshot clones the file into its shadow
// storage directory with FICLONE, which shares every extent and copies
// nothing. The I/O path stays the application's own; the writers' freeze is
// what holds it. Changed-block tracking compares the files' extent maps
// (FIEMAP): a block whose physical address is the same in both is
// unchanged. A block in a compressed (btrfs) or inline extent has no
// address of its own there; on btrfs the file's extent items (tree
// search, as root) say which of those are the same, and otherwise they
// count as changed. The storage limit counts the bytes of snapshot extents that
// are no longer shared.
package reflink

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"umbra/internal/owner"
	"umbra/provider"
)

// Name is the provider's name.
const Name = "reflink"

// Volume is a file protected by the provider.
type Volume struct {
	Path       string // the file
	StorageDir string // same filesystem as Path
	MaxBytes   int64  // 0: unlimited
	Policy     string // "delete-oldest" (default) or "invalidate"
}

// Provider implements provider.Provider and provider.Tracker.
type Provider struct {
	mu     sync.Mutex // guards vols, claims and seq
	vols   map[string]*Volume
	claims map[string]*owner.Dir // by volume path: this process's claim on its storage directory
	seq    int
}

var (
	_ provider.Provider = (*Provider)(nil)
	_ provider.Tracker  = (*Provider)(nil)
)

// New returns a provider with no volumes.
func New() *Provider {
	return &Provider{vols: map[string]*Volume{}, claims: map[string]*owner.Dir{}}
}

// storageHint is what to do when another process owns a storage directory.
const storageHint = "another Umbra service keeps its reflink snapshots there (its retention would delete this one's, and this one's its): serve the file from that service, or stop it first"

// Add registers a file volume. The storage directory must be on the same
// filesystem and the filesystem must clone: both are checked now.
func (p *Provider) Add(v Volume) error {
	abs, err := filepath.Abs(v.Path)
	if err != nil {
		return err
	}
	v.Path = abs
	if v.Policy == "" {
		v.Policy = "delete-oldest"
	}
	// One owner: the storage directory is this process's while the
	// volume is registered (until Close).
	claim, err := owner.ClaimDir(v.StorageDir, "reflink shadow storage directory", storageHint)
	if err != nil {
		return fmt.Errorf("reflink volume %s: %w", v.Path, err)
	}
	if err := p.check(v); err != nil {
		claim.Release()
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.claims[v.Path].Release() // a volume added again
	p.vols[v.Path], p.claims[v.Path] = &v, claim
	return nil
}

// Close gives up the provider's claims on its storage directories.
func (p *Provider) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for path, c := range p.claims {
		c.Release()
		delete(p.claims, path)
	}
}

// check says whether v can be snapshotted by cloning.
func (p *Provider) check(v Volume) error {
	var a, b unix.Stat_t
	if err := unix.Stat(v.Path, &a); err != nil {
		return fmt.Errorf("reflink volume %s: %w", v.Path, err)
	}
	if a.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("reflink volume %s: not a regular file", v.Path)
	}
	if err := unix.Stat(v.StorageDir, &b); err != nil {
		return err
	}
	if a.Dev != b.Dev {
		return fmt.Errorf("reflink volume %s and its storage %s are on different filesystems: clones cannot cross filesystems; put the storage on the volume's filesystem", v.Path, v.StorageDir)
	}
	probe := filepath.Join(v.StorageDir, ".umbra-clone-probe")
	if err := clone(v.Path, probe); err != nil {
		return fmt.Errorf("reflink volume %s: the filesystem cannot clone (%v): use XFS with reflink=1 or btrfs", v.Path, err)
	}
	os.Remove(probe)
	return nil
}

func clone(src, dst string) error {
	s, err := os.Open(src)
	if err != nil {
		return err
	}
	defer s.Close()
	d, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if err := unix.IoctlFileClone(int(d.Fd()), int(s.Fd())); err != nil {
		d.Close()
		os.Remove(dst)
		return err
	}
	if err := d.Sync(); err != nil {
		d.Close()
		return err
	}
	return d.Close()
}

func (p *Provider) volume(vol string) (*Volume, error) {
	abs, _ := filepath.Abs(vol)
	p.mu.Lock()
	defer p.mu.Unlock()
	v, ok := p.vols[abs]
	if !ok {
		return nil, fmt.Errorf("reflink volume %s: %w", vol, provider.ErrNotFound)
	}
	return v, nil
}

func (p *Provider) Name() string { return Name }

// Volumes lists the volumes added, sorted.
func (p *Provider) Volumes() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Sorted(maps.Keys(p.vols))
}

func (p *Provider) Capabilities() provider.Capabilities {
	return provider.Capabilities{
		Kind: "system", CommitCost: "O(extents) (FICLONE shares, copies nothing)", Revert: true, Tracking: true,
		StorageLimit: true, BlockImage: true, Persistent: true,
		Notes: "regular files on XFS (reflink=1) or btrfs; storage on the same filesystem",
	}
}

func (p *Provider) Supports(ctx context.Context, vol string) error {
	_, err := p.volume(vol)
	return err
}

// snapPath is where snapshot id of v lives.
func snapPath(v *Volume, id string) string {
	return filepath.Join(v.StorageDir, filepath.Base(v.Path)+"@"+id)
}

func (p *Provider) Prepare(ctx context.Context, vol string, opts provider.SnapshotOptions) (provider.Txn, error) {
	v, err := p.volume(vol)
	if err != nil {
		return nil, err
	}
	if opts.ID == "" {
		p.mu.Lock()
		p.seq++
		opts.ID = fmt.Sprintf("snap-%d-%d", time.Now().Unix(), p.seq)
		p.mu.Unlock()
	}
	if err := provider.ValidateID(opts.ID); err != nil {
		return nil, fmt.Errorf("snapshot of %s: %w", vol, err)
	}
	if _, err := os.Stat(snapPath(v, opts.ID)); err == nil {
		return nil, fmt.Errorf("snapshot %s@%s: %w", vol, opts.ID, provider.ErrExists)
	}
	return &txn{p: p, v: v, opts: opts}, nil
}

type txn struct {
	p         *Provider
	v         *Volume
	opts      provider.SnapshotOptions
	committed bool
}

// PreCommit flushes the file. Holding its writes is the application
// writers' freeze: fsfreeze cannot, FICLONE waits on a frozen filesystem
// (coordinator's TestSystemCommitWaitsOnFreeze).
func (t *txn) PreCommit(ctx context.Context, limit time.Duration) error {
	f, err := os.Open(t.v.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func (t *txn) Commit(ctx context.Context) (provider.Snapshot, error) {
	dst := snapPath(t.v, t.opts.ID)
	if err := clone(t.v.Path, dst); err != nil {
		return provider.Snapshot{}, fmt.Errorf("clone %s to %s: %w", t.v.Path, dst, err)
	}
	t.committed = true
	if t.opts.SetID != "" {
		os.WriteFile(dst+".set", []byte(t.opts.SetID), 0o600)
	}
	if err := t.p.enforce(t.v); err != nil {
		return provider.Snapshot{}, err
	}
	// A fresh clone shares every extent: it uses no storage yet, and
	// mapping its extents here would lengthen the writers' freeze by a
	// pass over them.
	return t.p.info(t.v, t.opts.ID, false)
}

func (t *txn) PostCommit(ctx context.Context) error { return nil }

func (t *txn) Abort(ctx context.Context) error {
	if t.committed {
		t.committed = false
		os.Remove(snapPath(t.v, t.opts.ID) + ".set")
		return os.Remove(snapPath(t.v, t.opts.ID))
	}
	return nil
}

// info describes snapshot id of v; with usage, it also counts the
// storage the snapshot holds (a pass over its extent map).
func (p *Provider) info(v *Volume, id string, usage bool) (provider.Snapshot, error) {
	path := snapPath(v, id)
	fi, err := os.Stat(path)
	if err != nil {
		return provider.Snapshot{}, fmt.Errorf("snapshot %s@%s: %w", v.Path, id, provider.ErrNotFound)
	}
	s := provider.Snapshot{Volume: v.Path, ID: id, Provider: Name, Created: fi.ModTime().UTC(), Persistent: true,
		Valid: true, Size: fi.Size(), Path: path}
	if _, err := os.Stat(path + ".invalid"); err == nil {
		b, _ := os.ReadFile(path + ".invalid")
		s.Valid, s.Reason = false, strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile(path + ".set"); err == nil {
		s.SetID = string(b)
	}
	if usage {
		s.DiffBytes, _ = unshared(path)
	}
	return s, nil
}

func (p *Provider) Delete(ctx context.Context, vol, id string) error {
	v, err := p.volume(vol)
	if err != nil {
		return err
	}
	path := snapPath(v, id)
	if err := os.Remove(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("snapshot %s@%s: %w", vol, id, provider.ErrNotFound)
		}
		return err
	}
	os.Remove(path + ".invalid")
	os.Remove(path + ".set")
	return nil
}

func (p *Provider) List(ctx context.Context, vol string) ([]provider.Snapshot, error) {
	v, err := p.volume(vol)
	if err != nil {
		return nil, err
	}
	return p.list(v)
}

func (p *Provider) list(v *Volume) ([]provider.Snapshot, error) {
	prefix := filepath.Base(v.Path) + "@"
	ents, err := os.ReadDir(v.StorageDir)
	if err != nil {
		return nil, err
	}
	var out []provider.Snapshot
	for _, e := range ents {
		name := e.Name()
		if !strings.HasPrefix(name, prefix) || strings.HasSuffix(name, ".invalid") || strings.HasSuffix(name, ".set") {
			continue
		}
		s, err := p.info(v, strings.TrimPrefix(name, prefix), true)
		if err == nil {
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, nil
}

type image struct{ *os.File }

func (i image) Size() int64 {
	fi, err := i.Stat()
	if err != nil {
		return 0
	}
	return fi.Size()
}

func (p *Provider) Open(ctx context.Context, vol, id string) (provider.Image, error) {
	v, err := p.volume(vol)
	if err != nil {
		return nil, err
	}
	if s, err := p.info(v, id, false); err != nil {
		return nil, err
	} else if !s.Valid {
		return nil, fmt.Errorf("snapshot %s@%s: %w: %s", vol, id, provider.ErrSnapshotInvalid, s.Reason)
	}
	f, err := os.Open(snapPath(v, id))
	if err != nil {
		return nil, err
	}
	return image{f}, nil
}

// Revert clones the snapshot back onto the volume file and deletes later
// snapshots.
func (p *Provider) Revert(ctx context.Context, vol, id string) error {
	v, err := p.volume(vol)
	if err != nil {
		return err
	}
	target, err := p.info(v, id, false)
	if err != nil {
		return err
	}
	list, err := p.list(v)
	if err != nil {
		return err
	}
	src, err := os.Open(target.Path)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(v.Path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err != nil {
		dst.Close()
		return fmt.Errorf("revert %s to %s: clone back: %w", vol, id, err)
	}
	if err := dst.Sync(); err != nil {
		dst.Close()
		return err
	}
	dst.Close()
	for _, s := range list {
		if s.Created.After(target.Created) || (s.Created.Equal(target.Created) && s.ID > id) {
			p.Delete(ctx, vol, s.ID)
		}
	}
	return nil
}

// enforce applies the storage limit after a commit.
func (p *Provider) enforce(v *Volume) error {
	if v.MaxBytes <= 0 {
		return nil
	}
	for {
		list, err := p.list(v)
		if err != nil {
			return err
		}
		var used int64
		for _, s := range list {
			used += s.DiffBytes
		}
		if used <= v.MaxBytes || len(list) == 0 {
			return nil
		}
		oldest := list[0]
		why := fmt.Sprintf("shadow storage limit of %d bytes in %s reached (%d used)", v.MaxBytes, v.StorageDir, used)
		if v.Policy == "invalidate" {
			if !oldest.Valid {
				return nil
			}
			os.WriteFile(oldest.Path+".invalid", []byte(why), 0o600)
			// An invalid clone keeps no data worth its space.
			os.Truncate(oldest.Path, 0)
			continue
		}
		os.Remove(oldest.Path)
	}
}

// Changed compares extent maps: blocks mapped to the same physical place
// in both files are unchanged; everything else is marked. A block in an
// extent whose physical address does not locate it (compressed on btrfs,
// inline, delayed allocation: see opaque) is marked, its address saying
// nothing about its bytes, unless btrfs's extent items show it is the
// same (refineBtrfs).
func (p *Provider) Changed(ctx context.Context, vol, since, upto string) (*provider.Bitmap, bool, error) {
	v, err := p.volume(vol)
	if err != nil {
		return nil, false, err
	}
	a := snapPath(v, since)
	if _, err := os.Stat(a); err != nil {
		return nil, false, fmt.Errorf("snapshot %s@%s: %w", vol, since, provider.ErrNotFound)
	}
	b := v.Path
	if upto != "" {
		b = snapPath(v, upto)
	}
	ea, err := fiemap(a)
	if err != nil {
		return nil, false, err
	}
	eb, err := fiemap(b)
	if err != nil {
		return nil, false, err
	}
	fi, err := os.Stat(b)
	if err != nil {
		return nil, false, err
	}
	const g = 4096
	size := fi.Size()
	bm := &provider.Bitmap{Granule: g, Size: size, Bits: make([]uint64, (size/g+64)/64)}
	opaqueSeen := false
	for blk := int64(0); blk*g < size; blk++ {
		pa, ka := locate(ea, blk*g)
		pb, kb := locate(eb, blk*g)
		if ka != kb || ka == mapOpaque || (ka == mapPlain && pa != pb) {
			bm.Bits[blk/64] |= 1 << (blk % 64)
			opaqueSeen = opaqueSeen || ka == mapOpaque || kb == mapOpaque
		}
	}
	if opaqueSeen && isBtrfs(b) {
		refineBtrfs(bm, a, b)
	}
	return bm, true, nil
}

// refineBtrfs clears, in bm, the blocks that the btrfs extent items of
// files a and b show are the same bytes. It leaves bm as it is when the
// items cannot be read.
func refineBtrfs(bm *provider.Bitmap, a, b string) {
	ia, err := btrfsItems(a)
	if err != nil {
		return
	}
	ib, err := btrfsItems(b)
	if err != nil {
		return
	}
	g := bm.Granule
	for blk := int64(0); blk*g < bm.Size; blk++ {
		if !bm.Set(blk) {
			continue
		}
		da, oa, ka := locateItem(ia, blk*g)
		db, ob, kb := locateItem(ib, blk*g)
		if ka == kb && (ka == mapHole || (ka == mapPlain && da == db && oa == ob)) {
			bm.Bits[blk/64] &^= 1 << (blk % 64)
		}
	}
}

// How a file offset is mapped.
const (
	mapHole   = iota // a hole or an unwritten extent: reads zeros
	mapPlain         // data at a physical address of its own
	mapOpaque        // data whose address does not identify it
)

// locate returns where the block at off of a file with extents ext
// lies, and how it is mapped.
func locate(ext []extent, off int64) (int64, int) {
	i := sort.Search(len(ext), func(i int) bool { return ext[i].logical+ext[i].length > off })
	switch {
	case i == len(ext) || ext[i].logical > off || ext[i].flags&fiemapUnwritten != 0:
		return 0, mapHole
	case ext[i].flags&opaque != 0:
		return 0, mapOpaque
	}
	return ext[i].physical + off - ext[i].logical, mapPlain
}

// FIEMAP, from linux/fiemap.h.
const (
	fsIocFiemap      = 0xc020660b
	fiemapFlagSync   = 0x1
	fiemapLast       = 0x1
	fiemapUnwritten  = 0x800
	fiemapShared     = 0x2000
	fiemapExtentSize = 56
	fiemapHeaderSize = 32
)

// opaque are the flags of extents whose physical address does not
// locate each of their blocks: unknown or not yet allocated (0x2, 0x4),
// encoded — btrfs reports a compressed extent's start for every part
// of it, and merges a compressed extent with the next one written
// right after it on disk into one record, so two different blocks
// can show the same address (0x8) —, encrypted (0x80), packed or
// inline in metadata (0x100, 0x200, 0x400).
const opaque = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400

type extent struct {
	logical, physical, length int64
	flags                     uint32
}

func fiemap(path string) ([]extent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	const batch = 512
	buf := make([]byte, fiemapHeaderSize+batch*fiemapExtentSize)
	var out []extent
	start := uint64(0)
	for {
		clear(buf)
		le := func(off int, v uint64, n int) {
			for i := 0; i < n; i++ {
				buf[off+i] = byte(v >> (8 * i))
			}
		}
		le(0, start, 8)
		le(8, ^uint64(0)-start, 8)
		le(16, fiemapFlagSync, 4)
		le(24, batch, 4)
		if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
			return nil, fmt.Errorf("FIEMAP %s: %w", path, e)
		}
		get := func(off, n int) uint64 {
			var v uint64
			for i := n - 1; i >= 0; i-- {
				v = v<<8 | uint64(buf[off+i])
			}
			return v
		}
		n := int(get(20, 4))
		if n == 0 {
			return out, nil
		}
		last := false
		for i := 0; i < n; i++ {
			o := fiemapHeaderSize + i*fiemapExtentSize
			e := extent{logical: int64(get(o, 8)), physical: int64(get(o+8, 8)), length: int64(get(o+16, 8)), flags: uint32(get(o+40, 4))}
			out = append(out, e)
			start = uint64(e.logical + e.length)
			last = last || e.flags&fiemapLast != 0
		}
		if last {
			return out, nil
		}
	}
}

// unshared counts the bytes of path's extents that no other file shares.
func unshared(path string) (int64, error) {
	ext, err := fiemap(path)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, e := range ext {
		if e.flags&fiemapShared == 0 {
			n += e.length
		}
	}
	return n, nil
}
