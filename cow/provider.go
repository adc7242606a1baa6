package cow

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"umbra/provider"
)

// ProviderName is the COW engine's provider name.
const ProviderName = "cow"

// Provider is the software provider: provider.Provider (and
// provider.Tracker) over the COW volumes added to it.
type Provider struct {
	mu      sync.Mutex // guards volumes
	volumes map[string]*Volume
}

var (
	_ provider.Provider     = (*Provider)(nil)
	_ provider.Tracker      = (*Provider)(nil)
	_ provider.ForceDeleter = (*Provider)(nil)
)

// NewProvider returns a provider with no volumes.
func NewProvider() *Provider { return &Provider{volumes: map[string]*Volume{}} }

// Add registers v under its name.
func (p *Provider) Add(v *Volume) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.volumes[v.Name()]; ok {
		return fmt.Errorf("add volume %s: %w", v.Name(), provider.ErrExists)
	}
	p.volumes[v.Name()] = v
	return nil
}

// Remove unregisters and returns the volume called name (not closed).
func (p *Provider) Remove(name string) (*Volume, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	v, ok := p.volumes[name]
	if !ok {
		return nil, fmt.Errorf("volume %s: %w", name, provider.ErrNotFound)
	}
	delete(p.volumes, name)
	return v, nil
}

// Volume returns the volume called name.
func (p *Provider) Volume(name string) (*Volume, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	v, ok := p.volumes[name]
	if !ok {
		return nil, fmt.Errorf("volume %s: %w (known to the cow provider: %v)", name, provider.ErrNotFound, p.namesLocked())
	}
	return v, nil
}

// Volumes returns the registered volumes sorted by name.
func (p *Provider) Volumes() []*Volume {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*Volume, 0, len(p.volumes))
	for _, v := range p.volumes {
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name() < out[j].Name() })
	return out
}

func (p *Provider) namesLocked() []string {
	var names []string
	for n := range p.volumes {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func (p *Provider) Name() string { return ProviderName }

func (p *Provider) Capabilities() provider.Capabilities {
	return provider.Capabilities{
		Kind: "software", CommitCost: "O(1)", Revert: true, Tracking: true,
		StorageLimit: true, BlockImage: true, Persistent: true, NonPersistent: true,
		Notes: "I/O must pass through Umbra (NBD export or FUSE file)",
	}
}

func (p *Provider) Supports(ctx context.Context, vol string) error {
	_, err := p.Volume(vol)
	return err
}

func (p *Provider) Prepare(ctx context.Context, vol string, opts provider.SnapshotOptions) (provider.Txn, error) {
	v, err := p.Volume(vol)
	if err != nil {
		return nil, err
	}
	if opts.ID != "" {
		if err := validName(opts.ID); err != nil {
			return nil, fmt.Errorf("prepare snapshot of %s: %w", vol, err)
		}
	}
	// What commit would refuse is refused here too, before any writer
	// freezes or any write waits (commit checks again: a snapshot can be
	// made between the two).
	v.mu.RLock()
	noStorage := v.storageDir == ""
	exists := opts.ID != "" && v.snapByID(opts.ID) != nil
	full := len(v.snaps) >= v.maxSnaps
	v.mu.RUnlock()
	switch {
	case noStorage:
		return nil, fmt.Errorf("prepare snapshot of %s: %w; add one with `umbra storage add %s DIR --max SIZE`", vol, provider.ErrNoStorage, vol)
	case exists:
		return nil, fmt.Errorf("prepare snapshot %s@%s: %w: choose another id or delete it first", vol, opts.ID, provider.ErrExists)
	case full:
		return nil, fmt.Errorf("prepare snapshot of %s: %d live snapshots is the limit; delete some first", vol, v.maxSnaps)
	}
	return &txn{v: v, opts: opts}, nil
}

type txn struct {
	v         *Volume
	opts      provider.SnapshotOptions
	hold      *Hold  // standing
	last      *Hold  // the last one, standing or ended: its window
	committed string // snapshot id once committed
}

func (t *txn) PreCommit(ctx context.Context, limit time.Duration) error {
	if t.hold != nil {
		return fmt.Errorf("pre-commit %s: already holding", t.v.name)
	}
	// Flush before closing the gate, so the flush inside the hold has
	// little left to write and writes wait for less.
	if err := t.v.Flush(); err != nil {
		return err
	}
	h, err := t.v.Hold(ctx, limit)
	if err != nil {
		return err
	}
	t.hold, t.last = h, h
	return nil
}

// HeldSince is when the hold began to block writes (after the flush that
// precedes it); zero before PreCommit.
func (t *txn) HeldSince() time.Time {
	if t.last == nil {
		return time.Time{}
	}
	start, _ := t.last.Window()
	return start
}

// HeldUntil is when writes resumed; zero until the hold ended.
func (t *txn) HeldUntil() time.Time {
	if t.last == nil {
		return time.Time{}
	}
	_, end := t.last.Window()
	return end
}

func (t *txn) Commit(ctx context.Context) (provider.Snapshot, error) {
	if t.hold == nil {
		return provider.Snapshot{}, fmt.Errorf("commit %s: no hold: call PreCommit first", t.v.name)
	}
	s, err := t.hold.CreateSnapshot(ctx, t.opts)
	if err != nil {
		return s, err
	}
	t.committed = s.ID
	return s, nil
}

func (t *txn) PostCommit(ctx context.Context) error {
	if t.hold == nil {
		return nil
	}
	err := t.hold.Release()
	t.hold = nil
	return err
}

func (t *txn) Abort(ctx context.Context) error {
	if t.hold != nil {
		_ = t.hold.Release()
		t.hold = nil
	}
	if t.committed != "" {
		id := t.committed
		t.committed = ""
		// The set's own snapshot: whoever opened it since the commit
		// read a snapshot that never was acknowledged.
		_, err := t.v.ForceDeleteSnapshot(id)
		return err
	}
	return nil
}

func (p *Provider) Delete(ctx context.Context, vol, id string) error {
	v, err := p.Volume(vol)
	if err != nil {
		return err
	}
	return v.DeleteSnapshot(id)
}

// ForceDelete deletes snapshot id of vol even while clients read it.
func (p *Provider) ForceDelete(ctx context.Context, vol, id string) ([]string, error) {
	v, err := p.Volume(vol)
	if err != nil {
		return nil, err
	}
	return v.ForceDeleteSnapshot(id)
}

func (p *Provider) List(ctx context.Context, vol string) ([]provider.Snapshot, error) {
	v, err := p.Volume(vol)
	if err != nil {
		return nil, err
	}
	return v.Snapshots(), nil
}

func (p *Provider) Open(ctx context.Context, vol, id string) (provider.Image, error) {
	v, err := p.Volume(vol)
	if err != nil {
		return nil, err
	}
	return v.OpenSnapshot(id)
}

func (p *Provider) Revert(ctx context.Context, vol, id string) error {
	v, err := p.Volume(vol)
	if err != nil {
		return err
	}
	return v.Revert(id)
}

func (p *Provider) Changed(ctx context.Context, vol, since, upto string) (*provider.Bitmap, bool, error) {
	v, err := p.Volume(vol)
	if err != nil {
		return nil, false, err
	}
	return v.Changed(since, upto)
}
