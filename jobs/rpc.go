package jobs

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"umbra/api/umbrav1"
)

// The Manager answers the API's job calls (api.Server delegates them).

// jobsStatus maps the package's errors to gRPC codes.
func jobsStatus(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrNoJob):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, ErrExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.As(err, new(*DefError)):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, ErrDisabled), errors.Is(err, ErrRunning), errors.Is(err, ErrConfigJob):
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func jobRunMsg(r *Run) *umbrav1.JobRun {
	if r == nil {
		return nil
	}
	return &umbrav1.JobRun{Job: r.Job, Seq: r.Seq, Kind: r.Kind, Trigger: r.Trigger, Start: ts(r.Start), End: ts(r.End),
		Result: r.Result, Bytes: r.Bytes, Error: r.Error, Detail: r.Detail}
}

func jobMsg(st Status) *umbrav1.Job {
	var def strings.Builder
	toml.NewEncoder(&def).Encode(struct {
		Job []Def `toml:"job"`
	}{[]Def{st.Def}})
	return &umbrav1.Job{Name: st.Name, Kind: st.Kind, Schedule: st.Schedule, Enabled: st.Enabled,
		Running: jobRunMsg(st.Running), Last: jobRunMsg(st.Last), LastSuccess: ts(st.LastSuccess), Next: ts(st.Next),
		Volumes: st.Volumes, Repo: st.Repo, Definition: def.String(), Source: st.Source}
}

// ListJobs lists the jobs with their last runs and next run.
func (m *Manager) ListJobs(ctx context.Context, _ *umbrav1.ListJobsRequest) (*umbrav1.ListJobsResponse, error) {
	out := &umbrav1.ListJobsResponse{}
	for _, st := range m.List() {
		out.Jobs = append(out.Jobs, jobMsg(st))
	}
	return out, nil
}

// GetJob tells one job.
func (m *Manager) GetJob(ctx context.Context, req *umbrav1.GetJobRequest) (*umbrav1.Job, error) {
	st, err := m.Get(req.GetName())
	if err != nil {
		return nil, jobsStatus(err)
	}
	return jobMsg(st), nil
}

// RunJob starts a run of a job now.
func (m *Manager) RunJob(ctx context.Context, req *umbrav1.RunJobRequest) (*umbrav1.RunJobResponse, error) {
	if err := m.RunNow(req.GetName()); err != nil {
		return nil, jobsStatus(err)
	}
	return &umbrav1.RunJobResponse{}, nil
}

// JobHistory lists recorded runs, newest first.
func (m *Manager) JobHistory(ctx context.Context, req *umbrav1.JobHistoryRequest) (*umbrav1.JobHistoryResponse, error) {
	if req.GetLimit() < 0 {
		return nil, status.Error(codes.InvalidArgument, "limit: want 0 (all kept) or more")
	}
	runs, err := m.History(req.GetName(), int(req.GetLimit()))
	if err != nil {
		return nil, jobsStatus(err)
	}
	out := &umbrav1.JobHistoryResponse{}
	for i := range runs {
		out.Runs = append(out.Runs, jobRunMsg(&runs[i]))
	}
	return out, nil
}

// SetJobEnabled enables or disables a job.
func (m *Manager) SetJobEnabled(ctx context.Context, req *umbrav1.SetJobEnabledRequest) (*umbrav1.Job, error) {
	if err := m.SetEnabled(req.GetName(), req.GetEnabled()); err != nil {
		return nil, jobsStatus(err)
	}
	st, err := m.Get(req.GetName())
	if err != nil {
		return nil, jobsStatus(err)
	}
	word := "disabled"
	if req.GetEnabled() {
		word = "enabled"
	}
	m.log.Info("job "+word, "job", req.GetName())
	return jobMsg(st), nil
}

// AddJob defines a job through the API.
func (m *Manager) AddJob(ctx context.Context, req *umbrav1.AddJobRequest) (*umbrav1.Job, error) {
	d, err := ParseDef(req.GetName(), req.GetDefinition())
	if err != nil {
		return nil, jobsStatus(err)
	}
	if err := m.Add(ctx, d); err != nil {
		return nil, jobsStatus(err)
	}
	st, err := m.Get(d.Name)
	if err != nil {
		return nil, jobsStatus(err)
	}
	m.log.Info("job added", "job", d.Name, "kind", d.Kind, "schedule", d.Schedule)
	return jobMsg(st), nil
}

// RemoveJob removes a job defined through the API.
func (m *Manager) RemoveJob(ctx context.Context, req *umbrav1.RemoveJobRequest) (*umbrav1.RemoveJobResponse, error) {
	if err := m.Remove(req.GetName()); err != nil {
		return nil, jobsStatus(err)
	}
	m.log.Info("job removed", "job", req.GetName())
	return &umbrav1.RemoveJobResponse{}, nil
}
