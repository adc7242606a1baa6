package jobs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"umbra/catalog"
	"umbra/jobs/sched"
	"umbra/notify"
)

// Metrics records job runs (metrics.Metrics implements it).
type Metrics interface {
	JobRun(job, result string, end time.Time)
	// JobLastSuccess sets a job's last success from the history at
	// start, so that the gauge does not wait for the next success.
	JobLastSuccess(job string, end time.Time)
}

// Config is what a Manager runs and with what.
type Config struct {
	Defs    []Def
	Catalog *catalog.Catalog
	API     API
	// Metrics, Notify and Emit are told of every run that ends (each may
	// be nil): Emit with an event kind (job_started, job_succeeded,
	// job_failed, job_missed, job_interrupted), the job and a message.
	Metrics Metrics
	Notify  *notify.Notifier
	Emit    func(event, job, message string)
	Log     *slog.Logger
	// Validate, if set, checks a job added through the API beyond
	// Check (the service: its volumes exist), as a *DefError.
	Validate func(ctx context.Context, d *Def) error
	// Clock and Rand are the scheduler's (nil: the real clock, math/rand).
	Clock sched.Clock
	Rand  func(max time.Duration) time.Duration
}

// ErrNoJob is a job name that no definition has.
var ErrNoJob = errors.New("no such job")

// ErrDisabled refuses to run a disabled job.
var ErrDisabled = errors.New("the job is disabled")

// ErrRunning refuses to start a job that is running.
var ErrRunning = errors.New("the job is running")

// Manager runs the jobs of a service: it schedules them, records each
// run in the catalog and tells of the runs that go wrong.
type Manager struct {
	cfg   Config
	log   *slog.Logger
	hist  history
	env   *Env
	clock sched.Clock
	sched *sched.Scheduler

	change sync.Mutex // serializes Add and Remove

	dmu   sync.RWMutex    // guards jobs and order
	jobs  map[string]*job // by name
	order []string        // job names: the config's as defined, then the API's

	mu      sync.Mutex      // guards the fields below
	running map[string]*Run // runs in progress, by job
	states  map[string]*jobState
}

// jobState is what the catalog keeps of a job between runs of the
// service.
type jobState struct {
	Enabled *bool     `json:"enabled,omitempty"` // what enable/disable said last (nil: the definition's)
	Def     *Def      `json:"def,omitempty"`     // the definition of a job added through the API (nil: the config's)
	Last    time.Time `json:"last,omitzero"`     // the last scheduled run's time (the scheduler's state)
}

// New checks the definitions (a *DefError names the job and the field),
// marks the runs that a service that died left running as interrupted,
// and prepares the scheduler; Run starts it.
func New(cfg Config) (*Manager, error) {
	js, err := check(cfg.Defs)
	if err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg, log: cfg.Log, jobs: map[string]*job{}, hist: history{cfg.Catalog},
		running: map[string]*Run{}, states: map[string]*jobState{}, clock: cfg.Clock}
	if m.log == nil {
		m.log = slog.Default()
	}
	if m.clock == nil {
		m.clock = realClock{}
	}
	for _, j := range js {
		m.jobs[j.Name] = j
		m.order = append(m.order, j.Name)
		st := &jobState{}
		if _, err := cfg.Catalog.Get(catalog.Jobs, j.Name, st); err != nil {
			m.log.Warn("job state unreadable: starting afresh", "job", j.Name, "err", err)
		}
		m.states[j.Name] = st
	}
	if err := m.loadAPIJobs(); err != nil {
		return nil, fmt.Errorf("jobs: the definitions kept in the catalog: %w", err)
	}
	m.env = &Env{API: cfg.API, Log: m.log, Now: m.clock.Now}
	left, err := m.hist.interrupted(m.clock.Now())
	if err != nil {
		return nil, fmt.Errorf("jobs: %w", err)
	}
	for i := range left {
		m.ended(&left[i])
	}
	if cfg.Metrics != nil {
		for _, name := range m.order {
			if _, t := m.hist.last(name); !t.IsZero() {
				cfg.Metrics.JobLastSuccess(name, t)
			}
		}
	}
	m.sched = sched.New(m.clock, stateOf{m}, sched.Options{Rand: cfg.Rand, OnSkip: m.skipped})
	if err := m.sched.Set(m.entries()); err != nil {
		return nil, fmt.Errorf("jobs: %w", err)
	}
	return m, nil
}

// Run schedules the jobs until ctx ends, then waits for the runs in
// progress, which ctx's end cancels (each recorded as cancelled).
func (m *Manager) Run(ctx context.Context) error {
	return m.sched.Run(ctx)
}

// entries are the scheduler's entries: the enabled jobs.
func (m *Manager) entries() []sched.Entry {
	var out []sched.Entry
	m.dmu.RLock()
	defer m.dmu.RUnlock()
	for _, name := range m.order {
		j := m.jobs[name]
		if !m.enabled(j) {
			continue
		}
		out = append(out, sched.Entry{Name: j.Name, Spec: j.spec, RandomDelay: j.randomDelay, Persistent: j.catchUp,
			Run: func(ctx context.Context, t sched.Trigger) error { return m.execute(ctx, j, trigger(t)) }})
	}
	return out
}

func (m *Manager) enabled(j *job) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if st := m.states[j.Name]; st.Enabled != nil {
		return *st.Enabled
	}
	return !j.Disabled
}

