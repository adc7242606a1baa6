// Package coordinator runs VSS's snapshot-set sequence across providers
// and writers: identify the writers whose components are in the set →
// prepare for backup → prepare for snapshot → freeze (applications in
// parallel, then filesystems; bounded) → flush-and-hold every volume
// (bounded) → commit every volume → release → thaw → post-snapshot. Any
// failure, timeout or cancelled requester aborts: frozen writers thaw and
// get abort, holds are released, snapshots made so far are deleted, and
// the failing writer's state records the phase and the reason. No volume
// stays held and no filesystem stays frozen.
package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"umbra/provider"
	"umbra/writer"
)

// Typed errors.
var (
	ErrFreezeTimeout = errors.New("writers did not freeze in time")
	ErrAborted       = errors.New("snapshot set aborted")
	ErrBadRequest    = errors.New("bad snapshot set request")
)

// Defaults bound the phases as VSS does.
const (
	DefaultFreezeTimeout = 60 * time.Second
	DefaultHoldTimeout   = 10 * time.Second
)

// Request asks for a snapshot set.
type Request struct {
	Volumes       []string // volume names; each resolved to a provider
	Writers       bool     // involve writers (application-consistent)
	ForBackup     bool     // auto-release: snapshots end with BackupComplete
	Persistent    bool
	ID            string // snapshot id in every volume ("" chosen)
	FreezeTimeout time.Duration
	HoldTimeout   time.Duration
}

// Timings of one set.
type Timings struct {
	FreezeToThaw time.Duration `json:"freeze_to_thaw"`
	Hold         time.Duration `json:"hold"`
}

// Set is a committed snapshot set.
type Set struct {
	ID        string              `json:"id"`
	Snapshots []provider.Snapshot `json:"snapshots"`
	Writers   []string            `json:"writers"`
	Timings   Timings             `json:"timings"`
	ForBackup bool                `json:"for_backup"`

	c       *Coordinator
	info    writer.Set
	writers []writer.Writer
	members []member
	done    bool
}

type member struct {
	p   provider.Provider
	vol string
	txn provider.Txn
}

// Coordinator runs snapshot sets.
type Coordinator struct {
	providers *provider.Registry
	writers   *writer.Registry
	devices   func(vol string) []string
	log       *slog.Logger

	mu sync.Mutex // one set at a time, as VSS
}

// New returns a coordinator. devices maps a volume to the files or block
// devices that carry it to the kernel (for finding its mounts).
func New(providers *provider.Registry, writers *writer.Registry, devices func(vol string) []string, log *slog.Logger) *Coordinator {
	if log == nil {
		log = slog.Default()
	}
	if devices == nil {
		devices = func(string) []string { return nil }
	}
	return &Coordinator{providers: providers, writers: writers, devices: devices, log: log}
}

