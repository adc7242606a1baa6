// Package fsrvp is the shadow copy set state machine of MS-FSRVP
// (3.1.1.2): a set is started in a context, volumes are added, it is
// prepared, committed, exposed and marked recovered. Each state has a
// message sequence timer; a set that misses it, that its client aborts,
// or that a stop of the service leaves unfinished, is aborted: what it
// exposed is unexposed and what it made is deleted. Sets are kept in the
// service's catalog and reconciled with the snapshots at start.
//
// The package makes nothing itself: a Host commits sets (through the
// coordinator, the one path that makes snapshot sets), exposes and
// deletes. It knows nothing of gRPC; the api package serves it and maps
// its typed errors to status codes.
package fsrvp

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"umbra/catalog"
	"umbra/provider"
)

// Set states (MS-FSRVP 3.1.1.2).
const (
	Started   = "started"
	Added     = "added"
	Creating  = "creation_in_progress"
	Committed = "committed"
	Exposed   = "exposed"
	Recovered = "recovered"
	Aborted   = "aborted"
)

// DefaultTimeout is FSRVP's message sequence timer: a set that does not
// reach its next state in this time is aborted.
const DefaultTimeout = 180 * time.Second

// contexts maps each FSRVP context to whether its snapshots persist.
var contexts = map[string]bool{
	"backup": false, "file_share_backup": false, "nas_rollback": true, "app_rollback": true,
}

// Typed errors; messages say what to do next.
var (
	ErrNotFound   = errors.New("not found")
	ErrState      = errors.New("wrong state")
	ErrExists     = errors.New("already exists")
	ErrBadRequest = errors.New("bad request")
)

// Set is one shadow copy set, as kept in the catalog.
type Set struct {
	ID       string        `json:"id"`
	Context  string        `json:"context"`
	State    string        `json:"state"`
	Members  []Member      `json:"members"`
	Created  time.Time     `json:"created"`
	Deadline time.Time     `json:"deadline"`
	Timeout  time.Duration `json:"timeout"`
	Err      string        `json:"error,omitempty"`
}

// Member is one shadow copy of a set: a share path, the volume it is on
// and, once committed, the volume's snapshot.
type Member struct {
	ShadowID string `json:"shadow_id"`
	Path     string `json:"path"`
	Volume   string `json:"volume"`
	Provider string `json:"provider"`
	Snapshot string `json:"snapshot,omitempty"`
}

func (s *Set) clone() Set {
	c := *s
	c.Members = slices.Clone(s.Members)
	return c
}

// Host is what sets act on: the service's snapshots and exposures.
type Host interface {
	// Supports checks at prepare what commit will need of m's volume.
	Supports(ctx context.Context, m Member) error
	// CommitSet makes one snapshot of each volume, all in one snapshot
	// set whose snapshots are called id.
	CommitSet(ctx context.Context, id string, vols []string, writers, persistent bool) ([]provider.Snapshot, error)
	// Expose exposes member m of set st; mount: as a mounted directory.
	Expose(ctx context.Context, st Set, m Member, mount bool) error
	// Drop unexposes member m of set st and deletes its snapshot.
	Drop(ctx context.Context, st Set, m Member) error
	// Exists says whether snapshot snap of vol is still there.
	Exists(ctx context.Context, vol, snap string) bool
	// Changed is told each new state of a set (for subscribers).
	Changed(st Set)
}

// Sets runs the shadow copy sets of one service.
type Sets struct {
	cat     *catalog.Catalog
	host    Host
	log     *slog.Logger
	timeout time.Duration

	// mu guards the fields below and serializes every change, so the
	// catalog and the host's state move together. The host's calls run
	// under it (never the other way round).
	mu      sync.Mutex
	sets    map[string]*Set
	timers  map[string]*time.Timer
	context string
	closed  bool
}

// New returns the sets kept in cat, acting on host; timeout is the
// message sequence timer (0: DefaultTimeout). Call Restore next.
func New(cat *catalog.Catalog, host Host, timeout time.Duration, log *slog.Logger) *Sets {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	if log == nil {
		log = slog.Default()
	}
	return &Sets{cat: cat, host: host, log: log, timeout: timeout, sets: map[string]*Set{},
		timers: map[string]*time.Timer{}, context: "backup"}
}

// Restore reads the catalog's sets: those a stop left unfinished are
// aborted and cleaned, and recovered sets forget the members whose
// snapshots are gone (the set with them, if none is left).
func (m *Sets) Restore(ctx context.Context) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var sets []Set
	catalog.Each(m.cat, catalog.Sets, func(id string, st Set) { sets = append(sets, st) },
		func(id string, err error) {
			m.log.Warn("catalog: unreadable set dropped", "id", id, "err", err)
			m.cat.Delete(catalog.Sets, id)
		})
	for i := range sets {
		st := &sets[i]
		m.sets[st.ID] = st
		if st.State != Recovered {
			m.log.Warn("shadow copy set left unfinished by a stop: aborting", "set", st.ID, "state", st.State)
			m.abortLocked(ctx, st, "the service stopped in state "+st.State)
			continue
		}
		var keep []Member
		for _, mb := range st.Members {
			if m.host.Exists(ctx, mb.Volume, mb.Snapshot) {
				keep = append(keep, mb)
			}
		}
		st.Members = keep
		if len(keep) == 0 {
			delete(m.sets, st.ID)
			m.cat.Delete(catalog.Sets, st.ID)
		} else {
			m.cat.Put(catalog.Sets, st.ID, st)
		}
	}
}

