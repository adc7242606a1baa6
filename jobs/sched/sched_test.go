package sched

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"umbra/jobs/calendar"
)

// fakeClock is a wall clock and a monotonic clock the test moves by
// hand. Advance moves both, stopping at every pending After on the way
// and letting the scheduler act there (synctest.Wait), as time passing
// would; Jump moves the wall clock alone, as a clock being set does.
type fakeClock struct {
	mu      sync.Mutex
	wall    time.Time     // guarded by mu
	mono    time.Duration // guarded by mu
	waiters []waiter      // guarded by mu
}

type waiter struct {
	at time.Duration
	ch chan time.Time
}

func newClock(t string) *fakeClock {
	w, err := time.Parse(time.RFC3339, t)
	if err != nil {
		panic(err)
	}
	return &fakeClock{wall: w}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.wall
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.wall
		return ch
	}
	c.waiters = append(c.waiters, waiter{c.mono + d, ch})
	return ch
}

// Advance moves time by d in the steps the scheduler asked for.
func (c *fakeClock) Advance(d time.Duration) {
	synctest.Wait()
	c.mu.Lock()
	end := c.mono + d
	c.mu.Unlock()
	for {
		c.mu.Lock()
		next := end
		for _, w := range c.waiters {
			if w.at < next {
				next = w.at
			}
		}
		c.wall = c.wall.Add(next - c.mono)
		c.mono = next
		c.fireLocked()
		c.mu.Unlock()
		synctest.Wait()
		if next == end {
			return
		}
	}
}

// fireLocked wakes the waiters whose time has come; c.mu is held.
func (c *fakeClock) fireLocked() {
	var keep []waiter
	for _, w := range c.waiters {
		if w.at <= c.mono {
			w.ch <- c.wall
		} else {
			keep = append(keep, w)
		}
	}
	c.waiters = keep
}

// AdvanceTo advances to the wall time t.
func (c *fakeClock) AdvanceTo(t string) {
	w, err := time.Parse(time.RFC3339, t)
	if err != nil {
		panic(err)
	}
	c.Advance(w.Sub(c.Now()))
}

// Stall moves both clocks by d at once, waking nothing on the way: the
// process was stopped or the machine suspended.
func (c *fakeClock) Stall(d time.Duration) {
	synctest.Wait()
	c.mu.Lock()
	c.wall = c.wall.Add(d)
	c.mono += d
	c.fireLocked()
	c.mu.Unlock()
	synctest.Wait()
}

// Jump sets the wall clock; the monotonic clock does not move.
func (c *fakeClock) Jump(t string) {
	w, err := time.Parse(time.RFC3339, t)
	if err != nil {
		panic(err)
	}
	synctest.Wait()
	c.mu.Lock()
	c.wall = w
	c.mu.Unlock()
}

type memState struct {
	mu   sync.Mutex
	last map[string]time.Time // guarded by mu
	fail error                // guarded by mu: SetLast's error
}

func newState() *memState { return &memState{last: map[string]time.Time{}} }

func (m *memState) Last(name string) (time.Time, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	t, ok := m.last[name]
	return t, ok
}

func (m *memState) SetLast(name string, t time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail != nil {
		return m.fail
	}
	m.last[name] = t
	return nil
}

func (m *memState) get(name string) time.Time {
	t, _ := m.Last(name)
	return t
}

// rec records what the scheduler did, in order.
type rec struct {
	mu     sync.Mutex
	events []string // guarded by mu
}

func (r *rec) add(format string, a ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, fmt.Sprintf(format, a...))
}

// take returns the events since the last take.
func (r *rec) take() []string {
	synctest.Wait()
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.events
	r.events = nil
	return e
}

func hm(t time.Time) string { return t.UTC().Format("15:04:05") }

// harness is a scheduler on a fake clock with its Run in a goroutine.
type harness struct {
	t     *testing.T
	clock *fakeClock
	state *memState
	rec   *rec
	s     *Scheduler
	stop  context.CancelFunc
	done  chan error
}

func (h *harness) opts() Options {
	return Options{
		OnSkip: func(name string, t Trigger, reason string) {
			h.rec.add("skip %s %s %s: %s", name, t.Kind, hm(t.At), reason)
		},
		OnDone: func(name string, t Trigger, err error) {
			h.rec.add("done %s %s %s err=%v", name, t.Kind, hm(t.At), err)
		},
	}
}

