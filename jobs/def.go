package jobs

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"

	"umbra/jobs/calendar"
)

// Def is one job as the TOML config's [[job]] table gives it. The fields
// after Kind-independent ones are read by the kinds that need them; a
// kind refuses the fields it does not use (check in its file), so that
// a misplaced field is an error, not silently ignored.
type Def struct {
	Name     string `toml:"name"`
	Kind     string `toml:"kind"`     // snapshot, backup, verify, sync
	Schedule string `toml:"schedule"` // systemd calendar syntax: hourly, Mon..Fri 07,12:00, *:0/15
	// Disabled starts the job disabled; `umbra jobs enable|disable`
	// changes that, and the catalog keeps what they said.
	Disabled bool `toml:"disabled,omitempty"`
	// RandomDelay delays each scheduled run by up to this much (e.g.
	// "10m"), to spread the load of many jobs at one time.
	RandomDelay string `toml:"random_delay,omitempty"`
	// CatchUp runs once at start a run missed while the service was
	// down (systemd's Persistent=true); default true.
	CatchUp *bool `toml:"catch_up,omitempty"`
	// History is how many runs `umbra jobs history` keeps (default 100).
	History int `toml:"history,omitzero"`
	// Timeout bounds one run (default: none).
	Timeout string `toml:"timeout,omitempty"`

	// snapshot, backup
	Volumes []string `toml:"volumes,omitempty"`
	Writers bool     `toml:"writers,omitempty"` // freeze the writers (application-consistent)
	// snapshot: persistent snapshots survive a restart (default true)
	Persistent *bool `toml:"persistent,omitempty"`
	// backup, verify
	Repo         string `toml:"repo,omitempty"`          // a directory or s3://HOST/BUCKET[/PREFIX]
	PasswordFile string `toml:"password_file,omitempty"` // the repository's password (default: the service's $UMBRA_PASSWORD)
	// backup: read everything even when change tracking allows less
	Full bool `toml:"full,omitempty"`
	// snapshot: the timeline's limits; backup: prune's keep rules
	Keep Keep `toml:"keep,omitempty,omitzero"`
	// sync: the repository the images of repo are copied into, and its
	// password (default: the service's $UMBRA_TO_PASSWORD)
	To             string `toml:"to,omitempty"`
	ToPasswordFile string `toml:"to_password_file,omitempty"`
	// verify: re-verify an image verified more than this many days ago
	// (default 0: every image every run)
	ReverifyDays int `toml:"reverify_days,omitzero"`
	// verify: check this fraction of the chunks (0 < sample < 1), not
	// all of them
	Sample float64 `toml:"sample,omitzero"`
}

// Keep is how many snapshots or images a job keeps. Snapshot timelines
// use Hourly..Yearly and Count (snapper's timeline limits and number
// cap, and MinAge); backup jobs use Last and Hourly..Monthly (prune's keep rules).
type Keep struct {
	Last    int `toml:"last,omitzero"`
	Hourly  int `toml:"hourly,omitzero"`
	Daily   int `toml:"daily,omitzero"`
	Weekly  int `toml:"weekly,omitzero"`
	Monthly int `toml:"monthly,omitzero"`
	Yearly  int `toml:"yearly,omitzero"`
	Count   int `toml:"count,omitzero"`
	// MinAge keeps a timeline's snapshots younger than this (default
	// 30m; "0s": none).
	MinAge string `toml:"min_age,omitempty"`
}

func (k Keep) empty() bool { return k == Keep{} }

// DefaultHistory is how many runs of a job the catalog keeps.
const DefaultHistory = 100

// MaxHistory bounds Def.History.
const MaxHistory = 10000

// job is a checked Def.
type job struct {
	Def
	spec        *calendar.Spec
	randomDelay time.Duration
	timeout     time.Duration
	catchUp     bool
	history     int
	kind        *Kind
	api         bool // defined through the API, not the config file
}