// Close stops the timers; the sets stay in the catalog.
func (m *Sets) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	for _, t := range m.timers {
		t.Stop()
	}
}

func checkContext(c string) error {
	if _, ok := contexts[c]; !ok {
		return fmt.Errorf("%w: context %q: want backup, file_share_backup, nas_rollback or app_rollback", ErrBadRequest, c)
	}
	return nil
}

// SetContext sets the context of the sets started without one.
func (m *Sets) SetContext(c string) error {
	if err := checkContext(c); err != nil {
		return err
	}
	m.mu.Lock()
	m.context = c
	m.mu.Unlock()
	return nil
}

// arm (re)starts the set's timer for its current state; holds mu.
func (m *Sets) arm(st *Set) {
	if t := m.timers[st.ID]; t != nil {
		t.Stop()
		delete(m.timers, st.ID)
	}
	if st.State == Recovered || st.State == Aborted || m.closed {
		st.Deadline = time.Time{}
		return
	}
	st.Deadline = time.Now().Add(st.Timeout)
	state := st.State
	m.timers[st.ID] = time.AfterFunc(st.Timeout, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if cur := m.sets[st.ID]; cur == st && cur.State == state && !m.closed {
			m.log.Warn("shadow copy set timed out: aborting", "set", st.ID, "state", state, "timeout", st.Timeout)
			m.abortLocked(context.Background(), st, fmt.Sprintf("timed out after %v in state %s", st.Timeout, state))
		}
	})
}

// moveTo puts the set in state: its timer is re-armed for the new state,
// the catalog and the host learn of it, and an aborted set is forgotten.
// Holds mu.
func (m *Sets) moveTo(st *Set, state string) {
	st.State = state
	m.arm(st)
	m.save(st)
	if state == Aborted {
		delete(m.sets, st.ID)
		delete(m.timers, st.ID)
	}
}

// save writes the set to the catalog and tells the host; holds mu.
func (m *Sets) save(st *Set) error {
	m.host.Changed(st.clone())
	if st.State == Aborted {
		return m.cat.Delete(catalog.Sets, st.ID)
	}
	return m.cat.Put(catalog.Sets, st.ID, st)
}

// abortLocked drops what the set made (exposures, snapshots) and forgets
// it; holds mu.
func (m *Sets) abortLocked(ctx context.Context, st *Set, why string) {
	for _, mb := range st.Members {
		if mb.Snapshot == "" {
			continue
		}
		if err := m.host.Drop(ctx, st.clone(), mb); err != nil && !errors.Is(err, provider.ErrNotFound) {
			m.log.Error("abort: delete snapshot", "set", st.ID, "volume", mb.Volume, "snapshot", mb.Snapshot, "err", err)
		}
	}
	st.Err = why
	m.moveTo(st, Aborted)
}

