// Package sched starts named jobs at the elapses of their calendar
// schedules, never two runs of one job at once and never a run twice
// for one elapse; its clock and its memory of past runs are injected,
// so it is tested without sleeping.
//
// # State
//
// State.Last(name) is the time up to which the job's elapses have been
// served: the next scheduled elapse is Spec.Next(Last). The scheduler
// writes it with SetLast before it starts a run (to the elapse the run
// is for, or to the current time for a catch-up run), and when it skips
// an elapse. The caller persists it (the catalog).
//
// # What happens when
//
//   - Elapse: at Spec.Next(Last) plus a random delay in
//     [0, RandomDelay) drawn for that elapse (systemd's
//     RandomizedDelaySec), the job runs with Trigger{Kind: "schedule",
//     At: the elapse}.
//   - Overlap: if the job is still running (a scheduled, catch-up or
//     manual run), the elapse is skipped: OnSkip(name, trigger, reason)
//     and Last advances as if it had run. Runs never overlap.
//   - Stall: if more than one elapse has passed when the scheduler gets
//     to a job (the machine was suspended, the process stalled, the
//     clock jumped forward), the job runs once, Trigger{Kind:
//     "catch-up", At: the first passed elapse}, and Last becomes now.
//   - Downtime: when Run starts, or when Set adds a job, a job whose
//     Spec.Next(Last) has passed was missed while the scheduler was not
//     running. Persistent (systemd's Persistent=true): it runs once,
//     Trigger{Kind: "catch-up", At: the first missed elapse}, after its
//     random delay; Last becomes the time the run starts. Not
//     persistent: OnSkip reports the first missed elapse with the
//     reason "missed", Last becomes now, nothing runs. Either way the
//     missed elapses are reported or run once, never once each.
//   - A job that has never run (State.Last reports false) starts at its
//     next elapse after the time it is first seen; nothing is caught up
//     for it.
//   - Kill -9 during a run: Last was written when the run started, so
//     after a restart that run is not repeated. The next elapse after
//     it runs as usual, or as one catch-up run at start if it passed
//     while the service was down and the job is Persistent. The caller
//     finds the interrupted run in its own history (started, never
//     ended) and records it as interrupted.
//   - Clock set backwards: if Last is later than the clock, the job's
//     schedule restarts from now (as systemd does), so it runs at the
//     next elapse after the new time; no run happens because of the jump
//     itself. Elapses already served can thus come round again. The
//     scheduler notices a jump of the wall clock within MaxWait.
//   - Manual: RunNow runs a job at once with Trigger{Kind: "manual"}; it
//     leaves Last alone, and fails with ErrRunning while the job runs.
//   - Set replaces the jobs: a job that keeps its name keeps its Last
//     and its running run; a job removed while running finishes its run
//     (its context is not cancelled), and Run waits for it.
//   - Run's context ending cancels the contexts of runs in progress;
//     Run returns when they have returned.
//
// OnSkip and OnDone are called from Run's and Set's goroutines and the runs', never
// with its lock held; OnDone for a run is called before the job counts
// as not running any more.
//
// Set returns an error (for a duplicate or empty name, a nil Spec or
// Run), an addition to the shape first agreed on.
package sched

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"umbra/jobs/calendar"
)

// MaxWait bounds how long the scheduler sleeps without looking at the
// clock, so that a change of the wall clock is noticed.
const MaxWait = time.Minute

// Trigger kinds.
const (
	KindSchedule = "schedule"
	KindCatchUp  = "catch-up"
	KindManual   = "manual"
)

// OnSkip's reason starts with one of these words, then a colon and the
// details.
const (
	// SkipMissed: the scheduler was not running at the elapse and the
	// job is not persistent.
	SkipMissed = "missed"
	// SkipRunning: the job's previous run had not ended.
	SkipRunning = "still running"
	// SkipNotRecorded: State.SetLast failed; running could repeat the
	// run after a restart, so it does not run.
	SkipNotRecorded = "not run"
)

var (
	// ErrRunning is RunNow's error for a job that is running.
	ErrRunning = errors.New("job is running")
	// ErrUnknown is RunNow's error for a name that is not a job.
	ErrUnknown = errors.New("no such job")
	// ErrNotRunning is RunNow's error while Run is not running.
	ErrNotRunning = errors.New("scheduler is not running")
	// ErrAlreadyRunning is Run's error when Run is already running.
	ErrAlreadyRunning = errors.New("scheduler is already running")
)

// Clock is the time source. After is measured on a monotonic clock, as
// time.After: it is not shortened or lengthened by a change of the wall
// clock Now reads.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

// SystemClock is the real clock.
type SystemClock struct{}

