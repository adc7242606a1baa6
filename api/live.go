package api

import (
	"context"
	"fmt"

	"umbra/api/umbrav1"
)

// LiveRestorer starts live restores and reports them: the service does,
// since a live restore adds a volume to it.
type LiveRestorer interface {
	// RestoreLive makes req's target a volume restored from req's image
	// and returns its name.
	RestoreLive(ctx context.Context, req *umbrav1.RestoreLiveRequest) (string, error)
	// LiveRestore reports the live restore of volume, or nil.
	LiveRestore(volume string) *umbrav1.LiveRestore
}

// ErrLiveRequest marks a live restore request that is refused as it
// stands (an InvalidArgument to the client).
var ErrLiveRequest = fmt.Errorf("live restore: %w", errBadRequest)

// RestoreLive starts a live restore through the service.
func (s *Server) RestoreLive(ctx context.Context, req *umbrav1.RestoreLiveRequest) (*umbrav1.RestoreLiveResponse, error) {
	if s.Live == nil {
		return nil, toStatus(fmt.Errorf("%w: this service cannot restore live", errBadRequest))
	}
	name, err := s.Live.RestoreLive(ctx, req)
	if err != nil {
		return nil, toStatus(err)
	}
	list, err := s.ListVolumes(ctx, &umbrav1.ListVolumesRequest{})
	if err != nil {
		return nil, err
	}
	for _, v := range list.Volumes {
		if v.Name == name {
			return &umbrav1.RestoreLiveResponse{Volume: v}, nil
		}
	}
	return nil, toStatus(fmt.Errorf("live restore of %s: volume %s is not listed", req.GetImage(), name))
}

// LiveRestoreEvent publishes a live restore's change of state (kind
// live_restore_started, live_restore_waiting, live_restore_resumed,
// live_restore_done).
func (s *Server) LiveRestoreEvent(kind, volume string, p *umbrav1.LiveRestore) {
	ev := &umbrav1.Event{Volume: volume}
	if p != nil {
		ev.State, ev.Message, ev.Done, ev.Total = p.State, p.Error, p.Restored, p.Size
	}
	s.emit(kind, ev)
}
