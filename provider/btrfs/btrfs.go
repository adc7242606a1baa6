// Package btrfs is a system provider for btrfs subvolumes: committing a
// snapshot makes a read-only subvolume snapshot (btrfs subvolume snapshot
// -r) in the volume's snapshot directory; delete removes it; revert swaps
// subvolumes (a writable snapshot of the chosen one takes the live one's
// place). Snapshots are directories, exposed by path; they are not block
// images, so image backup does not apply (Open says so).
package btrfs

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"umbra/internal/owner"
	"umbra/provider"
)

// Name is the provider's name.
const Name = "btrfs"

// Provider implements provider.Provider over btrfs subvolumes.
type Provider struct {
	mu     sync.Mutex            // guards vols, claims, seq
	vols   map[string]string     // subvolume path -> snapshot directory
	claims map[string]*owner.Dir // subvolume path -> this process's claim on its snapshot directory
	seq    int
}

var _ provider.Provider = (*Provider)(nil)

// New returns a provider with no volumes.
func New() *Provider { return &Provider{vols: map[string]string{}, claims: map[string]*owner.Dir{}} }

// Close gives up the provider's claims on its snapshot directories.
func (p *Provider) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for path, c := range p.claims {
		c.Release()
		delete(p.claims, path)
	}
}

func btrfs(args ...string) (string, error) {
	out, err := exec.Command("btrfs", args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("btrfs %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Add registers subvolume path; its snapshots go to snapDir (on the same
// btrfs filesystem).
func (p *Provider) Add(path, snapDir string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	if _, err := exec.LookPath("btrfs"); err != nil {
		return errors.New("btrfs provider: the btrfs tool is missing (apt-get install btrfs-progs)")
	}
	if _, err := btrfs("subvolume", "show", abs); err != nil {
		return fmt.Errorf("btrfs volume %s is not a subvolume: %w", abs, err)
	}
	// One owner: the snapshot directory is this process's while the
	// volume is registered (until Close).
	claim, err := owner.ClaimDir(snapDir, "btrfs snapshot directory",
		"another Umbra service keeps this subvolume's snapshots there (its retention and revert would act on this one's): use that service, or stop it first")
	if err != nil {
		return fmt.Errorf("btrfs volume %s: %w", abs, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.claims[abs].Release() // a volume added again
	p.vols[abs], p.claims[abs] = snapDir, claim
	return nil
}

func (p *Provider) dir(vol string) (string, string, error) {
	abs, _ := filepath.Abs(vol)
	p.mu.Lock()
	defer p.mu.Unlock()
	d, ok := p.vols[abs]
	if !ok {
		return "", "", fmt.Errorf("btrfs volume %s: %w", vol, provider.ErrNotFound)
	}
	return abs, d, nil
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
		Kind: "system", CommitCost: "O(1) (read-only subvolume snapshot)", Revert: true,
		Persistent: true, Notes: "snapshots are directories (exposed by path); image backup of subvolumes is out of scope",
	}
}

func (p *Provider) Supports(ctx context.Context, vol string) error {
	_, _, err := p.dir(vol)
	return err
}

func (p *Provider) Prepare(ctx context.Context, vol string, opts provider.SnapshotOptions) (provider.Txn, error) {
	abs, d, err := p.dir(vol)
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
	dst := filepath.Join(d, opts.ID)
	if _, err := os.Stat(dst); err == nil {
		return nil, fmt.Errorf("snapshot %s@%s: %w", vol, opts.ID, provider.ErrExists)
	}
	return &txn{vol: abs, dst: dst, setID: opts.SetID}, nil
}

type txn struct {
	vol, dst  string
	setID     string
	committed bool
}

// setFile records the snapshot set a snapshot belongs to, beside it
// (a read-only subvolume cannot hold it).
func setFile(path string) string {
	return filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".set")
}

// PreCommit syncs the filesystem. Holding writes is the application
// writers' freeze: fsfreeze cannot, a snapshot waits on a frozen
// filesystem (coordinator's TestSystemCommitWaitsOnFreeze).
func (t *txn) PreCommit(ctx context.Context, limit time.Duration) error {
	_, err := btrfs("filesystem", "sync", t.vol)
	return err
}

func (t *txn) Commit(ctx context.Context) (provider.Snapshot, error) {
	if _, err := btrfs("subvolume", "snapshot", "-r", t.vol, t.dst); err != nil {
		return provider.Snapshot{}, err
	}
	t.committed = true
	if t.setID != "" {
		os.WriteFile(setFile(t.dst), []byte(t.setID), 0o644)
	}
	s, _, err := info(t.vol, t.dst)
	return s, err
}

func (t *txn) PostCommit(ctx context.Context) error { return nil }

func (t *txn) Abort(ctx context.Context) error {
	if !t.committed {
		return nil
	}
	t.committed = false
	os.Remove(setFile(t.dst))
	_, err := btrfs("subvolume", "delete", t.dst)
	return err
}

// info describes a snapshot. btrfs copies the source's root inode, so
// its times say nothing about the snapshot: the creation time and the
// generation at creation (which orders snapshots) come from
// `btrfs subvolume show`.
func info(vol, path string) (provider.Snapshot, uint64, error) {
	out, err := btrfs("subvolume", "show", path)
	if err != nil {
		return provider.Snapshot{}, 0, fmt.Errorf("snapshot %s: %w", path, provider.ErrNotFound)
	}
	s := provider.Snapshot{Volume: vol, ID: filepath.Base(path), Provider: Name, Persistent: true, Valid: true, Path: path}
	if b, err := os.ReadFile(setFile(path)); err == nil {
		s.SetID = strings.TrimSpace(string(b))
	}
	var gen uint64
	for _, line := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "Gen at creation":
			gen, _ = strconv.ParseUint(v, 10, 64)
		case "Creation time":
			if t, err := time.ParseInLocation("2006-01-02 15:04:05 -0700", v, time.Local); err == nil {
				s.Created = t.UTC()
			}
		}
	}
	return s, gen, nil
}

func (p *Provider) Delete(ctx context.Context, vol, id string) error {
	_, d, err := p.dir(vol)
	if err != nil {
		return err
	}
	path := filepath.Join(d, id)
	if _, err := os.Stat(path); err != nil || provider.ValidateID(id) != nil {
		return fmt.Errorf("snapshot %s@%s: %w", vol, id, provider.ErrNotFound)
	}
	if _, err = btrfs("subvolume", "delete", path); err == nil {
		os.Remove(setFile(path))
	}
	return err
}

func (p *Provider) List(ctx context.Context, vol string) ([]provider.Snapshot, error) {
	abs, d, err := p.dir(vol)
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(d)
	if err != nil {
		return nil, err
	}
	type snap struct {
		s   provider.Snapshot
		gen uint64
	}
	var all []snap
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		if s, gen, err := info(abs, filepath.Join(d, e.Name())); err == nil {
			all = append(all, snap{s, gen})
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].gen < all[j].gen })
	out := make([]provider.Snapshot, len(all))
	for i, x := range all {
		out[i] = x.s
	}
	return out, nil
}

