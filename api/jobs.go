package api

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"umbra/api/umbrav1"
)

// JobService answers the job calls: the service's jobs.Manager.
type JobService interface {
	ListJobs(context.Context, *umbrav1.ListJobsRequest) (*umbrav1.ListJobsResponse, error)
	GetJob(context.Context, *umbrav1.GetJobRequest) (*umbrav1.Job, error)
	RunJob(context.Context, *umbrav1.RunJobRequest) (*umbrav1.RunJobResponse, error)
	JobHistory(context.Context, *umbrav1.JobHistoryRequest) (*umbrav1.JobHistoryResponse, error)
	SetJobEnabled(context.Context, *umbrav1.SetJobEnabledRequest) (*umbrav1.Job, error)
	AddJob(context.Context, *umbrav1.AddJobRequest) (*umbrav1.Job, error)
	RemoveJob(context.Context, *umbrav1.RemoveJobRequest) (*umbrav1.RemoveJobResponse, error)
}

var errNoJobs = status.Error(codes.Unavailable, "this service runs no jobs")

// ListJobs lists the jobs with their last runs and next run.
func (s *Server) ListJobs(ctx context.Context, req *umbrav1.ListJobsRequest) (*umbrav1.ListJobsResponse, error) {
	if s.Jobs == nil {
		return nil, errNoJobs
	}
	return s.Jobs.ListJobs(ctx, req)
}

// GetJob tells one job.
func (s *Server) GetJob(ctx context.Context, req *umbrav1.GetJobRequest) (*umbrav1.Job, error) {
	if s.Jobs == nil {
		return nil, errNoJobs
	}
	return s.Jobs.GetJob(ctx, req)
}

// RunJob starts a run of a job now.
func (s *Server) RunJob(ctx context.Context, req *umbrav1.RunJobRequest) (*umbrav1.RunJobResponse, error) {
	if s.Jobs == nil {
		return nil, errNoJobs
	}
	return s.Jobs.RunJob(ctx, req)
}

// JobHistory lists recorded runs, newest first.
func (s *Server) JobHistory(ctx context.Context, req *umbrav1.JobHistoryRequest) (*umbrav1.JobHistoryResponse, error) {
	if s.Jobs == nil {
		return nil, errNoJobs
	}
	return s.Jobs.JobHistory(ctx, req)
}

// SetJobEnabled enables or disables a job.
func (s *Server) SetJobEnabled(ctx context.Context, req *umbrav1.SetJobEnabledRequest) (*umbrav1.Job, error) {
	if s.Jobs == nil {
		return nil, errNoJobs
	}
	return s.Jobs.SetJobEnabled(ctx, req)
}

// AddJob defines a job through the API.
func (s *Server) AddJob(ctx context.Context, req *umbrav1.AddJobRequest) (*umbrav1.Job, error) {
	if s.Jobs == nil {
		return nil, errNoJobs
	}
	return s.Jobs.AddJob(ctx, req)
}

// RemoveJob removes a job defined through the API.
func (s *Server) RemoveJob(ctx context.Context, req *umbrav1.RemoveJobRequest) (*umbrav1.RemoveJobResponse, error) {
	if s.Jobs == nil {
		return nil, errNoJobs
	}
	return s.Jobs.RemoveJob(ctx, req)
}

// JobEvent publishes a job's event (jobs.Config.Emit).
func (s *Server) JobEvent(kind, job, message string) {
	s.emit(kind, &umbrav1.Event{Job: job, Message: message})
}
