package jobs

import (
	"errors"
	"fmt"
	"time"

	"umbra/jobs/sched"
)

// Status is a job as `umbra jobs list` and `show` tell it.
type Status struct {
	Def
	Source      string // where it is defined: SourceConfig or SourceAPI
	Enabled     bool
	Running     *Run      // the run in progress (nil: none)
	Last        *Run      // the last run that ended (nil: none yet)
	LastSuccess time.Time // zero: none kept in the history
	Next        time.Time // the next scheduled run (zero: disabled)
}

// List is every job's status, in the order of the definitions.
func (m *Manager) List() []Status {
	m.dmu.RLock()
	js := make([]*job, 0, len(m.order))
	for _, name := range m.order {
		js = append(js, m.jobs[name])
	}
	m.dmu.RUnlock()
	out := make([]Status, 0, len(js))
	for _, j := range js {
		out = append(out, m.status(j))
	}
	return out
}

// Get is one job's status.
func (m *Manager) Get(name string) (Status, error) {
	j, err := m.job(name)
	if err != nil {
		return Status{}, err
	}
	return m.status(j), nil
}

func (m *Manager) job(name string) (*job, error) {
	j := m.lookup(name)
	if j == nil {
		return nil, fmt.Errorf("job %q: %w (see `umbra jobs list`; jobs are defined in the service's config file as [[job]] tables, or with umbra jobs add)", name, ErrNoJob)
	}
	return j, nil
}

func (m *Manager) status(j *job) Status {
	st := Status{Def: j.Def, Source: SourceConfig, Enabled: m.enabled(j)}
	if j.api {
		st.Source = SourceAPI
	}
	m.mu.Lock()
	if r := m.running[j.Name]; r != nil {
		c := *r
		st.Running = &c
	}
	m.mu.Unlock()
	st.Last, st.LastSuccess = m.hist.last(j.Name)
	if st.Enabled {
		st.Next = j.spec.Next(m.clock.Now())
	}
	return st
}

// History is up to limit runs of job name ("" every job), newest first.
func (m *Manager) History(name string, limit int) ([]Run, error) {
	if name != "" {
		if _, err := m.job(name); err != nil {
			return nil, err
		}
	}
	return m.hist.list(name, limit)
}

// RunNow starts a run of job name now; it does not wait for it.
func (m *Manager) RunNow(name string) error {
	j, err := m.job(name)
	if err != nil {
		return err
	}
	if !m.enabled(j) {
		return fmt.Errorf("job %s: %w: enable it first (umbra jobs enable %s)", name, ErrDisabled, name)
	}
	m.mu.Lock()
	r := m.running[name]
	m.mu.Unlock()
	if r != nil {
		return fmt.Errorf("job %s: %w (run %d, started %s): wait for it (umbra jobs show %s)", name, ErrRunning, r.Seq, r.Start.Format(time.RFC3339), name)
	}
	if err := m.sched.RunNow(name); err != nil {
		if errors.Is(err, sched.ErrNotRunning) {
			return fmt.Errorf("job %s: the scheduler is not running yet or any more: try again", name)
		}
		if errors.Is(err, sched.ErrRunning) {
			return fmt.Errorf("job %s: %w: wait for it (umbra jobs show %s)", name, ErrRunning, name)
		}
		return fmt.Errorf("job %s: %w", name, err)
	}
	return nil
}

// SetEnabled enables or disables job name; the catalog keeps it over
// restarts (over the definition's disabled). A run in progress goes on.
func (m *Manager) SetEnabled(name string, on bool) error {
	if _, err := m.job(name); err != nil {
		return err
	}
	if err := m.saveState(name, func(st *jobState) { st.Enabled = &on }); err != nil {
		return fmt.Errorf("job %s: %w", name, err)
	}
	return m.sched.Set(m.entries())
}