func (SystemClock) Now() time.Time                         { return time.Now() }
func (SystemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// State remembers, per job, the time up to which its elapses are
// served (see the package doc).
type State interface {
	Last(name string) (time.Time, bool)
	SetLast(name string, t time.Time) error
}

// Trigger says why a run starts: Kind is KindSchedule, KindCatchUp or
// KindManual; At is the elapse it serves (the time RunNow was called,
// for a manual run).
type Trigger struct {
	Kind string
	At   time.Time
}

// Entry is one scheduled job.
type Entry struct {
	Name        string
	Spec        *calendar.Spec
	RandomDelay time.Duration
	Persistent  bool
	Run         func(ctx context.Context, t Trigger) error
}

// Options are the scheduler's hooks; all may be nil.
type Options struct {
	// Rand returns a random duration in [0, max); nil is uniform.
	Rand func(max time.Duration) time.Duration
	// OnSkip is told of every elapse that does not run and why.
	OnSkip func(name string, t Trigger, reason string)
	// OnDone is told of every run's end and its error.
	OnDone func(name string, t Trigger, err error)
}

// Scheduler runs entries at their elapses. Its methods are safe for
// concurrent use.
type Scheduler struct {
	clock Clock
	state State
	opts  Options
	wake  chan struct{} // buffered 1: Set changed the entries

	mu      sync.Mutex
	entries map[string]*entry  // guarded by mu
	running map[string]Trigger // guarded by mu: jobs with a run in progress, by name across Set
	active  bool               // guarded by mu: Run is running
	runCtx  context.Context    // guarded by mu: the context runs get, while active
	runs    sync.WaitGroup     // runs in progress; Add under mu while active
}

type entry struct {
	Entry
	base    time.Time // elapses up to base are served
	due     time.Time // next elapse; zero: never
	fireAt  time.Time // due plus its random delay; or when a catch-up fires
	catchUp bool      // the pending trigger is a catch-up of a downtime
	known   bool      // initialized against State and the clock
}

// New returns a scheduler with no entries.
func New(clock Clock, state State, opts Options) *Scheduler {
	if clock == nil {
		clock = SystemClock{}
	}
	return &Scheduler{
		clock:   clock,
		state:   state,
		opts:    opts,
		wake:    make(chan struct{}, 1),
		entries: map[string]*entry{},
		running: map[string]Trigger{},
	}
}

func (s *Scheduler) delay(limit time.Duration) time.Duration {
	if limit <= 0 {
		return 0
	}
	var d time.Duration
	if s.opts.Rand != nil {
		d = s.opts.Rand(limit)
	} else {
		d = rand.N(limit)
	}
	return min(max(d, 0), limit-1)
}

// calls are callbacks collected under the lock and made after it.
type calls []func()

func (c calls) run() {
	for _, f := range c {
		f()
	}
}

func (s *Scheduler) skip(cs *calls, name string, t Trigger, reason string) {
	if s.opts.OnSkip != nil {
		*cs = append(*cs, func() { s.opts.OnSkip(name, t, reason) })
	}
}

func (s *Scheduler) setLast(name string, t time.Time) error {
	if s.state == nil {
		return nil
	}
	if err := s.state.SetLast(name, t); err != nil {
		return fmt.Errorf("record the last elapse of job %s: %w", name, err)
	}
	return nil
}

// Set replaces the scheduled entries.
func (s *Scheduler) Set(entries []Entry) error {
	next := map[string]*entry{}
	for _, e := range entries {
		switch {
		case e.Name == "":
			return errors.New("scheduler entry without a name")
		case e.Spec == nil:
			return fmt.Errorf("scheduler entry %s: no schedule", e.Name)
		case e.Run == nil:
			return fmt.Errorf("scheduler entry %s: no Run function", e.Name)
		case next[e.Name] != nil:
			return fmt.Errorf("scheduler entry %s: the name is used twice", e.Name)
		}
		next[e.Name] = &entry{Entry: e}
	}
	var cs calls
	s.mu.Lock()
	now := s.clock.Now()
	for name, n := range next {
		old := s.entries[name]
		if old == nil || !old.known {
			continue
		}
		n.base, n.known = old.base, true
		if old.catchUp || old.Spec.String() == n.Spec.String() && old.Spec.Location().String() == n.Spec.Location().String() &&
			old.RandomDelay == n.RandomDelay {
			n.due, n.fireAt, n.catchUp = old.due, old.fireAt, old.catchUp
		} else {
			s.schedule(n, n.base)
		}
	}
	s.entries = next
	if s.active {
		for _, e := range s.entries {
			if !e.known {
				s.initEntry(&cs, e, now)
			}
		}
	}
	s.mu.Unlock()
	cs.run()
	select {
	case s.wake <- struct{}{}:
	default:
	}
	return nil
}

// schedule sets e's next elapse after base and draws its delay.
func (s *Scheduler) schedule(e *entry, base time.Time) {
	e.base = base
	e.catchUp = false
	e.due = e.Spec.Next(base)
	e.fireAt = time.Time{}
	if !e.due.IsZero() {
		e.fireAt = e.due.Add(s.delay(e.RandomDelay))
	}
}

// initEntry reads e's state when the scheduler first sees it running:
// a downtime's missed elapse is caught up or reported here.
func (s *Scheduler) initEntry(cs *calls, e *entry, now time.Time) {
	e.known = true
	var last time.Time
	ok := false
	if s.state != nil {
		last, ok = s.state.Last(e.Name)
	}
	if !ok || last.After(now) {
		s.schedule(e, now)
		return
	}
	missed := e.Spec.Next(last)
	if missed.IsZero() || missed.After(now) {
		s.schedule(e, last)
		return
	}
	if e.Persistent {
		e.base, e.due, e.catchUp = last, missed, true
		e.fireAt = now.Add(s.delay(e.RandomDelay))
		return
	}
	reason := fmt.Sprintf("%s: the scheduler was not running at %s, and the job is not persistent", SkipMissed, missed.Format(time.RFC3339))
	if err := s.setLast(e.Name, now); err != nil {
		reason += "; " + err.Error()
	}
	s.skip(cs, e.Name, Trigger{Kind: KindSchedule, At: missed}, reason)
	s.schedule(e, now)
}

// RunNow starts a manual run of the named job.
func (s *Scheduler) RunNow(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.active {
		return fmt.Errorf("run job %s: %w", name, ErrNotRunning)
	}
	e := s.entries[name]
	if e == nil {
		return fmt.Errorf("run job %s: %w", name, ErrUnknown)
	}
	if t, busy := s.running[name]; busy {
		return fmt.Errorf("run job %s: %w (%s run for %s)", name, ErrRunning, t.Kind, t.At.Format(time.RFC3339))
	}
	s.start(e, Trigger{Kind: KindManual, At: s.clock.Now()})
	return nil
}

// start runs e in a goroutine Run waits for. Called with mu held.
func (s *Scheduler) start(e *entry, t Trigger) {
	s.running[e.Name] = t
	s.runs.Add(1)
	ctx, name, run := s.runCtx, e.Name, e.Run
	go func() {
		defer s.runs.Done()
		err := run(ctx, t)
		if s.opts.OnDone != nil {
			s.opts.OnDone(name, t, err)
		}
		s.mu.Lock()
		delete(s.running, name)
		s.mu.Unlock()
	}()
}

// Run schedules the entries until ctx ends, then waits for the runs in
// progress (their contexts are cancelled) and returns nil.
func (s *Scheduler) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.active {
		s.mu.Unlock()
		return ErrAlreadyRunning
	}
	s.active = true
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.runCtx = runCtx
	var cs calls
	now := s.clock.Now()
	for _, e := range s.entries {
		e.known = false
		s.initEntry(&cs, e, now)
	}
	s.mu.Unlock()
	cs.run()

	for {
		wait, ok := s.tick()
		var timer <-chan time.Time
		if ok {
			timer = s.clock.After(wait)
		}
		select {
		case <-ctx.Done():
			s.mu.Lock()
			s.active = false
			s.mu.Unlock()
			cancel()
			s.runs.Wait()
			return nil
		case <-timer:
		case <-s.wake:
		}
	}
}