// execute runs job j once and records the run.
func (m *Manager) execute(ctx context.Context, j *job, trig string) error {
	r := &Run{Job: j.Name, Kind: j.Kind, Trigger: trig, Start: m.clock.Now().UTC(), Result: Running}
	if err := m.hist.add(r, j.history); err != nil {
		m.log.Error("job run not recorded", "job", j.Name, "err", err)
	}
	m.mu.Lock()
	m.running[j.Name] = r
	m.mu.Unlock()
	m.emit("job_started", j.Name, fmt.Sprintf("run %d (%s)", r.Seq, trig))
	m.log.Info("job started", "job", j.Name, "run", r.Seq, "trigger", trig)

	runCtx, cancel := ctx, context.CancelFunc(func() {})
	if j.timeout > 0 {
		runCtx, cancel = context.WithTimeout(ctx, j.timeout)
	}
	var out Outcome
	err := j.kind.Run(runCtx, m.env, &j.Def, &out)
	cancel()
	r.End, r.Bytes, r.Detail = m.clock.Now().UTC(), out.Bytes, out.Detail
	switch {
	case err == nil:
		r.Result = Success
	case ctx.Err() != nil:
		r.Result, r.Error = Cancelled, "the service stopped during this run: "+err.Error()
	case runCtx.Err() != nil:
		r.Result, r.Error = Cancelled, fmt.Sprintf("its timeout (%s) passed: %v", j.timeout, err)
	default:
		r.Result, r.Error = Failed, err.Error()
	}
	if uerr := m.hist.update(r); uerr != nil {
		m.log.Error("job run not recorded", "job", j.Name, "err", uerr)
	}
	m.mu.Lock()
	delete(m.running, j.Name)
	m.mu.Unlock()
	m.ended(r)
	return err
}

// ended tells of a run that ended: metrics, event, log and, when it
// went wrong, a notification.
func (m *Manager) ended(r *Run) {
	if m.cfg.Metrics != nil {
		m.cfg.Metrics.JobRun(r.Job, r.Result, r.End)
	}
	event := map[string]string{Success: "job_succeeded", Failed: "job_failed", Skipped: "job_missed", Missed: "job_missed",
		Interrupted: "job_interrupted", Cancelled: "job_interrupted"}[r.Result]
	msg := fmt.Sprintf("run %d (%s) %s", r.Seq, r.Trigger, r.Result)
	if r.Error != "" {
		msg += ": " + r.Error
	} else if r.Detail != "" {
		msg += ": " + r.Detail
	}
	m.emit(event, r.Job, msg)
	attrs := []any{"job", r.Job, "run", r.Seq, "kind", r.Kind, "trigger", r.Trigger, "result", r.Result}
	if r.Result == Success {
		m.log.Info("job done", append(attrs, "bytes", r.Bytes, "detail", r.Detail, "took", r.End.Sub(r.Start).Round(time.Millisecond))...)
		return
	}
	m.log.Error("job run went wrong", append(attrs, "err", r.Error)...)
	m.cfg.Notify.Send(notify.Notification{Event: event, Job: r.Job, Kind: r.Kind, RunID: r.ID(), Trigger: r.Trigger,
		Result: r.Result, Start: r.Start, End: r.End, Bytes: r.Bytes, Error: r.Error})
}

func (m *Manager) emit(event, job, msg string) {
	if m.cfg.Emit != nil {
		m.cfg.Emit(event, job, msg)
	}
}

// skipped records an elapse of a job's schedule that did not run: the
// service was down then and the job does not catch up (missed), or the
// previous run was still running (skipped).
func (m *Manager) skipped(name string, t sched.Trigger, reason string) {
	j := m.lookup(name)
	if j == nil {
		return
	}
	now := m.clock.Now().UTC()
	r := &Run{Job: name, Kind: j.Kind, Trigger: trigger(t), Start: t.At.UTC(), End: now, Result: Skipped, Error: reason}
	if r.Start.IsZero() || r.Start.After(now) {
		r.Start = now
	}
	switch {
	case strings.HasPrefix(reason, sched.SkipMissed):
		r.Result = Missed
	case strings.HasPrefix(reason, sched.SkipNotRecorded):
		r.Result = Failed // its state could not be saved: the catalog needs a look
	}
	if err := m.hist.add(r, j.history); err != nil {
		m.log.Error("job run not recorded", "job", name, "err", err)
	}
	m.ended(r)
}

func trigger(t sched.Trigger) string {
	switch t.Kind {
	case sched.KindCatchUp:
		return TriggerCatchUp
	case sched.KindManual:
		return TriggerManual
	}
	return TriggerSchedule
}

// stateOf keeps the scheduler's state in the catalog.
type stateOf struct{ m *Manager }

func (s stateOf) Last(name string) (time.Time, bool) {
	s.m.mu.Lock()
	defer s.m.mu.Unlock()
	if st := s.m.states[name]; st != nil && !st.Last.IsZero() {
		return st.Last, true
	}
	return time.Time{}, false
}

func (s stateOf) SetLast(name string, t time.Time) error {
	return s.m.saveState(name, func(st *jobState) { st.Last = t })
}

func (m *Manager) saveState(name string, change func(*jobState)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.states[name]
	if st == nil {
		return fmt.Errorf("job %q: %w", name, ErrNoJob)
	}
	next := *st
	change(&next)
	if err := m.cfg.Catalog.Put(catalog.Jobs, name, next); err != nil {
		return err
	}
	*st = next
	return nil
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }
