package fsrvp

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"umbra/catalog"
	"umbra/coordinator"
	"umbra/cow"
	"umbra/provider"
	"umbra/writer"
)

// testHost commits through a real coordinator over real COW volumes and
// keeps the catalog in a real bbolt file. Exposing is only recorded:
// mounting a snapshot needs FUSE and loop devices, which the service's
// end-to-end tests (cmd/umbra TestFSRVPSequence) exercise.
type testHost struct {
	p     *cow.Provider
	coord *coordinator.Coordinator

	mu      sync.Mutex // guards the fields below
	exposed map[string]bool
	states  []string
	changed chan Set
}

func (h *testHost) Supports(ctx context.Context, m Member) error { return h.p.Supports(ctx, m.Volume) }

func (h *testHost) CommitSet(ctx context.Context, id string, vols []string, writers, persistent bool) ([]provider.Snapshot, error) {
	set, err := h.coord.CreateSet(ctx, coordinator.Request{Volumes: vols, Writers: writers, Persistent: persistent, ID: id})
	if err != nil {
		return nil, err
	}
	set.Done()
	return set.Snapshots, nil
}

func (h *testHost) Expose(ctx context.Context, st Set, m Member, mount bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.exposed[m.Volume+"@"+m.Snapshot] = true
	return nil
}

func (h *testHost) Drop(ctx context.Context, st Set, m Member) error {
	h.mu.Lock()
	delete(h.exposed, m.Volume+"@"+m.Snapshot)
	h.mu.Unlock()
	return h.p.Delete(ctx, m.Volume, m.Snapshot)
}

func (h *testHost) Exists(ctx context.Context, vol, snap string) bool {
	v, err := h.p.Volume(vol)
	if err != nil {
		return false
	}
	return slices.ContainsFunc(v.Snapshots(), func(s provider.Snapshot) bool { return s.ID == snap })
}

func (h *testHost) Changed(st Set) {
	h.mu.Lock()
	h.states = append(h.states, st.State)
	h.mu.Unlock()
	if h.changed != nil {
		h.changed <- st
	}
}

func (h *testHost) snapshots(t *testing.T, vol string) []provider.Snapshot {
	t.Helper()
	v, err := h.p.Volume(vol)
	if err != nil {
		t.Fatal(err)
	}
	return v.Snapshots()
}

// newHost opens COW volumes a and b (and c, with no shadow storage) and a
// catalog in dir.
func newHost(t *testing.T, dir string) (*testHost, *catalog.Catalog) {
	t.Helper()
	p := cow.NewProvider()
	for _, n := range []string{"a", "b", "c"} {
		origin := filepath.Join(dir, n+".img")
		if _, err := os.Stat(origin); err != nil {
			os.WriteFile(origin, nil, 0o600)
			os.Truncate(origin, 1<<20)
		}
		opts := cow.Options{StorageDir: filepath.Join(dir, "shadow-"+n)}
		if n == "c" {
			opts.StorageDir = ""
		}
		v, err := cow.Open(n, origin, opts)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { v.Close() })
		p.Add(v)
	}
	reg := &provider.Registry{}
	reg.Register(p)
	cat, err := catalog.Open(filepath.Join(dir, "catalog.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cat.Close() })
	return &testHost{p: p, coord: coordinator.New(reg, writer.NewRegistry(), nil, nil), exposed: map[string]bool{}}, cat
}

// TestSequence: a set goes started → added → creation_in_progress →
// committed → exposed → recovered; each step is refused in another state;
// deleting its shadow copies one by one deletes their snapshots and then
// the set.
func TestSequence(t *testing.T) {
	h, cat := newHost(t, t.TempDir())
	m := New(cat, h, time.Hour, nil)
	defer m.Close()
	ctx := context.Background()
	if err := m.SetContext("nope"); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("unknown context: %v", err)
	}
	if err := m.SetContext("nas_rollback"); err != nil {
		t.Fatal(err)
	}
	st, err := m.Start("", 0)
	if err != nil || st.State != Started || st.Context != "nas_rollback" || st.Deadline.IsZero() {
		t.Fatalf("start: %+v %v", st, err)
	}
	if _, err := m.Commit(ctx, st.ID, false); !errors.Is(err, ErrState) {
		t.Fatalf("commit of a started set: %v", err)
	}
	ma, err := m.Add(st.ID, "/share/a", "a", cow.ProviderName)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Add(st.ID, "/share/a2", "a", cow.ProviderName); !errors.Is(err, ErrExists) {
		t.Fatalf("a volume twice: %v", err)
	}
	mb, err := m.Add(st.ID, "/share/b", "b", cow.ProviderName)
	if err != nil {
		t.Fatal(err)
	}
	if st, err = m.Prepare(ctx, st.ID); err != nil || st.State != Creating {
		t.Fatalf("prepare: %+v %v", st, err)
	}
	if st, err = m.Commit(ctx, st.ID, false); err != nil || st.State != Committed {
		t.Fatalf("commit: %+v %v", st, err)
	}
	for _, vol := range []string{"a", "b"} {
		snaps := h.snapshots(t, vol)
		if len(snaps) != 1 || snaps[0].ID != st.ID || !snaps[0].Persistent {
			t.Fatalf("volume %s after commit in nas_rollback: %+v", vol, snaps)
		}
	}
	if st, err = m.Expose(ctx, st.ID, true); err != nil || st.State != Exposed || len(h.exposed) != 2 {
		t.Fatalf("expose: %+v %v, exposed %v", st, err, h.exposed)
	}
	if got := m.ShadowCopied("a"); len(got) != 1 || got[0] != st.ID {
		t.Fatalf("shadow copied a: %v", got)
	}
	if st, err = m.RecoveryComplete(st.ID); err != nil || st.State != Recovered || !st.Deadline.IsZero() {
		t.Fatalf("recovery complete: %+v %v", st, err)
	}
	if _, err := m.Abort(ctx, st.ID); !errors.Is(err, ErrState) {
		t.Fatalf("abort of a recovered set: %v", err)
	}
	if _, got, err := m.Member(st.ID, mb.ShadowID); err != nil || got.Snapshot != st.ID || got.Path != "/share/b" {
		t.Fatalf("member: %+v %v", got, err)
	}
	if err := m.DeleteMember(ctx, st.ID, ma.ShadowID); err != nil {
		t.Fatal(err)
	}
	if len(h.snapshots(t, "a")) != 0 || len(h.snapshots(t, "b")) != 1 || len(m.List()) != 1 {
		t.Fatal("deleting one shadow copy did not delete exactly its snapshot")
	}
	if err := m.DeleteMember(ctx, st.ID, mb.ShadowID); err != nil {
		t.Fatal(err)
	}
	if len(m.List()) != 0 || len(h.exposed) != 0 || len(h.snapshots(t, "b")) != 0 {
		t.Fatalf("the set with no shadow copy left: sets %v, exposed %v", m.List(), h.exposed)
	}
	if _, err := m.RecoveryComplete(st.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("step of a set that is gone: %v", err)
	}
	want := []string{Started, Added, Added, Creating, Committed, Exposed, Recovered, Recovered, Aborted}
	if !slices.Equal(h.states, want) {
		t.Fatalf("states told: %v, want %v", h.states, want)
	}
}