// get finds a set in one of the states allowed; holds mu.
func (m *Sets) get(id string, allowed ...string) (*Set, error) {
	st := m.sets[id]
	if st == nil {
		return nil, fmt.Errorf("shadow copy set %q: %w (it may have timed out and been aborted; see `umbra set list`)", id, ErrNotFound)
	}
	if slices.Contains(allowed, st.State) {
		return st, nil
	}
	return nil, fmt.Errorf("%w: shadow copy set %s is %s: this call needs it %s", ErrState, id, st.State, strings.Join(allowed, " or "))
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Start starts a set in context c ("": the one SetContext chose) whose
// timer is timeout (0: the service's).
func (m *Sets) Start(c string, timeout time.Duration) (Set, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c == "" {
		c = m.context
	}
	if err := checkContext(c); err != nil {
		return Set{}, err
	}
	if timeout <= 0 {
		timeout = m.timeout
	}
	st := &Set{ID: "fss-" + randomHex(8), Context: c, State: Started, Created: time.Now().UTC(), Timeout: timeout}
	m.sets[st.ID] = st
	m.arm(st)
	if err := m.save(st); err != nil {
		delete(m.sets, st.ID)
		return Set{}, err
	}
	return st.clone(), nil
}

// Add adds share path, on volume vol of provider prov, to set id.
func (m *Sets) Add(id, path, vol, prov string) (Member, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.get(id, Started, Added)
	if err != nil {
		return Member{}, err
	}
	for _, mb := range st.Members {
		if mb.Volume == vol {
			return Member{}, fmt.Errorf("%w: shadow copy set %s already holds volume %s (by %s)", ErrExists, st.ID, vol, mb.Path)
		}
	}
	mb := Member{ShadowID: "sc-" + randomHex(8), Path: path, Volume: vol, Provider: prov}
	st.Members = append(st.Members, mb)
	m.moveTo(st, Added)
	return mb, nil
}

// Prepare checks now what commit will need, so that commit fails less.
func (m *Sets) Prepare(ctx context.Context, id string) (Set, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.get(id, Added)
	if err != nil {
		return Set{}, err
	}
	for _, mb := range st.Members {
		if err := m.host.Supports(ctx, mb); err != nil {
			return Set{}, fmt.Errorf("prepare %s: %w", mb.Volume, err)
		}
	}
	m.moveTo(st, Creating)
	return st.clone(), nil
}

// Commit makes the set's snapshots (with writers: application-consistent);
// a failure aborts the set.
func (m *Sets) Commit(ctx context.Context, id string, writers bool) (Set, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.get(id, Creating)
	if err != nil {
		return Set{}, err
	}
	var vols []string
	for _, mb := range st.Members {
		vols = append(vols, mb.Volume)
	}
	snaps, err := m.host.CommitSet(ctx, st.ID, vols, writers, contexts[st.Context])
	if err != nil {
		m.abortLocked(ctx, st, "commit failed: "+err.Error())
		return Set{}, fmt.Errorf("commit shadow copy set %s (aborted): %w", st.ID, err)
	}
	for i := range st.Members {
		for _, sn := range snaps {
			if sn.Volume == st.Members[i].Volume {
				st.Members[i].Snapshot = sn.ID
			}
		}
	}
	m.moveTo(st, Committed)
	return st.clone(), nil
}

// Expose exposes every shadow copy of the set; a failure aborts it.
func (m *Sets) Expose(ctx context.Context, id string, mount bool) (Set, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.get(id, Committed)
	if err != nil {
		return Set{}, err
	}
	for _, mb := range st.Members {
		if err := m.host.Expose(ctx, st.clone(), mb, mount); err != nil {
			m.abortLocked(ctx, st, "expose failed: "+err.Error())
			return Set{}, fmt.Errorf("expose shadow copy set %s (aborted): %w", st.ID, err)
		}
	}
	m.moveTo(st, Exposed)
	return st.clone(), nil
}

// RecoveryComplete marks an exposed set recovered: it stays until its
// shadow copies are deleted.
func (m *Sets) RecoveryComplete(id string) (Set, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.get(id, Exposed)
	if err != nil {
		return Set{}, err
	}
	m.moveTo(st, Recovered)
	return st.clone(), nil
}

// Abort aborts a set that is not recovered yet.
func (m *Sets) Abort(ctx context.Context, id string) (Set, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.get(id, Started, Added, Creating, Committed, Exposed)
	if err != nil {
		return Set{}, err
	}
	m.abortLocked(ctx, st, "aborted by the client")
	return st.clone(), nil
}

// List returns the sets, oldest first.
func (m *Sets) List() []Set {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Set, 0, len(m.sets))
	for _, st := range m.sets {
		out = append(out, st.clone())
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Created.Before(out[j].Created) || out[i].Created.Equal(out[j].Created) && out[i].ID < out[j].ID
	})
	return out
}

// ShadowCopied lists the sets holding a shadow copy of vol.
func (m *Sets) ShadowCopied(vol string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for _, st := range m.sets {
		for _, mb := range st.Members {
			if mb.Volume == vol && mb.Snapshot != "" {
				out = append(out, st.ID)
				break
			}
		}
	}
	sort.Strings(out)
	return out
}

// memberLocked finds shadow copy shadowID of set id; holds mu.
func (m *Sets) memberLocked(id, shadowID string) (*Set, int, error) {
	st := m.sets[id]
	if st == nil {
		return nil, 0, fmt.Errorf("shadow copy set %q: %w", id, ErrNotFound)
	}
	for i, mb := range st.Members {
		if mb.ShadowID == shadowID {
			return st, i, nil
		}
	}
	return nil, 0, fmt.Errorf("shadow copy %q: %w in set %s", shadowID, ErrNotFound, st.ID)
}

// Member returns shadow copy shadowID of set id, with its set.
func (m *Sets) Member(id, shadowID string) (Set, Member, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, i, err := m.memberLocked(id, shadowID)
	if err != nil {
		return Set{}, Member{}, err
	}
	return st.clone(), st.Members[i], nil
}

// DeleteMember unexposes one shadow copy and deletes it; a set with no
// shadow copy left is gone.
func (m *Sets) DeleteMember(ctx context.Context, id, shadowID string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, i, err := m.memberLocked(id, shadowID)
	if err != nil {
		return err
	}
	if st.State != Recovered && st.State != Exposed && st.State != Committed {
		return fmt.Errorf("%w: shadow copy set %s is %s: abort it instead", ErrState, st.ID, st.State)
	}
	if err := m.host.Drop(ctx, st.clone(), st.Members[i]); err != nil && !errors.Is(err, provider.ErrNotFound) {
		return err
	}
	st.Members = append(st.Members[:i], st.Members[i+1:]...)
	if len(st.Members) == 0 {
		m.moveTo(st, Aborted) // nothing left: forget it
	} else {
		m.save(st)
	}
	return nil
}