func newHarness(t *testing.T, now string, st *memState, opts func(*harness) Options) *harness {
	h := &harness{t: t, clock: newClock(now), state: st, rec: &rec{}}
	if h.state == nil {
		h.state = newState()
	}
	o := h.opts()
	if opts != nil {
		o = opts(h)
	}
	h.s = New(h.clock, h.state, o)
	return h
}

func (h *harness) start() {
	ctx, cancel := context.WithCancel(context.Background())
	h.stop = cancel
	h.done = make(chan error, 1)
	go func() { h.done <- h.s.Run(ctx) }()
	synctest.Wait()
}

func (h *harness) shutdown() {
	h.stop()
	if err := <-h.done; err != nil {
		h.t.Fatalf("Run: %v", err)
	}
}

// job is an Entry whose runs are recorded; it returns at once.
func (h *harness) job(name, spec string, persistent bool) Entry {
	return Entry{Name: name, Spec: mustSpec(spec), Persistent: persistent, Run: func(ctx context.Context, t Trigger) error {
		h.rec.add("run %s %s %s at %s last=%s", name, t.Kind, hm(t.At), hm(h.clock.Now()), hm(h.state.get(name)))
		return nil
	}}
}

func mustSpec(s string) *calendar.Spec {
	spec, err := calendar.ParseInLocation(s, time.UTC)
	if err != nil {
		panic(err)
	}
	return spec
}

func expect(t *testing.T, got []string, want ...string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Fatalf("events:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

func TestEveryElapseRunsOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, "2026-12-07T10:07:00Z", nil, nil)
		if err := h.s.Set([]Entry{h.job("q", "*:0/15", false)}); err != nil {
			t.Fatal(err)
		}
		h.start()
		defer h.shutdown()
		h.clock.Advance(time.Hour)
		expect(t, h.rec.take(),
			"run q schedule 10:15:00 at 10:15:00 last=10:15:00", "done q schedule 10:15:00 err=<nil>",
			"run q schedule 10:30:00 at 10:30:00 last=10:30:00", "done q schedule 10:30:00 err=<nil>",
			"run q schedule 10:45:00 at 10:45:00 last=10:45:00", "done q schedule 10:45:00 err=<nil>",
			"run q schedule 11:00:00 at 11:00:00 last=11:00:00", "done q schedule 11:00:00 err=<nil>")
	})
}

func TestDowntimeCatchUpOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := newState()
		st.last["p"] = time.Date(2026, 12, 7, 8, 0, 0, 0, time.UTC) // ran at 08:00, then down until 11:20
		st.last["n"] = time.Date(2026, 12, 7, 8, 0, 0, 0, time.UTC)
		h := newHarness(t, "2026-12-07T11:20:00Z", st, nil)
		h.s.Set([]Entry{h.job("p", "hourly", true), h.job("n", "hourly", false)})
		h.start()
		defer h.shutdown()
		got := h.rec.take()
		slices.Sort(got)
		expect(t, got,
			"done p catch-up 09:00:00 err=<nil>",
			"run p catch-up 09:00:00 at 11:20:00 last=11:20:00",
			"skip n schedule 09:00:00: missed: the scheduler was not running at 2026-12-07T09:00:00Z, and the job is not persistent")
		if got := st.get("n"); !got.Equal(h.clock.Now()) {
			t.Fatalf("last of the job not persistent: %s", got)
		}
		h.clock.AdvanceTo("2026-12-07T12:00:00Z")
		got = h.rec.take()
		slices.Sort(got)
		expect(t, got,
			"done n schedule 12:00:00 err=<nil>", "done p schedule 12:00:00 err=<nil>",
			"run n schedule 12:00:00 at 12:00:00 last=12:00:00", "run p schedule 12:00:00 at 12:00:00 last=12:00:00")
	})
}

func TestNeverRunJobDoesNotCatchUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, "2026-12-07T11:20:00Z", nil, nil)
		h.s.Set([]Entry{h.job("p", "hourly", true)})
		h.start()
		defer h.shutdown()
		expect(t, h.rec.take())
		h.clock.AdvanceTo("2026-12-07T12:00:00Z")
		expect(t, h.rec.take(), "run p schedule 12:00:00 at 12:00:00 last=12:00:00", "done p schedule 12:00:00 err=<nil>")
	})
}