// Open: subvolume snapshots are directories, not block images.
func (p *Provider) Open(ctx context.Context, vol, id string) (provider.Image, error) {
	return nil, fmt.Errorf("btrfs snapshot %s@%s is a directory (see its path), not a block image: %w", vol, id, provider.ErrNotSupported)
}

// Revert puts a writable snapshot of id in the volume's place and deletes
// the old subvolume and the snapshots later than id.
func (p *Provider) Revert(ctx context.Context, vol, id string) error {
	abs, d, err := p.dir(vol)
	if err != nil {
		return err
	}
	target, _, err := info(abs, filepath.Join(d, id))
	if err != nil {
		return err
	}
	list, err := p.List(ctx, vol) // oldest first
	if err != nil {
		return err
	}
	old := fmt.Sprintf("%s.umbra-revert-%d", abs, time.Now().UnixNano())
	if err := os.Rename(abs, old); err != nil {
		return fmt.Errorf("revert %s: move the live subvolume aside (is it in use?): %w", vol, err)
	}
	if _, err := btrfs("subvolume", "snapshot", target.Path, abs); err != nil {
		os.Rename(old, abs)
		return err
	}
	if _, err := btrfs("subvolume", "delete", old); err != nil {
		return err
	}
	later := false
	for _, s := range list {
		if later {
			btrfs("subvolume", "delete", s.Path)
		}
		later = later || s.ID == id
	}
	return nil
}
