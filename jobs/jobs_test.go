package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"umbra/api"
	"umbra/api/umbrav1"
	"umbra/backup"
	"umbra/catalog"
	"umbra/cow"
	"umbra/internal/testutil"
	"umbra/jobs/sched"
	"umbra/notify"
	"umbra/provider"
)

func boolp(b bool) *bool { return &b }

func TestCheckNamesJobAndField(t *testing.T) {
	snap := func(mod func(*Def)) []Def {
		d := Def{Name: "tl", Kind: "snapshot", Schedule: "hourly", Volumes: []string{"a"}, Keep: Keep{Hourly: 24}}
		mod(&d)
		return []Def{d}
	}
	bk := func(mod func(*Def)) []Def {
		d := Def{Name: "nightly", Kind: "backup", Schedule: "*-*-* 02:00", Volumes: []string{"a"}, Repo: "/srv/repo"}
		mod(&d)
		return []Def{d}
	}
	for _, c := range []struct {
		defs      []Def
		job, want string
	}{
		{snap(func(d *Def) {}), "", ""},
		{snap(func(d *Def) { d.Name = "" }), "#1", "name: missing"},
		{snap(func(d *Def) { d.Name = "a b" }), `"a b"`, "name: want"},
		{append(snap(func(d *Def) {}), snap(func(d *Def) {})...), "tl", "name: defined twice"},
		{snap(func(d *Def) { d.Kind = "sink" }), "tl", `kind: "sink": want one of backup, snapshot, sync, `},
		{snap(func(d *Def) { d.Schedule = "" }), "tl", "schedule: missing"},
		{snap(func(d *Def) { d.Schedule = "Mon..Fry 07:00" }), "tl", "schedule:"},
		{snap(func(d *Def) { d.RandomDelay = "soon" }), "tl", "random_delay:"},
		{snap(func(d *Def) { d.History = -1 }), "tl", "history:"},
		{snap(func(d *Def) { d.Volumes = nil }), "tl", "volumes: missing"},
		{snap(func(d *Def) { d.Volumes = []string{"a", "a"} }), "tl", "volumes:"},
		{snap(func(d *Def) { d.Keep = Keep{} }), "tl", "keep:"},
		{snap(func(d *Def) { d.Keep.Last = 3 }), "tl", "keep.last:"},
		{snap(func(d *Def) { d.Keep.MinAge = "an hour" }), "tl", "keep.min_age:"},
		{snap(func(d *Def) { d.Repo = "/srv/repo" }), "tl", "repo: a snapshot job has no repo"},
		{bk(func(d *Def) {}), "", ""},
		{bk(func(d *Def) { d.Repo = "" }), "nightly", "repo: missing"},
		{bk(func(d *Def) { d.Repo = "relative/repo" }), "nightly", "repo:"},
		{bk(func(d *Def) { d.Keep.Yearly = 2 }), "nightly", "keep.yearly:"},
		{bk(func(d *Def) { d.Persistent = boolp(true) }), "nightly", "persistent:"},
		{[]Def{{Name: "v", Kind: "verify", Schedule: "weekly", Repo: "/srv/repo", ReverifyDays: 30}}, "", ""},
		{[]Def{{Name: "v", Kind: "verify", Schedule: "weekly", Repo: "/srv/repo", Volumes: []string{"a"}}}, "v", "volumes: a verify job has no volumes"},
		{[]Def{{Name: "v", Kind: "verify", Schedule: "weekly", Repo: "/srv/repo", ReverifyDays: -1}}, "v", "reverify_days:"},
		{[]Def{{Name: "v", Kind: "verify", Schedule: "weekly", Repo: "/srv/repo", Sample: 1.5}}, "v", "sample:"},
		{[]Def{{Name: "v", Kind: "verify", Schedule: "weekly", Repo: "/srv/repo", Sample: 0.1, ReverifyDays: 3}}, "v", "reverify_days:"},
		{bk(func(d *Def) { d.Sample = 0.1 }), "nightly", "sample: a backup job has no sample"},
		{[]Def{{Name: "s", Kind: "sync", Schedule: "daily", Repo: "/srv/repo", To: "s3://h/b/offsite"}}, "", ""},
		{[]Def{{Name: "s", Kind: "sync", Schedule: "daily", Repo: "/srv/repo", To: "/srv/b", Volumes: []string{"a"}}}, "", ""},
		{[]Def{{Name: "s", Kind: "sync", Schedule: "daily", Repo: "/srv/repo"}}, "s", "to: missing"},
		{[]Def{{Name: "s", Kind: "sync", Schedule: "daily", Repo: "/srv/repo", To: "offsite"}}, "s", "to:"},
		{[]Def{{Name: "s", Kind: "sync", Schedule: "daily", Repo: "/srv/repo", To: "/srv/repo"}}, "s", "to:"},
		{[]Def{{Name: "s", Kind: "sync", Schedule: "daily", Repo: "/srv/repo", To: "/srv/b", Keep: Keep{Last: 1}}}, "s", "keep: a sync job has no keep"},
		{[]Def{{Name: "s", Kind: "sync", Schedule: "daily", To: "/srv/b"}}, "s", "repo: missing"},
		{bk(func(d *Def) { d.To = "/srv/b" }), "nightly", "to: a backup job has no to"},
	} {
		err := Check(c.defs)
		if c.want == "" {
			if err != nil {
				t.Errorf("%+v: %v", c.defs, err)
			}
			continue
		}
		var de *DefError
		if !errors.As(err, &de) || de.Job != c.job || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: got %v, want job %s and %q", c.defs, err, c.job, c.want)
		}
	}
}

