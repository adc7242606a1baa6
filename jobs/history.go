package jobs

import (
	"fmt"
	"slices"
	"time"

	"umbra/catalog"
)

// Results of a run.
const (
	Running     = "running"     // in progress (a record left so by a dead service is interrupted at the next start)
	Success     = "success"     //
	Failed      = "failed"      // the run's error says why
	Skipped     = "skipped"     // not run: the previous run was still running
	Missed      = "missed"      // not run: the service was down at its time, and the job does not catch up
	Interrupted = "interrupted" // the service died during the run
	Cancelled   = "cancelled"   // the service stopped during the run, or its timeout passed
)

// Triggers of a run.
const (
	TriggerSchedule = "schedule"
	TriggerCatchUp  = "catch-up" // a run missed while the service was down, run at start
	TriggerManual   = "manual"   // umbra jobs run
)

// Run is one run of a job as the catalog keeps it.
type Run struct {
	Job     string    `json:"job"`
	Seq     uint64    `json:"seq"` // the run's number within the job
	Kind    string    `json:"kind"`
	Trigger string    `json:"trigger"`
	Start   time.Time `json:"start"`
	End     time.Time `json:"end,omitzero"`
	Result  string    `json:"result"`
	Bytes   int64     `json:"bytes"`
	Error   string    `json:"error,omitempty"`
	Detail  string    `json:"detail,omitempty"`
}

// ID names a run: JOB#SEQ.
func (r Run) ID() string { return fmt.Sprintf("%s#%d", r.Job, r.Seq) }

// history keeps runs in the catalog: a bounded log per job.
type history struct{ cat *catalog.Catalog }

func (h history) add(r *Run, keep int) error {
	seq, err := h.cat.Append(catalog.JobRuns, r.Job, r, keep)
	if err != nil {
		return fmt.Errorf("job %s: record run: %w", r.Job, err)
	}
	r.Seq = seq // readers take it from the record's key
	return nil
}

func (h history) update(r *Run) error {
	if err := h.cat.Replace(catalog.JobRuns, r.Job, r.Seq, r); err != nil {
		return fmt.Errorf("job %s: record run %d: %w", r.Job, r.Seq, err)
	}
	return nil
}

// list returns up to limit runs of job ("" every job), newest first.
func (h history) list(job string, limit int) ([]Run, error) {
	var out []Run
	err := catalog.EachLog(h.cat, catalog.JobRuns, job, func(_ string, seq uint64, r Run) bool {
		r.Seq = seq
		out = append(out, r)
		return limit <= 0 || len(out) < limit || job == ""
	})
	if job == "" {
		sortNewest(out)
		if limit > 0 && len(out) > limit {
			out = out[:limit]
		}
	}
	return out, err
}

// last finds job's last ended run and when its last success ended,
// reading the history back only as far as that success.
func (h history) last(job string) (last *Run, success time.Time) {
	catalog.EachLog(h.cat, catalog.JobRuns, job, func(_ string, seq uint64, r Run) bool {
		if r.Result == Running {
			return true
		}
		r.Seq = seq
		if last == nil {
			last = &r
		}
		if r.Result == Success {
			success = r.End
			return false
		}
		return true
	})
	return last, success
}

// interrupted marks the runs left running by a service that died:
// nothing of this service can be running yet.
func (h history) interrupted(now time.Time) ([]Run, error) {
	var left []Run
	err := catalog.EachLog(h.cat, catalog.JobRuns, "", func(_ string, seq uint64, r Run) bool {
		if r.Result == Running {
			r.Seq = seq
			left = append(left, r)
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	for i := range left {
		r := &left[i]
		r.Result, r.End = Interrupted, now
		r.Error = "the service stopped during this run (killed or crashed): its work may be partial; the next run starts over"
		if err := h.update(r); err != nil {
			return nil, err
		}
	}
	return left, nil
}

func sortNewest(runs []Run) {
	slices.SortStableFunc(runs, func(a, b Run) int { return b.Start.Compare(a.Start) })
}