// nameRE is compiled on first use, by the service: its bounded
// repetition costs every command's start ~0.5 ms otherwise.
var nameRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`) })

// DefError is a job definition the service refuses; it names the job
// and the field.
type DefError struct {
	Job   string // the job's name, or "#N" for a job without one
	Field string
	Err   error
}

func (e *DefError) Error() string {
	if e.Field == "" {
		return fmt.Sprintf("job %s: %v", e.Job, e.Err)
	}
	return fmt.Sprintf("job %s: %s: %v", e.Job, e.Field, e.Err)
}

func (e *DefError) Unwrap() error { return e.Err }

// fieldErr makes a DefError of job d.
func fieldErr(d *Def, field, format string, a ...any) error {
	return &DefError{Job: d.Name, Field: field, Err: fmt.Errorf(format, a...)}
}

// Check checks job definitions: names unique and well formed, a known
// kind, a schedule that parses, and each kind's own fields. The first
// problem is returned as a *DefError.
func Check(defs []Def) error {
	_, err := check(defs)
	return err
}

func check(defs []Def) ([]*job, error) {
	seen := map[string]bool{}
	var out []*job
	for i := range defs {
		d := defs[i]
		if d.Name == "" {
			return nil, &DefError{Job: fmt.Sprintf("#%d", i+1), Field: "name", Err: errors.New("missing: give each [[job]] a name")}
		}
		if !nameRE().MatchString(d.Name) {
			return nil, &DefError{Job: fmt.Sprintf("%q", d.Name), Field: "name", Err: errors.New("want 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")}
		}
		if seen[d.Name] {
			return nil, fieldErr(&d, "name", "defined twice: job names must be unique")
		}
		seen[d.Name] = true
		j, err := checkOne(d)
		if err != nil {
			return nil, err
		}
		out = append(out, j)
	}
	return out, nil
}

func checkOne(d Def) (*job, error) {
	j := &job{Def: d, catchUp: true, history: DefaultHistory}
	k, ok := kinds[d.Kind]
	if !ok {
		return nil, fieldErr(&d, "kind", "%q: want one of %s", d.Kind, strings.Join(KindNames(), ", "))
	}
	j.kind = k
	if d.Schedule == "" {
		return nil, fieldErr(&d, "schedule", "missing: give a calendar expression such as \"hourly\", \"*-*-* 02:00\" or \"Mon..Fri 07,12:00\"")
	}
	spec, err := calendar.Parse(d.Schedule)
	if err != nil {
		return nil, fieldErr(&d, "schedule", "%w", err)
	}
	j.spec = spec
	if j.randomDelay, err = duration(&d, "random_delay", d.RandomDelay); err != nil {
		return nil, err
	}
	if j.timeout, err = duration(&d, "timeout", d.Timeout); err != nil {
		return nil, err
	}
	if d.CatchUp != nil {
		j.catchUp = *d.CatchUp
	}
	switch {
	case d.History < 0 || d.History > MaxHistory:
		return nil, fieldErr(&d, "history", "%d: want 1 to %d runs (0: %d)", d.History, MaxHistory, DefaultHistory)
	case d.History > 0:
		j.history = d.History
	}
	if err := k.Check(&d); err != nil {
		return nil, err
	}
	return j, nil
}

// duration parses a field that is a Go duration ("" is 0).
func duration(d *Def, field, s string) (time.Duration, error) {
	if s == "" {
		return 0, nil
	}
	v, err := time.ParseDuration(s)
	if err != nil || v < 0 {
		return 0, fieldErr(d, field, "%q: want a duration such as 90s, 10m or 2h", s)
	}
	return v, nil
}

// unused refuses the fields a kind does not read.
func unused(d *Def, fields ...string) error {
	set := map[string]bool{
		"volumes":          len(d.Volumes) > 0,
		"writers":          d.Writers,
		"persistent":       d.Persistent != nil,
		"repo":             d.Repo != "",
		"password_file":    d.PasswordFile != "",
		"full":             d.Full,
		"keep":             !d.Keep.empty(),
		"reverify_days":    d.ReverifyDays != 0,
		"sample":           d.Sample != 0,
		"to":               d.To != "",
		"to_password_file": d.ToPasswordFile != "",
	}
	for _, f := range fields {
		if set[f] {
			return fieldErr(d, f, "a %s job has no %s", d.Kind, f)
		}
	}
	return nil
}

// needVolumes checks the volumes field.
func needVolumes(d *Def) error {
	if len(d.Volumes) == 0 {
		return fieldErr(d, "volumes", "missing: name the volumes (one, or several taken as one set)")
	}
	seen := map[string]bool{}
	for _, v := range d.Volumes {
		if v == "" || seen[v] {
			return fieldErr(d, "volumes", "%q: empty or named twice", v)
		}
		seen[v] = true
	}
	return nil
}

// needRepo checks the repository fields.
func needRepo(d *Def) error {
	if d.Repo == "" {
		return fieldErr(d, "repo", "missing: give the repository, a directory or s3://HOST/BUCKET[/PREFIX]")
	}
	if !strings.Contains(d.Repo, "://") && !strings.HasPrefix(d.Repo, "/") {
		return fieldErr(d, "repo", "%q: a local repository must be an absolute path", d.Repo)
	}
	return nil
}