// phase runs fn on every writer of one level in parallel, bounded by ctx,
// and records each outcome.
func (c *Coordinator) phase(ctx context.Context, ws []writer.Writer, set writer.Set, name string, fn func(context.Context, writer.Writer) error) error {
	var wg sync.WaitGroup
	errs := make([]error, len(ws))
	for i, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			err := fn(ctx, w)
			if err == nil && ctx.Err() != nil {
				err = ctx.Err()
			}
			if err != nil {
				err = fmt.Errorf("writer %s: %s: %w", w.Name(), name, err)
			}
			errs[i] = err
			c.writers.Record(w.Name(), set.ID, name, time.Since(start), err, "waiting for completion")
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// CreateSet runs the whole sequence and returns the committed set.
func (c *Coordinator) CreateSet(ctx context.Context, req Request) (*Set, error) {
	if len(req.Volumes) == 0 {
		return nil, fmt.Errorf("%w: name at least one volume", ErrBadRequest)
	}
	if req.ID != "" {
		if err := provider.ValidateID(req.ID); err != nil {
			return nil, fmt.Errorf("snapshot set: snapshot id: %w", err)
		}
	}
	if req.FreezeTimeout <= 0 {
		req.FreezeTimeout = DefaultFreezeTimeout
	}
	if req.HoldTimeout <= 0 {
		req.HoldTimeout = DefaultHoldTimeout
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	set := &Set{c: c, ID: fmt.Sprintf("set-%d", time.Now().UnixNano()), ForBackup: req.ForBackup}
	seen := map[string]bool{}
	for _, vol := range req.Volumes {
		if seen[vol] {
			return nil, fmt.Errorf("%w: volume %s named twice", ErrBadRequest, vol)
		}
		seen[vol] = true
		p, err := c.providers.For(ctx, vol)
		if err != nil {
			return nil, err
		}
		set.members = append(set.members, member{p: p, vol: vol})
		wv := writer.Volume{Name: vol}
		if p.Capabilities().Kind == "system" {
			wv.Paths = []string{vol} // a system provider's volume is its path
		} else {
			wv.Devices = c.devices(vol)
		}
		set.info.Volumes = append(set.info.Volumes, wv)
	}
	set.info.ID, set.info.ForBackup = set.ID, req.ForBackup
	if req.Writers {
		vols, err := writer.ResolveMounts(set.info.Volumes)
		if err != nil {
			return nil, err
		}
		set.info.Volumes = vols
		for _, w := range c.writers.Writers() {
			if !w.Involved(set.info) {
				continue
			}
			if idle, ok := w.(writer.Idler); ok {
				if why := idle.Idle(set.info); why != "" {
					c.writers.Record(w.Name(), set.ID, "identify", 0, nil, writer.StateNotParticipating)
					c.log.Info("writer not participating: nothing to quiesce", "writer", w.Name(), "set", set.ID, "why", why)
					continue
				}
			}
			set.writers = append(set.writers, w)
			set.Writers = append(set.Writers, w.Name())
		}
		if err := covered(set.info, set.writers); err != nil {
			return nil, err
		}
	}
	if err := c.run(ctx, set, req); err != nil {
		c.abort(set, err)
		return nil, fmt.Errorf("%w: %w", ErrAborted, err)
	}
	c.log.Info("snapshot set committed", "set", set.ID, "volumes", req.Volumes, "writers", set.Writers,
		"freeze_to_thaw", set.Timings.FreezeToThaw, "hold", set.Timings.Hold)
	return set, nil
}

func (c *Coordinator) byLevel(ws []writer.Writer, l writer.Level) []writer.Writer {
	var out []writer.Writer
	for _, w := range ws {
		if w.Level() == l {
			out = append(out, w)
		}
	}
	return out
}

func (c *Coordinator) run(ctx context.Context, set *Set, req Request) error {
	info := set.info
	if req.ForBackup {
		if err := c.phase(ctx, set.writers, info, "prepare-for-backup", func(ctx context.Context, w writer.Writer) error { return w.PrepareForBackup(ctx, info) }); err != nil {
			return err
		}
	}
	if err := c.phase(ctx, set.writers, info, "prepare-for-snapshot", func(ctx context.Context, w writer.Writer) error { return w.PrepareForSnapshot(ctx, info) }); err != nil {
		return err
	}
	for i, m := range set.members {
		txn, err := m.p.Prepare(ctx, m.vol, provider.SnapshotOptions{ID: req.ID, Persistent: req.Persistent, SetID: set.ID})
		if err != nil {
			return fmt.Errorf("prepare %s: %w", m.vol, err)
		}
		set.members[i].txn = txn
	}
	freezeStart := time.Now()
	fctx, cancel := context.WithTimeout(ctx, req.FreezeTimeout)
	defer cancel()
	for _, level := range []writer.Level{writer.LevelApplication, writer.LevelFilesystem} {
		ws := c.byLevel(set.writers, level)
		if err := c.phase(fctx, ws, info, "freeze", func(ctx context.Context, w writer.Writer) error { return w.Freeze(ctx, info) }); err != nil {
			if fctx.Err() != nil && ctx.Err() == nil {
				return fmt.Errorf("%w (%v): %w", ErrFreezeTimeout, req.FreezeTimeout, err)
			}
			return err
		}
	}
	// The hold window starts when the first member blocks writes: for a
	// HoldTimer after the flush its PreCommit does first, otherwise when
	// PreCommit is called.
	holdStart := time.Time{}
	for _, m := range set.members {
		start := time.Now()
		if err := m.txn.PreCommit(ctx, req.HoldTimeout); err != nil {
			return fmt.Errorf("hold %s: %w", m.vol, err)
		}
		if ht, ok := m.txn.(provider.HoldTimer); ok && !ht.HeldSince().IsZero() {
			start = ht.HeldSince()
		}
		if holdStart.IsZero() || start.Before(holdStart) {
			holdStart = start
		}
	}
	for _, m := range set.members {
		snap, err := m.txn.Commit(ctx)
		if err != nil {
			return fmt.Errorf("commit %s: %w", m.vol, err)
		}
		set.Snapshots = append(set.Snapshots, snap)
	}
	// It ends when the last member lets writes go: for a HoldTimer when
	// its release did, otherwise when PostCommit returned.
	holdEnd := time.Time{}
	for _, m := range set.members {
		if err := m.txn.PostCommit(ctx); err != nil {
			return fmt.Errorf("release %s: %w", m.vol, err)
		}
		end := time.Now()
		if ht, ok := m.txn.(provider.HoldTimer); ok && !ht.HeldUntil().IsZero() {
			end = ht.HeldUntil()
		}
		if end.After(holdEnd) {
			holdEnd = end
		}
	}
	if !holdStart.IsZero() {
		set.Timings.Hold = holdEnd.Sub(holdStart)
	}
	for _, level := range []writer.Level{writer.LevelFilesystem, writer.LevelApplication} {
		ws := c.byLevel(set.writers, level)
		if err := c.phase(context.Background(), ws, info, "thaw", func(ctx context.Context, w writer.Writer) error {
			tctx, cancel := context.WithTimeout(ctx, req.FreezeTimeout)
			defer cancel()
			return w.Thaw(tctx, info)
		}); err != nil {
			return err
		}
	}
	if len(set.writers) > 0 { // nothing froze otherwise
		set.Timings.FreezeToThaw = time.Since(freezeStart)
	}
	return c.phase(ctx, set.writers, info, "post-snapshot", func(ctx context.Context, w writer.Writer) error { return w.PostSnapshot(ctx, info) })
}

// abort releases every hold, thaws and aborts every writer and deletes
// every snapshot of the set, whatever phase failed. Holds go first: while
// one stands every write to its volume waits, the thaw of a filesystem
// on it among them (FITHAW writes the superblock), so thawing first
// would keep applications stalled until the hold's own limit.
func (c *Coordinator) abort(set *Set, cause error) {
	ctx, cancel := context.WithTimeout(context.Background(), DefaultHoldTimeout)
	defer cancel()
	c.release(ctx, set)
	for _, level := range []writer.Level{writer.LevelFilesystem, writer.LevelApplication} {
		for _, w := range c.byLevel(set.writers, level) {
			if err := w.Thaw(ctx, set.info); err != nil {
				c.log.Error("thaw during abort", "writer", w.Name(), "err", err)
			}
			w.Abort(ctx, set.info)
		}
	}
	for _, m := range set.members {
		if m.txn != nil {
			if err := m.txn.Abort(ctx); err != nil {
				c.log.Error("provider abort", "volume", m.vol, "err", err)
			}
		}
	}
	for _, w := range set.writers {
		st := c.writers.States()
		for _, s := range st {
			if s.Name == w.Name() && s.State != "failed" {
				c.writers.Record(w.Name(), set.ID, "abort", 0, nil, "stable")
			}
		}
	}
	c.log.Warn("snapshot set aborted", "set", set.ID, "err", cause)
}

// release lets the writes of every member go (PostCommit releases a
// hold whether or not the member committed; a hold that already ended at
// its limit is no news during an abort).
func (c *Coordinator) release(ctx context.Context, set *Set) {
	for _, m := range set.members {
		if m.txn == nil {
			continue
		}
		if err := m.txn.PostCommit(ctx); err != nil && !errors.Is(err, provider.ErrHoldTimeout) {
			c.log.Error("release during abort", "volume", m.vol, "err", err)
		}
	}
}

// BackupComplete tells the writers the backup ended (ok or not); a set
// made for a backup is then released: its snapshots are deleted.
func (s *Set) BackupComplete(ctx context.Context, ok bool) error {
	if s.done {
		return nil
	}
	s.done = true
	var errs []error
	if err := s.c.phase(ctx, s.writers, s.info, "backup-complete", func(ctx context.Context, w writer.Writer) error { return w.BackupComplete(ctx, s.info, ok) }); err != nil {
		errs = append(errs, err)
	}
	for _, w := range s.writers {
		s.c.writers.Record(w.Name(), s.ID, "done", 0, nil, "stable")
	}
	if s.ForBackup {
		for i, m := range s.members {
			if i < len(s.Snapshots) {
				if err := s.c.releaseSnapshot(ctx, m.p, m.vol, s.Snapshots[i].ID); err != nil && !errors.Is(err, provider.ErrNotFound) {
					errs = append(errs, err)
				}
			}
		}
	}
	return errors.Join(errs...)
}

// releaseSnapshot deletes an auto-release snapshot once its backup is
// complete. It is the requester's, and a reader the requester just let
// go of (a loop device it detached, an NBD client it closed) leaves a
// moment later: the snapshot goes even while in use, and whom that cut
// off is logged.
func (c *Coordinator) releaseSnapshot(ctx context.Context, p provider.Provider, vol, id string) error {
	fd, ok := p.(provider.ForceDeleter)
	if !ok {
		return p.Delete(ctx, vol, id)
	}
	cut, err := fd.ForceDelete(ctx, vol, id)
	if len(cut) > 0 {
		c.log.Info("auto-release snapshot deleted at backup complete while still open", "snapshot", vol+"@"+id, "cut_off", cut)
	}
	return err
}

// Done marks a set not made for a backup as finished for its writers.
func (s *Set) Done() {
	for _, w := range s.writers {
		s.c.writers.Record(w.Name(), s.ID, "done", 0, nil, "stable")
	}
}

// covered refuses a set asked for with writers in which a volume holds a
// mounted filesystem that no filesystem-level writer freezes: its
// snapshot would be only crash-consistent while the set said it was
// application-consistent.
func covered(info writer.Set, ws []writer.Writer) error {
	for _, w := range ws {
		if w.Level() == writer.LevelFilesystem {
			return nil
		}
	}
	for _, v := range info.Volumes {
		if len(v.Mounts) > 0 {
			return fmt.Errorf("snapshot set with writers: volume %s holds mounted filesystems %s that no writer freezes (the fsfreeze writer is not registered): "+
				"the snapshot would be only crash-consistent; take it without --writers to accept that", v.Name, strings.Join(v.Mounts, ", "))
		}
	}
	return nil
}
