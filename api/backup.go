package api

import (
	"context"
	"regexp"

	"errors"
	"fmt"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"time"

	"umbra/api/umbrav1"
	"umbra/backup"
	"umbra/coordinator"
	"umbra/cow"
	"umbra/provider"
)

// baseSnapshotPrefix marks the snapshots a backup keeps as the base of
// the volume's next incremental image into the same repository:
// "backup-REPO-TIME", REPO the first 8 hex digits of the repository's ID,
// so that a volume backed up into two repositories in turn (a local one
// nightly, S3 weekly) keeps one base for each and both stay incremental.
// Bases named "backup-TIME" (before 2026-11-24) served every repository.
const baseSnapshotPrefix = "backup-"

// baseTag is the part of a base's name that says which repository it
// serves.
func baseTag(repo *backup.Repo) string {
	id := repo.Config().ID
	return id[:min(8, len(id))]
}

// baseName matches the names backups give their bases: the repository
// tag (absent before 2026-11-24) and the time.
var baseName = regexp.MustCompile(`^backup-(?:([0-9a-f]{8})-)?[0-9]{8}T[0-9]{6}\.[0-9]{6}Z$`)

// supersededBase reports whether old, a snapshot of a volume just backed
// up into the repository tagged tag as snapshot current, is a base that
// the new one replaces: the repository's previous base, or one from
// before bases were per repository. Snapshots named otherwise, say a
// user's "backup-nightly", are not bases.
func supersededBase(old, current, tag string) bool {
	m := baseName.FindStringSubmatch(old)
	return old != current && m != nil && (m[1] == "" || m[1] == tag)
}

// Backup runs a backup: one snapshot set, one image per volume.
func (s *Server) Backup(ctx context.Context, req *umbrav1.BackupRequest) (*umbrav1.BackupResponse, error) {
	return s.runBackup(ctx, req, nil)
}

// BackupStream is Backup with progress events.
func (s *Server) BackupStream(req *umbrav1.BackupRequest, stream umbrav1.Umbra_BackupStreamServer) error {
	var last time.Time
	progress := func(p *umbrav1.BackupProgress) {
		// At most ten events a second, and always the last one.
		if now := time.Now(); now.Sub(last) >= 100*time.Millisecond || p.Done == p.Total {
			last = now
			stream.Send(&umbrav1.BackupEvent{Event: &umbrav1.BackupEvent_Progress{Progress: p}})
		}
	}
	resp, err := s.runBackup(stream.Context(), req, progress)
	if err != nil {
		return err
	}
	return stream.Send(&umbrav1.BackupEvent{Event: &umbrav1.BackupEvent_Done{Done: resp}})
}

// runBackup runs a backup; one that fails or is cancelled is in the
// service's log as well as the audit log (which records requests, not
// what became of a long job).
func (s *Server) runBackup(ctx context.Context, req *umbrav1.BackupRequest, progress func(*umbrav1.BackupProgress)) (*umbrav1.BackupResponse, error) {
	start := time.Now()
	resp, err := s.backupSet(ctx, req, progress)
	if err != nil {
		msg := "backup failed"
		if ctx.Err() != nil {
			msg = "backup cancelled"
		}
		s.log.Error(msg, "volumes", req.GetVolumes(), "repo", req.GetRepo(), "after", time.Since(start).Round(time.Millisecond), "err", err)
	}
	return resp, err
}

