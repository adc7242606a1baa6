package jobs

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/BurntSushi/toml"

	"umbra/catalog"
)

// Jobs are defined in the config file ([[job]] tables) or through the
// API (umbra jobs add): the catalog keeps the latter's definitions, in
// their job's record, so that they survive a restart.

// Where a job is defined (Status.Source).
const (
	SourceConfig = "config"
	SourceAPI    = "api"
)

// ErrConfigJob refuses to add or remove through the API a job that the
// config file defines.
var ErrConfigJob = errors.New("defined in the config file: edit it there")

// ErrExists refuses to add a job whose name is taken.
var ErrExists = errors.New("a job of that name exists")

// ParseDef reads one job definition for job name: a TOML document of one
// [[job]] table, or of a [[job]] table's keys alone. Its name, if it
// gives one, must be name. An unknown key is an error naming it.
func ParseDef(name, text string) (Def, error) {
	var doc struct {
		Job []Def `toml:"job"`
	}
	md, err := toml.Decode(text, &doc)
	if err != nil {
		return Def{}, &DefError{Job: name, Err: fmt.Errorf("not a TOML job definition: %w", err)}
	}
	var d Def
	prefix := ""
	if md.IsDefined("job") {
		if len(doc.Job) != 1 {
			return Def{}, &DefError{Job: name, Err: fmt.Errorf("%d [[job]] tables: want one", len(doc.Job))}
		}
		d, prefix = doc.Job[0], "job."
	} else if md, err = toml.Decode(text, &d); err != nil {
		return Def{}, &DefError{Job: name, Err: fmt.Errorf("not a TOML job definition: %w", err)}
	}
	if und := md.Undecoded(); len(und) > 0 {
		return Def{}, &DefError{Job: name, Field: strings.TrimPrefix(und[0].String(), prefix),
			Err: errors.New("unknown field: see the [[job]] fields in the README")}
	}
	switch {
	case d.Name == "":
		d.Name = name
	case d.Name != name:
		return Def{}, &DefError{Job: name, Field: "name", Err: fmt.Errorf("%q: the definition names another job than %q", d.Name, name)}
	}
	return d, nil
}

// lookup is job name, nil if none.
func (m *Manager) lookup(name string) *job {
	m.dmu.RLock()
	defer m.dmu.RUnlock()
	return m.jobs[name]
}

// Add defines job d through the API: checked as the config's jobs are
// (a *DefError names the field), kept in the catalog and scheduled at
// once.
func (m *Manager) Add(ctx context.Context, d Def) error {
	m.change.Lock()
	defer m.change.Unlock()
	if cur := m.lookup(d.Name); cur != nil {
		if !cur.api {
			return fmt.Errorf("job %s: %w", d.Name, ErrConfigJob)
		}
		return fmt.Errorf("job %s: %w: remove it first (umbra jobs remove %s)", d.Name, ErrExists, d.Name)
	}
	js, err := check([]Def{d})
	if err != nil {
		return err
	}
	j := js[0]
	j.api = true
	if m.cfg.Validate != nil {
		if err := m.cfg.Validate(ctx, &j.Def); err != nil {
			return err
		}
	}
	st := &jobState{Def: &j.Def}
	if err := m.cfg.Catalog.Put(catalog.Jobs, d.Name, st); err != nil {
		return fmt.Errorf("job %s: keep its definition: %w", d.Name, err)
	}
	m.mu.Lock()
	m.states[d.Name] = st
	m.mu.Unlock()
	m.dmu.Lock()
	m.jobs[d.Name] = j
	m.order = append(m.order, d.Name)
	m.dmu.Unlock()
	return m.sched.Set(m.entries())
}

// Remove removes a job defined through the API; its recorded runs stay
// in the history until they age out.
func (m *Manager) Remove(name string) error {
	m.change.Lock()
	defer m.change.Unlock()
	j, err := m.job(name)
	if err != nil {
		return err
	}
	if !j.api {
		return fmt.Errorf("job %s: %w", name, ErrConfigJob)
	}
	m.mu.Lock()
	r := m.running[name]
	m.mu.Unlock()
	if r != nil {
		return fmt.Errorf("job %s: %w (run %d): wait for it (umbra jobs show %s)", name, ErrRunning, r.Seq, name)
	}
	if err := m.cfg.Catalog.Delete(catalog.Jobs, name); err != nil {
		return fmt.Errorf("job %s: forget its definition: %w", name, err)
	}
	m.dmu.Lock()
	delete(m.jobs, name)
	for i, n := range m.order {
		if n == name {
			m.order = append(m.order[:i:i], m.order[i+1:]...)
			break
		}
	}
	m.dmu.Unlock()
	m.mu.Lock()
	delete(m.states, name)
	m.mu.Unlock()
	return m.sched.Set(m.entries())
}

// loadAPIJobs adds the jobs defined through the API that the catalog
// keeps. A name the config now defines is the config's job; a stored
// definition that no longer checks is left out, and logged.
func (m *Manager) loadAPIJobs() error {
	var defs []Def
	err := catalog.Each(m.cfg.Catalog, catalog.Jobs, func(name string, st jobState) {
		if st.Def != nil {
			defs = append(defs, *st.Def)
		}
	}, nil)
	if err != nil {
		return err
	}
	for _, d := range defs {
		if cur := m.jobs[d.Name]; cur != nil {
			m.log.Warn("job defined both in the config file and through the API: the config file's is used", "job", d.Name)
			m.states[d.Name].Def = nil
			continue
		}
		js, err := check([]Def{d})
		if err != nil {
			m.log.Error("job defined through the API no longer valid: left out (umbra jobs remove it and add it again)", "job", d.Name, "err", err)
			continue
		}
		j := js[0]
		j.api = true
		st := &jobState{}
		if _, err := m.cfg.Catalog.Get(catalog.Jobs, d.Name, st); err != nil {
			return err
		}
		m.jobs[d.Name] = j
		m.order = append(m.order, d.Name)
		m.states[d.Name] = st
	}
	return nil
}