// blocking is a job that runs until the test releases it.
func (h *harness) blocking(name, spec string) (Entry, chan struct{}) {
	release := make(chan struct{})
	return Entry{Name: name, Spec: mustSpec(spec), Run: func(ctx context.Context, t Trigger) error {
		h.rec.add("run %s %s %s", name, t.Kind, hm(t.At))
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}}, release
}

func TestRunsNeverOverlap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, "2026-12-07T09:30:00Z", nil, nil)
		e, release := h.blocking("b", "hourly")
		h.s.Set([]Entry{e})
		h.start()
		defer h.shutdown()
		h.clock.AdvanceTo("2026-12-07T10:00:00Z")
		expect(t, h.rec.take(), "run b schedule 10:00:00")
		if err := h.s.RunNow("b"); !errors.Is(err, ErrRunning) {
			t.Fatalf("RunNow while running: %v", err)
		}
		h.clock.AdvanceTo("2026-12-07T11:00:00Z")
		expect(t, h.rec.take(), "skip b schedule 11:00:00: still running: the schedule run for 2026-12-07T10:00:00Z has not ended")
		if got := h.state.get("b"); !got.Equal(time.Date(2026, 12, 7, 11, 0, 0, 0, time.UTC)) {
			t.Fatalf("last after a skip: %s", got)
		}
		release <- struct{}{}
		expect(t, h.rec.take(), "done b schedule 10:00:00 err=<nil>")
		// A manual run also keeps the next elapse from overlapping it.
		if err := h.s.RunNow("b"); err != nil {
			t.Fatal(err)
		}
		h.clock.AdvanceTo("2026-12-07T12:00:00Z")
		expect(t, h.rec.take(), "run b manual 11:00:00", "skip b schedule 12:00:00: still running: the manual run for 2026-12-07T11:00:00Z has not ended")
		release <- struct{}{}
		h.clock.AdvanceTo("2026-12-07T13:00:00Z")
		expect(t, h.rec.take(), "done b manual 11:00:00 err=<nil>", "run b schedule 13:00:00")
		if got := h.state.get("b"); !got.Equal(time.Date(2026, 12, 7, 13, 0, 0, 0, time.UTC)) {
			t.Fatalf("last: %s (a manual run must not move it)", got)
		}
		close(release)
	})
}

func TestRandomDelayStaysInBounds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const spread = 10 * time.Minute
		var mu sync.Mutex
		var delays []time.Duration
		h := newHarness(t, "2026-12-07T00:00:30Z", nil, func(h *harness) Options {
			o := h.opts()
			o.OnDone = nil
			return o
		})
		e := Entry{Name: "r", Spec: mustSpec("*:0/15"), RandomDelay: spread, Run: func(ctx context.Context, tr Trigger) error {
			mu.Lock()
			defer mu.Unlock()
			delays = append(delays, h.clock.Now().Sub(tr.At))
			return nil
		}}
		h.s.Set([]Entry{e})
		h.start()
		defer h.shutdown()
		h.clock.Advance(24*time.Hour + spread)
		mu.Lock()
		defer mu.Unlock()
		if len(delays) != 96 {
			t.Fatalf("%d runs in a day of */15, want 96", len(delays))
		}
		distinct := map[time.Duration]bool{}
		for _, d := range delays {
			if d < 0 || d >= spread {
				t.Fatalf("delay %s outside [0, %s)", d, spread)
			}
			distinct[d] = true
		}
		if len(distinct) < 10 {
			t.Fatalf("only %d distinct delays in 96 runs", len(distinct))
		}
	})
	// An injected Rand is asked with the bound and clamped to it.
	synctest.Test(t, func(t *testing.T) {
		var asked []time.Duration
		answers := []time.Duration{0, 7 * time.Minute, time.Hour, -time.Minute}
		h := newHarness(t, "2026-12-07T09:59:00Z", nil, func(h *harness) Options {
			o := h.opts()
			o.OnDone = nil
			o.Rand = func(max time.Duration) time.Duration {
				asked = append(asked, max)
				a := answers[0]
				answers = append(answers[1:], a)
				return a
			}
			return o
		})
		e := h.job("r", "hourly", false)
		e.RandomDelay = 10 * time.Minute
		h.s.Set([]Entry{e})
		h.start()
		defer h.shutdown()
		h.clock.AdvanceTo("2026-12-07T13:30:00Z")
		expect(t, h.rec.take(),
			"run r schedule 10:00:00 at 10:00:00 last=10:00:00",
			"run r schedule 11:00:00 at 11:07:00 last=11:00:00",
			"run r schedule 12:00:00 at 12:09:59 last=12:00:00", // an hour: clamped to just under 10 min
			"run r schedule 13:00:00 at 13:00:00 last=13:00:00") // negative: clamped to 0
		for _, a := range asked {
			if a != 10*time.Minute {
				t.Fatalf("Rand asked for %s", a)
			}
		}
	})
}

func TestSetWhileRunning(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := newState()
		st.last["late"] = time.Date(2026, 12, 7, 6, 0, 0, 0, time.UTC)
		h := newHarness(t, "2026-12-07T09:59:00Z", st, nil)
		b, _ := h.blocking("b", "hourly")
		h.s.Set([]Entry{b})
		h.start()
		h.clock.AdvanceTo("2026-12-07T10:00:00Z")
		expect(t, h.rec.take(), "run b schedule 10:00:00")

		// Remove b while it runs, add a persistent job missed since 07:00.
		if err := h.s.Set([]Entry{h.job("late", "hourly", true)}); err != nil {
			t.Fatal(err)
		}
		expect(t, h.rec.take(), "run late catch-up 07:00:00 at 10:00:00 last=10:00:00", "done late catch-up 07:00:00 err=<nil>")
		if err := h.s.RunNow("b"); !errors.Is(err, ErrUnknown) {
			t.Fatalf("RunNow of a removed job: %v", err)
		}
		// b back while its old run still runs: its elapse is skipped.
		h.s.Set([]Entry{b, h.job("late", "hourly", true)})
		h.clock.AdvanceTo("2026-12-07T11:00:00Z")
		got := h.rec.take()
		slices.Sort(got)
		expect(t, got, "done late schedule 11:00:00 err=<nil>",
			"run late schedule 11:00:00 at 11:00:00 last=11:00:00",
			"skip b schedule 11:00:00: still running: the schedule run for 2026-12-07T10:00:00Z has not ended")
		// A schedule change takes effect from the last served elapse.
		changed := h.job("late", "*:30", true)
		h.s.Set([]Entry{b, changed})
		h.clock.AdvanceTo("2026-12-07T11:45:00Z")
		expect(t, h.rec.take(), "run late schedule 11:30:00 at 11:30:00 last=11:30:00", "done late schedule 11:30:00 err=<nil>")
		// Shutdown cancels b's run and waits for it.
		h.shutdown()
		expect(t, h.rec.take(), "done b schedule 10:00:00 err=context canceled")
		if err := h.s.RunNow("late"); !errors.Is(err, ErrNotRunning) {
			t.Fatalf("RunNow after Run: %v", err)
		}
	})
}

func TestRunWaitsForRuns(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, "2026-12-07T09:59:00Z", nil, nil)
		release := make(chan struct{})
		h.s.Set([]Entry{{Name: "stubborn", Spec: mustSpec("hourly"), Run: func(ctx context.Context, t Trigger) error {
			<-release // ignores its context
			return nil
		}}})
		h.start()
		h.clock.AdvanceTo("2026-12-07T10:00:00Z")
		h.stop()
		synctest.Wait()
		select {
		case <-h.done:
			t.Fatal("Run returned while a run was in progress")
		default:
		}
		close(release)
		if err := <-h.done; err != nil {
			t.Fatal(err)
		}
	})
}

func TestClockSetBackwards(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, "2026-12-07T09:59:00Z", nil, nil)
		h.s.Set([]Entry{h.job("h", "hourly", true)})
		h.start()
		defer h.shutdown()
		h.clock.AdvanceTo("2026-12-07T10:00:00Z")
		expect(t, h.rec.take(), "run h schedule 10:00:00 at 10:00:00 last=10:00:00", "done h schedule 10:00:00 err=<nil>")
		h.clock.Jump("2026-12-07T08:30:00Z")
		h.clock.Advance(MaxWait) // noticed within MaxWait; nothing runs because of the jump
		expect(t, h.rec.take())
		h.clock.AdvanceTo("2026-12-07T09:00:00Z")
		expect(t, h.rec.take(), "run h schedule 09:00:00 at 09:00:00 last=09:00:00", "done h schedule 09:00:00 err=<nil>")
		// A restart with the clock behind the recorded last: no catch-up either.
		h.shutdown()
		h.clock.Jump("2026-12-07T07:10:00Z")
		h.start()
		h.clock.AdvanceTo("2026-12-07T08:00:00Z")
		expect(t, h.rec.take(), "run h schedule 08:00:00 at 08:00:00 last=08:00:00", "done h schedule 08:00:00 err=<nil>")
	})
}

func TestStallRunsOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, "2026-12-07T09:59:00Z", nil, nil)
		h.s.Set([]Entry{h.job("q", "*:0/15", false)})
		h.start()
		defer h.shutdown()
		h.clock.Stall(3 * time.Hour) // suspended from 09:59 to 12:59
		expect(t, h.rec.take(), "run q catch-up 10:00:00 at 12:59:00 last=12:59:00", "done q catch-up 10:00:00 err=<nil>")
		h.clock.AdvanceTo("2026-12-07T13:00:00Z")
		expect(t, h.rec.take(), "run q schedule 13:00:00 at 13:00:00 last=13:00:00", "done q schedule 13:00:00 err=<nil>")
	})
}

// TestKillDuringRun is a kill -9 in the middle of a run: Last was
// written at the start, so the run is not repeated after a restart;
// a persistent job still catches up an elapse the downtime missed.
func TestKillDuringRun(t *testing.T) {
	for _, tc := range []struct {
		restart string
		want    []string
	}{
		{"2026-12-07T10:40:00Z", nil}, // the 11:00 elapse is still ahead
		{"2026-12-07T12:40:00Z", []string{"run k catch-up 11:00:00 at 12:40:00 last=12:40:00", "done k catch-up 11:00:00 err=<nil>"}},
	} {
		synctest.Test(t, func(t *testing.T) {
			st := newState()
			h := newHarness(t, "2026-12-07T09:59:00Z", st, nil)
			b, _ := h.blocking("k", "hourly")
			b.Persistent = true
			h.s.Set([]Entry{b})
			h.start()
			h.clock.AdvanceTo("2026-12-07T10:00:00Z")
			expect(t, h.rec.take(), "run k schedule 10:00:00")
			h.shutdown() // the process dies; only the state survives
			h.rec.take()

			h2 := newHarness(t, tc.restart, st, nil)
			h2.s.Set([]Entry{h2.job("k", "hourly", true)})
			h2.start()
			defer h2.shutdown()
			expect(t, h2.rec.take(), tc.want...)
		})
	}
}

func TestStateWriteFailureDoesNotRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, "2026-12-07T09:59:00Z", nil, nil)
		h.s.Set([]Entry{h.job("f", "hourly", false)})
		h.start()
		defer h.shutdown()
		h.state.mu.Lock()
		h.state.fail = errors.New("catalog is read-only")
		h.state.mu.Unlock()
		h.clock.AdvanceTo("2026-12-07T10:00:00Z")
		expect(t, h.rec.take(), "skip f schedule 10:00:00: not run: record the last elapse of job f: catalog is read-only")
	})
	// Running, and the state cannot be written either: one skip says both.
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, "2026-12-07T09:59:00Z", nil, nil)
		b, release := h.blocking("b", "hourly")
		h.s.Set([]Entry{b})
		h.start()
		defer h.shutdown()
		h.clock.AdvanceTo("2026-12-07T10:00:00Z")
		h.state.mu.Lock()
		h.state.fail = errors.New("catalog is read-only")
		h.state.mu.Unlock()
		h.clock.AdvanceTo("2026-12-07T11:00:00Z")
		expect(t, h.rec.take(), "run b schedule 10:00:00",
			"skip b schedule 11:00:00: still running: the schedule run for 2026-12-07T10:00:00Z has not ended; record the last elapse of job b: catalog is read-only")
		close(release)
	})
}

func TestSetRefusesBadEntries(t *testing.T) {
	s := New(nil, nil, Options{})
	run := func(context.Context, Trigger) error { return nil }
	for _, tc := range []struct {
		entries []Entry
		want    string
	}{
		{[]Entry{{Spec: mustSpec("daily"), Run: run}}, "without a name"},
		{[]Entry{{Name: "a", Run: run}}, "no schedule"},
		{[]Entry{{Name: "a", Spec: mustSpec("daily")}}, "no Run"},
		{[]Entry{{Name: "a", Spec: mustSpec("daily"), Run: run}, {Name: "a", Spec: mustSpec("daily"), Run: run}}, "used twice"},
	} {
		if err := s.Set(tc.entries); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.entries, err, tc.want)
		}
	}
}