// testClock is a clock the test moves; nothing waits on it.
type testClock struct {
	mu  sync.Mutex // guards now
	now time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) After(time.Duration) <-chan time.Time { return nil }

func (c *testClock) set(t time.Time) {
	c.mu.Lock()
	c.now = t
	c.mu.Unlock()
}

// metricsRec records JobRun calls.
type metricsRec struct {
	mu   sync.Mutex // guards runs
	runs []string
}

func (m *metricsRec) JobRun(job, result string, _ time.Time) {
	m.mu.Lock()
	m.runs = append(m.runs, job+" "+result)
	m.mu.Unlock()
}

func (m *metricsRec) JobLastSuccess(job string, _ time.Time) {
	m.mu.Lock()
	m.runs = append(m.runs, job+" last success")
	m.mu.Unlock()
}

// world is a real API server over two real COW volumes, with a catalog.
type world struct {
	t      *testing.T
	dir    string
	srv    *api.Server
	vols   map[string]*cow.Volume
	cat    *catalog.Catalog
	clock  *testClock
	met    *metricsRec
	mu     sync.Mutex // guards events
	events []string
}

func newWorld(t *testing.T) *world {
	t.Helper()
	dir := t.TempDir()
	w := &world{t: t, dir: dir, vols: map[string]*cow.Volume{}, clock: &testClock{}, met: &metricsRec{}}
	p := cow.NewProvider()
	for _, name := range []string{"a", "b"} {
		origin := filepath.Join(dir, name+".img")
		if err := os.WriteFile(origin, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		os.Truncate(origin, 1<<20)
		v, err := cow.Open(name, origin, cow.Options{StorageDir: filepath.Join(dir, "shadow")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { v.Close() })
		p.Add(v)
		w.vols[name] = v
	}
	reg := &provider.Registry{}
	reg.Register(p)
	w.srv = api.NewServer(p, reg, nil, nil, nil)
	cat, err := catalog.Open(filepath.Join(dir, "catalog.db"))
	if err != nil {
		t.Fatal(err)
	}
	w.cat = cat
	w.srv.EnableShares(context.Background(), cat, filepath.Join(dir, "exposed"), "", time.Minute)
	t.Cleanup(func() { w.srv.CloseRepos(); w.srv.CloseShares() })
	return w
}

func (w *world) manager(defs []Def, n *notify.Notifier) *Manager {
	w.t.Helper()
	m, err := New(Config{Defs: defs, Catalog: w.cat, API: w.srv, Metrics: w.met, Notify: n, Clock: w.clock,
		Emit: func(ev, job, msg string) {
			w.mu.Lock()
			w.events = append(w.events, ev+" "+job)
			w.mu.Unlock()
		}})
	if err != nil {
		w.t.Fatal(err)
	}
	return m
}

// runAt runs job name once at t, as its schedule would.
func (w *world) runAt(m *Manager, name string, t time.Time) error {
	w.clock.set(t)
	return m.execute(context.Background(), m.jobs[name], TriggerSchedule)
}

// repo makes an empty unencrypted repository in the world's folder
// and returns its path.
func (w *world) repo() string {
	w.t.Helper()
	repo := filepath.Join(w.dir, "repo")
	r, err := backup.Init(repo)
	if err != nil {
		w.t.Fatal(err)
	}
	r.Close()
	return repo
}

func (w *world) snapshots(vol string) []string {
	resp, err := w.srv.ListSnapshots(context.Background(), &umbrav1.ListSnapshotsRequest{Volume: vol})
	if err != nil {
		w.t.Fatal(err)
	}
	var ids []string
	for _, sn := range resp.Snapshots {
		ids = append(ids, sn.Id)
	}
	slices.Sort(ids)
	return ids
}

// TestSnapshotTimeline takes 50 hourly snapshot sets of two volumes
// under an injected clock and checks that the timeline keeps exactly
// what its limits say, that a snapshot in use is never deleted, and
// that the history keeps its bound.
func TestSnapshotTimeline(t *testing.T) {
	w := newWorld(t)
	m := w.manager([]Def{{Name: "tl", Kind: "snapshot", Schedule: "hourly", Volumes: []string{"a", "b"}, History: 10,
		Persistent: boolp(false), Keep: Keep{Hourly: 3, Daily: 2, MinAge: "0s"}}}, nil)
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.Local)
	id := func(h int) string { return "tl-" + t0.Add(time.Duration(h)*time.Hour).UTC().Format(snapshotTime) }
	var release func()
	for h := 0; h < 50; h++ {
		if err := w.runAt(m, "tl", t0.Add(time.Duration(h)*time.Hour)); err != nil {
			t.Fatalf("hour %d: %v", h, err)
		}
		if h == 1 { // the snapshot of hour 1 is in use from now on
			sn, err := w.vols["a"].OpenSnapshot(id(1))
			if err != nil {
				t.Fatal(err)
			}
			release = sn.Use("test reader")
		}
	}
	// Hourly 3: hours 47, 48, 49. Daily 2: the first of the last two
	// days, hours 24 and 48. Hour 1: in use.
	want := []string{id(1), id(24), id(47), id(48), id(49)}
	slices.Sort(want)
	for _, vol := range []string{"a", "b"} {
		if got := w.snapshots(vol); !slices.Equal(got, want) {
			t.Fatalf("volume %s keeps %v, want %v", vol, got, want)
		}
	}
	runs, err := m.History("tl", 0)
	if err != nil || len(runs) != 10 || runs[0].Seq != 50 || runs[9].Seq != 41 {
		t.Fatalf("history: %d runs (%v), want runs 50..41", len(runs), err)
	}
	if r := runs[0]; r.Result != Success || r.Trigger != TriggerSchedule || !strings.Contains(r.Detail, "in use") {
		t.Fatalf("last run: %+v", r)
	}
	release()
	w.runAt(m, "tl", t0.Add(50*time.Hour))
	if got := w.snapshots("a"); slices.Contains(got, id(1)) {
		t.Fatalf("hour 1's snapshot, no longer in use, was kept: %v", got)
	}
	st, err := m.Get("tl")
	if err != nil || st.Last == nil || st.Last.Seq != 51 || st.LastSuccess.IsZero() || !st.Enabled {
		t.Fatalf("status: %+v %v", st, err)
	}
	// A restart sets the last-success gauge from the history.
	w.manager(m.cfg.Defs, nil)
	if !slices.Contains(w.met.runs, "tl last success") {
		t.Fatalf("metrics after a restart: %v", w.met.runs)
	}
}

// TestInterruptedAtStart leaves a run "running" as a service killed
// mid-run would, and checks that the next start records it as
// interrupted and alerts: event, metric, webhook.
func TestInterruptedAtStart(t *testing.T) {
	w := newWorld(t)
	defs := []Def{{Name: "tl", Kind: "snapshot", Schedule: "hourly", Volumes: []string{"a"}, Keep: Keep{Hourly: 3}}}
	w.clock.set(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	m := w.manager(defs, nil)
	r := &Run{Job: "tl", Kind: "snapshot", Trigger: TriggerSchedule, Start: w.clock.Now(), Result: Running}
	if err := m.hist.add(r, 100); err != nil {
		t.Fatal(err)
	}
	got := make(chan notify.Notification, 4)
	hook := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, req *http.Request) {
		var n notify.Notification
		b, _ := io.ReadAll(req.Body)
		json.Unmarshal(b, &n)
		got <- n
	}))
	defer hook.Close()
	n := notify.New(notify.Config{Webhook: hook.URL}, nil)
	defer n.Close(context.Background())
	w.manager(defs, n) // the next start
	select {
	case a := <-got:
		if a.Event != "job_interrupted" || a.Job != "tl" || a.RunID != "tl#1" || a.Result != Interrupted {
			t.Fatalf("notification %+v", a)
		}
	case <-time.After(time.Minute):
		t.Fatal("no notification of the interrupted run")
	}
	runs, _ := m.History("tl", 0)
	if len(runs) != 1 || runs[0].Result != Interrupted || runs[0].End.IsZero() || runs[0].Error == "" {
		t.Fatalf("history after restart: %+v", runs)
	}
	if !slices.Contains(w.met.runs, "tl interrupted") || !slices.Contains(w.events, "job_interrupted tl") {
		t.Fatalf("metrics %v, events %v", w.met.runs, w.events)
	}
}

