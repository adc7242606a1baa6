package web

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"umbra/api"
	"umbra/api/umbrav1"
)

// Source is what the overview and volume pages render from: the API's
// list methods, called as the logged-in user. The benchmark gives a
// made-up one of the same shape (many volumes and snapshots without
// making them).
type Source interface {
	Volumes(ctx context.Context, c api.Caller) ([]*umbrav1.Volume, error)
	// Snapshots lists a volume's snapshots ("": every volume's).
	Snapshots(ctx context.Context, c api.Caller, volume string) ([]*umbrav1.Snapshot, error)
	Writers(ctx context.Context, c api.Caller) ([]*umbrav1.Writer, error)
	Mappings(ctx context.Context, c api.Caller) ([]*umbrav1.ShareMapping, error)
	// Jobs lists the scheduled jobs (none: jobs are not configured).
	Jobs(ctx context.Context, c api.Caller) ([]*umbrav1.Job, error)
}

// apiSource is the service's API server.
type apiSource struct{ s *api.Server }

func (a apiSource) Volumes(ctx context.Context, c api.Caller) ([]*umbrav1.Volume, error) {
	r, err := api.Call(ctx, a.s, c, "ListVolumes", &umbrav1.ListVolumesRequest{}, a.s.ListVolumes)
	return r.GetVolumes(), err
}

func (a apiSource) Snapshots(ctx context.Context, c api.Caller, volume string) ([]*umbrav1.Snapshot, error) {
	r, err := api.Call(ctx, a.s, c, "ListSnapshots", &umbrav1.ListSnapshotsRequest{Volume: volume}, a.s.ListSnapshots)
	return r.GetSnapshots(), err
}

func (a apiSource) Writers(ctx context.Context, c api.Caller) ([]*umbrav1.Writer, error) {
	r, err := api.Call(ctx, a.s, c, "ListWriters", &umbrav1.ListWritersRequest{}, a.s.ListWriters)
	return r.GetWriters(), err
}

func (a apiSource) Mappings(ctx context.Context, c api.Caller) ([]*umbrav1.ShareMapping, error) {
	r, err := api.Call(ctx, a.s, c, "ListShareMappings", &umbrav1.ListShareMappingsRequest{}, a.s.ListShareMappings)
	return r.GetMappings(), err
}

func (a apiSource) Jobs(ctx context.Context, c api.Caller) ([]*umbrav1.Job, error) {
	r, err := api.Call(ctx, a.s, c, "ListJobs", &umbrav1.ListJobsRequest{}, a.s.ListJobs)
	if status.Code(err) == codes.Unavailable { // a service without a job manager
		return nil, nil
	}
	return r.GetJobs(), err
}