// TestAbortsDropWhatWasMade: a commit that fails aborts the set and
// leaves nothing; a client's abort after commit deletes the snapshots
// and exposures.
func TestAbortsDropWhatWasMade(t *testing.T) {
	h, cat := newHost(t, t.TempDir())
	m := New(cat, h, time.Hour, nil)
	defer m.Close()
	ctx := context.Background()

	st, _ := m.Start("backup", 0)
	m.Add(st.ID, "a", "a", cow.ProviderName)
	m.Add(st.ID, "c", "c", cow.ProviderName) // no shadow storage: commit fails
	m.Prepare(ctx, st.ID)
	if _, err := m.Commit(ctx, st.ID, false); err == nil {
		t.Fatal("commit over a volume without shadow storage succeeded")
	}
	if len(m.List()) != 0 || len(h.snapshots(t, "a")) != 0 {
		t.Fatal("a failed commit left its set or a snapshot")
	}

	st, _ = m.Start("backup", 0)
	m.Add(st.ID, "a", "a", cow.ProviderName)
	m.Prepare(ctx, st.ID)
	m.Commit(ctx, st.ID, false)
	m.Expose(ctx, st.ID, false)
	if st, err := m.Abort(ctx, st.ID); err != nil || st.State != Aborted || st.Err != "aborted by the client" {
		t.Fatalf("abort: %+v %v", st, err)
	}
	if len(m.List()) != 0 || len(h.snapshots(t, "a")) != 0 || len(h.exposed) != 0 {
		t.Fatal("an aborted set left something behind")
	}
	n := 0
	catalog.Each(cat, catalog.Sets, func(string, Set) { n++ }, nil)
	if n != 0 {
		t.Fatalf("%d sets left in the catalog", n)
	}
}

// TestTimerAborts: a set that does not reach its next state before its
// timer is aborted and forgotten.
func TestTimerAborts(t *testing.T) {
	h, cat := newHost(t, t.TempDir())
	h.changed = make(chan Set, 16)
	m := New(cat, h, time.Hour, nil)
	defer m.Close()
	st, err := m.Start("backup", time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	for ev := range h.changed { // waits for the timer, however late it fires
		if ev.ID == st.ID && ev.State == Aborted {
			if ev.Err == "" {
				t.Fatal("a timed-out set says nothing of why")
			}
			break
		}
	}
	if len(m.List()) != 0 {
		t.Fatal("the timed-out set is still listed")
	}
}

// TestRestore: at start, a set a stop left unfinished is aborted and its
// snapshot deleted; a recovered set forgets the shadow copies whose
// snapshots are gone, and goes with the last.
func TestRestore(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	h, cat := newHost(t, dir)
	m := New(cat, h, time.Hour, nil)
	unfinished, _ := m.Start("backup", 0)
	m.Add(unfinished.ID, "a", "a", cow.ProviderName)
	m.Prepare(ctx, unfinished.ID)
	m.Commit(ctx, unfinished.ID, false)
	done, _ := m.Start("backup", 0)
	ma, _ := m.Add(done.ID, "a", "a", cow.ProviderName)
	m.Add(done.ID, "b", "b", cow.ProviderName)
	m.Prepare(ctx, done.ID)
	m.Commit(ctx, done.ID, false)
	m.Expose(ctx, done.ID, false)
	m.RecoveryComplete(done.ID)
	m.Close()
	// b's snapshot goes while the service is stopped.
	if err := h.p.Delete(ctx, "b", done.ID); err != nil {
		t.Fatal(err)
	}

	m2 := New(cat, h, time.Hour, nil)
	defer m2.Close()
	m2.Restore(ctx)
	sets := m2.List()
	if len(sets) != 1 || sets[0].ID != done.ID || len(sets[0].Members) != 1 || sets[0].Members[0].ShadowID != ma.ShadowID {
		t.Fatalf("sets after restore: %+v", sets)
	}
	for _, sn := range h.snapshots(t, "a") {
		if sn.ID == unfinished.ID {
			t.Fatal("the unfinished set's snapshot survived the restart")
		}
	}
}