// TestSkippedAndMissed records the scheduler's skips.
func TestSkippedAndMissed(t *testing.T) {
	w := newWorld(t)
	w.clock.set(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	m := w.manager([]Def{{Name: "tl", Kind: "snapshot", Schedule: "hourly", Volumes: []string{"a"}, Keep: Keep{Hourly: 3}}}, nil)
	m.skipped("tl", schedTrigger(w.clock.Now()), sched.SkipRunning+": the schedule run for ... has not ended")
	m.skipped("tl", schedTrigger(w.clock.Now()), sched.SkipMissed+": the scheduler was not running at ...")
	m.skipped("tl", schedTrigger(w.clock.Now()), sched.SkipNotRecorded+": record the last elapse of job tl: ...")
	runs, _ := m.History("tl", 0)
	if len(runs) != 3 || runs[0].Result != Failed || runs[1].Result != Missed || runs[2].Result != Skipped {
		t.Fatalf("history: %+v", runs)
	}
	if !slices.Contains(w.events, "job_missed tl") {
		t.Fatalf("events %v", w.events)
	}
}

// TestBackupPruneVerify backs a volume up three times with keep last =
// 2, then verifies the repository, skips a verify when nothing is due,
// and fails one after a bit of a pack is flipped.
func TestBackupPruneVerify(t *testing.T) {
	w := newWorld(t)
	repo := w.repo()
	m := w.manager([]Def{
		{Name: "bk", Kind: "backup", Schedule: "daily", Volumes: []string{"a"}, Repo: repo, Keep: Keep{Last: 2}},
		{Name: "vf", Kind: "verify", Schedule: "weekly", Repo: repo, ReverifyDays: 7},
		{Name: "vs", Kind: "verify", Schedule: "daily", Repo: repo, Sample: 0.5},
	}, nil)
	t0 := time.Now()
	for i := 0; i < 3; i++ {
		if _, err := w.vols["a"].WriteAt([]byte(strings.Repeat(string(rune('a'+i)), 4096)), int64(i)*65536); err != nil {
			t.Fatal(err)
		}
		if err := w.runAt(m, "bk", t0.Add(time.Duration(i)*time.Second)); err != nil {
			t.Fatalf("backup %d: %v", i, err)
		}
	}
	runs, _ := m.History("bk", 1)
	if runs[0].Bytes <= 0 || !strings.Contains(runs[0].Detail, "prune kept 2, removed 1") {
		t.Fatalf("last backup run: %+v", runs[0])
	}
	if err := w.runAt(m, "vf", t0); err != nil {
		t.Fatalf("verify: %v", err)
	}
	if err := w.runAt(m, "vf", t0.Add(24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if runs, _ := m.History("vf", 1); !strings.Contains(runs[0].Detail, "nothing due") {
		t.Fatalf("verify a day later: %+v", runs[0])
	}
	if err := w.runAt(m, "vs", t0); err != nil {
		t.Fatalf("sampled verify: %v", err)
	}
	if runs, _ := m.History("vs", 1); !strings.Contains(runs[0].Detail, "sample 0.5 (seed ") {
		t.Fatalf("sampled verify: %+v", runs[0])
	}
	// Flip a bit in a pack; eight days on, the images are due again.
	testutil.DamageFirstPack(t, repo, func(n int) int { return n / 3 }, 0x10)
	err := w.runAt(m, "vf", t0.Add(8*24*time.Hour))
	runs, _ = m.History("vf", 1)
	if err == nil || runs[0].Result != Failed || !strings.Contains(runs[0].Error, "damaged") {
		t.Fatalf("verify after a flipped bit: %v, %+v", err, runs[0])
	}
	if !slices.Contains(w.met.runs, "vf failed") {
		t.Fatalf("metrics: %v", w.met.runs)
	}
}

func schedTrigger(at time.Time) sched.Trigger { return sched.Trigger{Kind: sched.KindSchedule, At: at} }

// blocker is a test kind's run: it says it started and waits for
// release or its context.
type blocker struct{ started, release chan struct{} }

var blockers sync.Map // job name -> *blocker

func init() {
	register(&Kind{Name: "test-block", Check: func(*Def) error { return nil },
		Run: func(ctx context.Context, _ *Env, d *Def, _ *Outcome) error {
			v, _ := blockers.Load(d.Name)
			b := v.(*blocker)
			close(b.started)
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-b.release:
				return nil
			}
		}})
}

// TestRunNowAndStop runs a job by hand through the real scheduler: a
// second run is refused while it runs, a disabled job is refused (and
// stays disabled in the catalog), and stopping the manager cancels the
// run and records it as cancelled.
func TestRunNowAndStop(t *testing.T) {
	w := newWorld(t)
	w.clock.set(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	b := &blocker{started: make(chan struct{}), release: make(chan struct{})}
	blockers.Store("blk", b)
	defs := []Def{{Name: "blk", Kind: "test-block", Schedule: "hourly"}, {Name: "off", Kind: "test-block", Schedule: "hourly"}}
	m := w.manager(defs, nil)
	if err := m.SetEnabled("off", false); err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	deadline := time.Now().Add(time.Minute) // a bound on a hang, not a timing
	for {
		err := m.RunNow("blk")
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), "not running yet") || time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	<-b.started
	if err := m.RunNow("blk"); !errors.Is(err, ErrRunning) {
		t.Fatalf("a second run while one runs: %v", err)
	}
	if err := m.RunNow("off"); !errors.Is(err, ErrDisabled) {
		t.Fatalf("run of a disabled job: %v", err)
	}
	if err := m.RunNow("nope"); !errors.Is(err, ErrNoJob) {
		t.Fatalf("run of no job: %v", err)
	}
	if st, _ := m.Get("blk"); st.Running == nil || st.Running.Trigger != TriggerManual {
		t.Fatalf("status while running: %+v", st)
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	runs, _ := m.History("blk", 0)
	if len(runs) != 1 || runs[0].Result != Cancelled || !strings.Contains(runs[0].Error, "the service stopped") {
		t.Fatalf("history after the stop: %+v", runs)
	}
	if m2 := w.manager(defs, nil); m2.List()[1].Enabled {
		t.Fatal("a job disabled through the API is enabled again after a restart")
	}
}

// TestVerifyDueImages runs a verify job with reverify_days under an
// injected clock: each run checks only the images never verified or
// verified too long ago, records what it found in the repository, and
// one that finds damage marks the image damaged, which keeps it due.
func TestVerifyDueImages(t *testing.T) {
	w := newWorld(t)
	repo := w.repo()
	m := w.manager([]Def{
		{Name: "bk", Kind: "backup", Schedule: "daily", Volumes: []string{"a"}, Repo: repo, Full: true},
		{Name: "vf", Kind: "verify", Schedule: "daily", Repo: repo, ReverifyDays: 7},
		{Name: "vs", Kind: "verify", Schedule: "daily", Repo: repo, Sample: 0.5},
	}, nil)
	day := 24 * time.Hour
	t0 := time.Date(2026, 3, 1, 4, 0, 0, 0, time.UTC)
	backupAt := func(at time.Time, i int) {
		t.Helper()
		if _, err := w.vols["a"].WriteAt([]byte(strings.Repeat(string(rune('a'+i)), 4096)), int64(i)*65536); err != nil {
			t.Fatal(err)
		}
		if err := w.runAt(m, "bk", at); err != nil {
			t.Fatalf("backup %d: %v", i, err)
		}
	}
	verifyAt := func(at time.Time, wantDetail string) {
		t.Helper()
		if err := w.runAt(m, "vf", at); err != nil {
			t.Fatalf("verify at %v: %v", at, err)
		}
		if runs, _ := m.History("vf", 1); !strings.Contains(runs[0].Detail, wantDetail) {
			t.Fatalf("verify at %v: %+v, want %q", at, runs[0], wantDetail)
		}
	}
	states := func() (map[string]backup.VerifyState, []*backup.Image) {
		t.Helper()
		r, err := backup.Open(repo)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		s, errs := r.VerifyStates(context.Background())
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		list, _ := r.Images()
		return s, list
	}
	backupAt(t0, 0)
	backupAt(t0, 1)
	verifyAt(t0, "2 images due")
	verifyAt(t0.Add(day), "nothing due: all 2 images verified good within 7 days")
	backupAt(t0.Add(3*day), 2)
	verifyAt(t0.Add(3*day), "1 images due")
	s, list := states()
	if len(list) != 3 || !s[list[0].ID].Time.Equal(t0) || !s[list[1].ID].Time.Equal(t0) || !s[list[2].ID].Time.Equal(t0.Add(3*day)) {
		t.Fatalf("verify states %v of %d images", s, len(list))
	}
	// A sampled verify of an undamaged repository records nothing.
	if err := w.runAt(m, "vs", t0.Add(5*day)); err != nil {
		t.Fatal(err)
	}
	if s2, _ := states(); !maps.Equal(s, s2) {
		t.Fatalf("a sampled verify changed the states: %v, then %v", s, s2)
	}
	// Seven days after the first two were verified, only they are due.
	verifyAt(t0.Add(7*day), "2 images due")
	s, _ = states()
	if !s[list[0].ID].Time.Equal(t0.Add(7*day)) || !s[list[2].ID].Time.Equal(t0.Add(3*day)) {
		t.Fatalf("verify states after a week: %v", s)
	}
	// A flipped bit: the next run that checks the image finds it, fails
	// and marks the image damaged; a damaged image stays due.
	testutil.DamageFirstPack(t, repo, func(n int) int { return 8 }, 0x10) // in the first blob (the trailer is at the end)
	checkDamaged := func(at, goodAt time.Time) int {
		t.Helper()
		err := w.runAt(m, "vf", at)
		runs, _ := m.History("vf", 1)
		if err == nil || runs[0].Result != Failed || !strings.Contains(runs[0].Error, "damaged") {
			t.Fatalf("verify after a flipped bit at %v: %v, %+v", at, err, runs[0])
		}
		s, _ := states()
		damaged := 0
		for _, x := range list {
			if st := s[x.ID]; st.Result == backup.VerifyDamaged && st.Time.Equal(at) {
				damaged++
			} else if st.Result != backup.VerifyGood || !st.Time.Equal(goodAt) {
				t.Fatalf("verify at %v: state of %s: %+v", at, x.ID, st)
			}
		}
		if damaged == 0 {
			t.Fatalf("verify at %v marked no image damaged: %v", at, s)
		}
		return damaged
	}
	n := checkDamaged(t0.Add(20*day), t0.Add(20*day))
	if checkDamaged(t0.Add(21*day), t0.Add(20*day)) != n {
		t.Fatal("the second verify found other damage")
	}
	if runs, _ := m.History("vf", 1); !strings.Contains(runs[0].Detail, fmt.Sprintf("%d images due", n)) {
		t.Fatalf("a day later only the damaged images are due: %+v", runs[0])
	}
}
