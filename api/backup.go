package api

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"umbra/api/umbrav1"
	"umbra/backup"
	"umbra/coordinator"
	"umbra/provider"
)

// baseSnapshotPrefix marks the snapshots a backup keeps as the base of
// the volume's next incremental image.
const baseSnapshotPrefix = "backup-"

// Backup runs a backup: one snapshot set, one image per volume.
func (s *Server) Backup(ctx context.Context, req *umbrav1.BackupRequest) (*umbrav1.BackupResponse, error) {
	if len(req.GetVolumes()) == 0 {
		return nil, toStatus(fmt.Errorf("%w: name at least one volume", errBadRequest))
	}
	repo, err := backup.Open(req.GetRepo())
	if err != nil {
		return nil, toStatus(fmt.Errorf("%w: %v", errBadRequest, err))
	}
	defer repo.Close()
	id := baseSnapshotPrefix + time.Now().UTC().Format("20060102T150405.000000Z")
	set, err := s.coord.CreateSet(ctx, coordinator.Request{Volumes: req.GetVolumes(), Writers: req.GetWriters(), ID: id})
	if err != nil {
		return nil, toStatus(err)
	}
	resp := &umbrav1.BackupResponse{SetId: set.ID, Writers: set.Writers}
	var failed error
	for _, sn := range set.Snapshots {
		res, err := s.backupOne(ctx, repo, sn, req.GetFull())
		if err != nil {
			failed = err
			break
		}
		resp.Images = append(resp.Images, res)
	}
	set.BackupComplete(ctx, failed == nil)
	if failed != nil {
		// The new snapshots are no base for anything: drop them.
		for _, sn := range set.Snapshots {
			if p, err := s.reg.Get(sn.Provider); err == nil {
				p.Delete(ctx, sn.Volume, sn.ID)
			}
		}
		return nil, toStatus(failed)
	}
	// The previous bases are superseded.
	for _, sn := range set.Snapshots {
		p, err := s.reg.Get(sn.Provider)
		if err != nil {
			continue
		}
		list, _ := p.List(ctx, sn.Volume)
		for _, old := range list {
			if strings.HasPrefix(old.ID, baseSnapshotPrefix) && old.ID != sn.ID {
				p.Delete(ctx, sn.Volume, old.ID)
			}
		}
	}
	s.log.Info("backup done", "set", set.ID, "images", len(resp.Images))
	return resp, nil
}

func (s *Server) backupOne(ctx context.Context, repo *backup.Repo, sn provider.Snapshot, full bool) (*umbrav1.ImageResult, error) {
	p, err := s.reg.Get(sn.Provider)
	if err != nil {
		return nil, err
	}
	img, err := p.Open(ctx, sn.Volume, sn.ID)
	if err != nil {
		return nil, fmt.Errorf("back up %s: %w", sn.Volume, err)
	}
	defer img.Close()
	opts := backup.Options{Volume: sn.Volume, Snapshot: sn.ID}
	res := &umbrav1.ImageResult{Volume: sn.Volume, Snapshot: sn.ID, Size: img.Size()}
	parent := repo.Latest(sn.Volume)
	tracker, canTrack := p.(provider.Tracker)
	switch {
	case full:
		res.WhyFull = "asked for a full image"
	case parent == nil:
		res.WhyFull = "no earlier image of this volume"
	case !canTrack:
		res.WhyFull = "the provider has no change tracking"
	default:
		bm, reliable, err := tracker.Changed(ctx, sn.Volume, parent.Snapshot, sn.ID)
		switch {
		case errors.Is(err, provider.ErrNotFound):
			res.WhyFull = "the previous image's snapshot is gone (e.g. a restart): reading everything, unchanged chunks deduplicate"
		case err != nil:
			return nil, err
		case !reliable:
			res.WhyFull = "change tracking is unreliable after an unclean stop: reading everything, unchanged chunks deduplicate"
		default:
			opts.Parent, opts.Changed = parent, bm
		}
	}
	if c, ok := img.(provider.Cursorer); ok {
		opts.Cursor = c.SetCursor
	}
	x, st, err := repo.Backup(ctx, img, opts)
	if err != nil {
		return nil, err
	}
	res.Image, res.Incremental = x.ID, st.Incremental
	res.BytesRead, res.BytesReused, res.BytesZero = st.Read, st.Reused, st.Zero
	res.BytesNew, res.BytesWritten, res.Seconds = st.Stored, st.Compressed, st.Seconds
	return res, nil
}