func (s *Server) backupSet(ctx context.Context, req *umbrav1.BackupRequest, progress func(*umbrav1.BackupProgress)) (*umbrav1.BackupResponse, error) {
	if len(req.GetVolumes()) == 0 {
		return nil, toStatus(fmt.Errorf("%w: name at least one volume", errBadRequest))
	}
	for _, vol := range req.GetVolumes() {
		// Before any snapshot is taken: can each volume be imaged at all?
		if p, err := s.reg.For(ctx, vol); err == nil && !p.Capabilities().BlockImage {
			return nil, toStatus(fmt.Errorf("%w: volume %s (%s provider) cannot be imaged: its snapshots are directories, not block images; back its files up with a file-level tool from a snapshot (umbra snapshot create, then its path)", errBadRequest, vol, p.Name()))
		}
	}
	repo, release, err := s.openRepo(ctx, req)
	if err != nil {
		if errors.Is(err, backup.ErrWrongPassword) || errors.Is(err, backup.ErrNeedPassword) {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
		return nil, toStatus(fmt.Errorf("%w: %v", errBadRequest, err))
	}
	defer release()
	defer s.saveWriters() // their history, failures included
	tag := baseTag(repo)
	id := baseSnapshotPrefix + tag + "-" + time.Now().UTC().Format("20060102T150405.000000Z")
	set, err := s.coord.CreateSet(ctx, coordinator.Request{Volumes: req.GetVolumes(), Writers: req.GetWriters(), ID: id})
	if err != nil {
		return nil, toStatus(err)
	}
	s.Metrics.ObserveSet(set.Timings.Hold, set.Timings.FreezeToThaw)
	resp := &umbrav1.BackupResponse{SetId: set.ID, Writers: set.Writers}
	var failed error
	for _, sn := range set.Snapshots {
		res, err := s.backupOne(ctx, repo, sn, req.GetFull(), progress)
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
	// This repository's previous bases are superseded; other
	// repositories' stay, as the bases of their own next incrementals.
	for _, sn := range set.Snapshots {
		p, err := s.reg.Get(sn.Provider)
		if err != nil {
			continue
		}
		list, _ := p.List(ctx, sn.Volume)
		for _, old := range list {
			if supersededBase(old.ID, sn.ID, tag) {
				p.Delete(ctx, sn.Volume, old.ID)
			}
		}
	}
	s.log.Info("backup done", "set", set.ID, "images", len(resp.Images))
	return resp, nil
}

func (s *Server) backupOne(ctx context.Context, repo *backup.Repo, sn provider.Snapshot, full bool, progress func(*umbrav1.BackupProgress)) (*umbrav1.ImageResult, error) {
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
	opts.Allocated = allocation(img)
	var lastEvent time.Time
	opts.Progress = func(done, total int64) {
		if progress != nil {
			progress(&umbrav1.BackupProgress{Volume: sn.Volume, Done: done, Total: total})
		}
		if now := time.Now(); now.Sub(lastEvent) >= time.Second || done == total {
			lastEvent = now
			s.emit("backup_progress", &umbrav1.Event{Volume: sn.Volume, Snapshot: sn.ID, Done: done, Total: total})
		}
	}
	x, st, err := repo.Backup(ctx, img, opts)
	if err != nil {
		if errors.Is(err, backup.ErrLocked) {
			return nil, status.Error(codes.FailedPrecondition, err.Error())
		}
		return nil, err
	}
	res.Image, res.Incremental = x.ID, st.Incremental
	if st.WhyFull != "" {
		res.WhyFull = st.WhyFull
	}
	res.BytesRead, res.BytesReused, res.BytesZero = st.Read, st.Reused, st.Zero
	res.BytesNew, res.BytesWritten, res.Seconds = st.Stored, st.Compressed, st.Seconds
	res.BytesUnallocated, res.BytesDeduplicated, res.BytesIndex = st.Unallocated, st.Dedup, st.Index
	s.emit("backup_done", &umbrav1.Event{Volume: sn.Volume, Snapshot: sn.ID, Message: "image " + x.ID, Done: st.Read, Total: res.Size})
	return res, nil
}

// allocation finds where an image may hold data, so that holes are not
// read: the COW engine's allocation map, or SEEK_DATA on a file.
func allocation(img provider.Image) func(off, n int64) ([]backup.Range, error) {
	switch a := img.(type) {
	case interface {
		Allocation(off, n int64) ([]cow.Extent, error)
	}:
		return func(off, n int64) ([]backup.Range, error) {
			ext, err := a.Allocation(off, n)
			if err != nil {
				return nil, err
			}
			var out []backup.Range
			for _, e := range ext {
				if !e.Hole && !e.Zero {
					out = append(out, backup.Range{Off: e.Off, Len: e.Len})
				}
			}
			return out, nil
		}
	case interface{ Fd() uintptr }:
		return backup.FileAllocation(a)
	}
	return nil
}