// tick fires every entry that is due and returns how long to wait for
// the next one (ok false: nothing is scheduled).
func (s *Scheduler) tick() (wait time.Duration, ok bool) {
	var cs calls
	defer func() { cs.run() }() // after the unlock below
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	var earliest time.Time
	for _, e := range s.entries {
		if !e.known {
			s.initEntry(&cs, e, now)
		}
		if e.base.After(now) { // the wall clock went back
			s.schedule(e, now)
		}
		if !e.fireAt.IsZero() && !e.fireAt.After(now) {
			s.fire(&cs, e, now)
		}
		if !e.fireAt.IsZero() && (earliest.IsZero() || e.fireAt.Before(earliest)) {
			earliest = e.fireAt
		}
	}
	if earliest.IsZero() {
		return 0, false
	}
	return min(max(earliest.Sub(now), 0), MaxWait), true
}

// fire serves e's due elapse: a run, or a skip if it is running.
func (s *Scheduler) fire(cs *calls, e *entry, now time.Time) {
	t := Trigger{Kind: KindSchedule, At: e.due}
	served := e.due
	if e.catchUp {
		t.Kind, served = KindCatchUp, now
	} else if n := e.Spec.Next(e.due); !n.IsZero() && !n.After(now) {
		t.Kind, served = KindCatchUp, now // several elapses passed: one run
	}
	err := s.setLast(e.Name, served)
	s.schedule(e, served)
	if busy, ok := s.running[e.Name]; ok {
		reason := fmt.Sprintf("%s: the %s run for %s has not ended", SkipRunning, busy.Kind, busy.At.Format(time.RFC3339))
		if err != nil {
			reason += "; " + err.Error()
		}
		s.skip(cs, e.Name, t, reason)
		return
	}
	if err != nil {
		s.skip(cs, e.Name, t, SkipNotRecorded+": "+err.Error())
		return
	}
	s.start(e, t)
}
