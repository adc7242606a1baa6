package api

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"umbra/api/umbrav1"
	"umbra/catalog"
	"umbra/coordinator"
	"umbra/cow"
	"umbra/expose"
	"umbra/frontend"
	"umbra/fsrvp"
	"umbra/provider"
	"umbra/writer"
)

// DefaultSetTimeout is FSRVP's message sequence timer (see fsrvp).
const DefaultSetTimeout = fsrvp.DefaultTimeout

// exposure is one share mapping, as kept in the catalog.
type exposure struct {
	SetID     string        `json:"set_id,omitempty"`
	ShadowID  string        `json:"shadow_id,omitempty"`
	SharePath string        `json:"share_path,omitempty"`
	Volume    string        `json:"volume"`
	Snapshot  string        `json:"snapshot"`
	Mount     *expose.Mount `json:"mount,omitempty"`
	Path      string        `json:"path,omitempty"`
	Created   time.Time     `json:"created"`
}

func exposureKey(vol, snap string) string { return vol + "@" + snap }

// shares holds the FSRVP sets (their state machine is package fsrvp)
// and the exposures; mu serializes every change of an exposure so the
// catalog and the kernel state (mounts) move together. A set's step
// takes the sets' lock, then mu (never the other way round).
type shares struct {
	cat     *catalog.Catalog
	root    string // where exposures are mounted
	fuseDir string // the service's FUSE files (COW snapshots as block files)
	sets    *fsrvp.Sets

	mu      sync.Mutex // guards the fields below
	exposed map[string]*exposure

	configured map[string]cow.StorageInfo // each volume's storage as configured at start
}

// storageRecord is a storage association changed through the API, with
// the configuration it overrode.
type storageRecord struct {
	Dir    string          `json:"dir"`
	Max    int64           `json:"max"`
	Policy string          `json:"policy"`
	Config cow.StorageInfo `json:"config"`
}

var errNoShares = status.Error(codes.FailedPrecondition, "shadow copy sets and exposure need the service's catalog: start umbra serve with a state directory")

// EnableShares turns on FSRVP sets and exposure, kept in cat, mounting
// under root; fuseDir is where the service serves its FUSE files ("" if
// it does not). It reconciles the catalog with the providers: sets left
// unfinished by a stop are aborted and cleaned, records of snapshots
// that are gone are dropped, and exposures are made again.
func (s *Server) EnableShares(ctx context.Context, cat *catalog.Catalog, root, fuseDir string, timeout time.Duration) {
	sh := &shares{cat: cat, root: root, fuseDir: fuseDir, exposed: map[string]*exposure{}}
	sh.sets = fsrvp.New(cat, setHost{s}, timeout, s.log)
	s.sh = sh
	sh.mu.Lock()
	s.restoreStorage()
	if s.writers != nil {
		var saved []writer.State
		catalog.Each(cat, catalog.Writers, func(_ string, st writer.State) { saved = append(saved, st) }, nil)
		s.writers.Restore(saved)
	}
	catalog.Each(cat, catalog.Exposures, func(id string, e exposure) { sh.exposed[id] = &e },
		func(id string, err error) {
			s.log.Warn("catalog: unreadable exposure dropped", "id", id, "err", err)
			cat.Delete(catalog.Exposures, id)
		})
	sh.mu.Unlock()
	sh.sets.Restore(ctx) // aborts unfinished sets: their exposures go
	sh.mu.Lock()
	defer sh.mu.Unlock()
	for key, e := range sh.exposed {
		if !s.snapshotExists(ctx, e.Volume, e.Snapshot) {
			s.log.Warn("exposed snapshot is gone: dropping its share mapping", "snapshot", key)
			if e.Mount != nil {
				e.Mount.Unmount()
			}
			delete(sh.exposed, key)
			cat.Delete(catalog.Exposures, key)
			continue
		}
		if e.Mount != nil { // a mount of the previous run: make it again
			dir := e.Mount.Dir
			e.Mount.Unmount()
			m, err := s.mountSnapshot(ctx, e.Volume, e.Snapshot, dir)
			if err != nil {
				s.log.Error("cannot mount an exposed snapshot again; it stays an NBD export", "snapshot", key, "err", err)
			}
			e.Mount = m
			cat.Put(catalog.Exposures, key, e)
		}
	}
}

// CloseShares unmounts the exposures (their records stay: the next start
// mounts them again) and closes the catalog.
func (s *Server) CloseShares() {
	sh := s.sh
	if sh == nil {
		return
	}
	sh.sets.Close()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	for _, e := range sh.exposed {
		if e.Mount != nil {
			e.Mount.Unmount()
		}
	}
	sh.cat.Close()
}

func (s *Server) snapshotExists(ctx context.Context, vol, id string) bool {
	if vol == "" || id == "" {
		return false
	}
	p, err := s.reg.For(ctx, vol)
	if err != nil {
		return false
	}
	list, err := p.List(ctx, vol)
	if err != nil {
		return false
	}
	for _, sn := range list {
		if sn.ID == id {
			return true
		}
	}
	return false
}

func (s *Server) GetSupportedVersion(context.Context, *umbrav1.GetSupportedVersionRequest) (*umbrav1.GetSupportedVersionResponse, error) {
	return &umbrav1.GetSupportedVersionResponse{MinVersion: 1, MaxVersion: 2}, nil
}

func (s *Server) SetContext(ctx context.Context, req *umbrav1.SetContextRequest) (*umbrav1.SetContextResponse, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	if err := s.sh.sets.SetContext(req.GetContext()); err != nil {
		return nil, setStatus(err)
	}
	return &umbrav1.SetContextResponse{}, nil
}

// resolvePath finds the volume a share path lives on: a volume name, a
// path on a filesystem mounted from a COW volume (through a loop device
// over its FUSE file), a reflink file or a btrfs subvolume.
func (s *Server) resolvePath(ctx context.Context, path string) (vol, prov string, err error) {
	if path == "" {
		return "", "", fmt.Errorf("%w: empty path", errBadRequest)
	}
	if p, err := s.reg.For(ctx, path); err == nil {
		return path, p.Name(), nil
	}
	if !filepath.IsAbs(path) {
		return "", "", fmt.Errorf("%w: %s: not a volume, and not an absolute path", provider.ErrNotFound, path)
	}
	path = filepath.Clean(path)
	if s.sh != nil && s.sh.fuseDir != "" {
		var vols []writer.Volume
		for _, v := range s.cow.Volumes() {
			vols = append(vols, writer.Volume{Name: v.Name(), Devices: []string{filepath.Join(s.sh.fuseDir, v.Name())}})
		}
		resolved, _ := writer.ResolveMounts(vols)
		best, bestLen := "", -1
		for _, v := range resolved {
			for _, m := range v.Mounts {
				if writer.Under(path, m) && len(m) > bestLen {
					best, bestLen = v.Name, len(m)
				}
			}
		}
		if best != "" {
			return best, cow.ProviderName, nil
		}
	}
	for dir := path; dir != "/" && dir != "."; dir = filepath.Dir(dir) {
		if p, err := s.reg.For(ctx, dir); err == nil {
			return dir, p.Name(), nil
		}
	}
	return "", "", fmt.Errorf("%w: %s is on no Umbra volume (a COW volume's filesystem mounted through its FUSE file, a reflink file or a btrfs subvolume)", provider.ErrNotFound, path)
}

func (s *Server) IsPathSupported(ctx context.Context, req *umbrav1.PathRequest) (*umbrav1.PathSupportResponse, error) {
	vol, prov, err := s.resolvePath(ctx, req.GetPath())
	if err != nil {
		return &umbrav1.PathSupportResponse{WhyNot: err.Error()}, nil
	}
	return &umbrav1.PathSupportResponse{Supported: true, Volume: vol, Provider: prov}, nil
}

func (s *Server) IsPathShadowCopied(ctx context.Context, req *umbrav1.PathRequest) (*umbrav1.PathShadowCopiedResponse, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	vol, _, err := s.resolvePath(ctx, req.GetPath())
	if err != nil {
		return nil, toStatus(err)
	}
	ids := s.sh.sets.ShadowCopied(vol)
	return &umbrav1.PathShadowCopiedResponse{ShadowCopied: len(ids) > 0, SetIds: ids}, nil
}

// setHost is what the FSRVP sets act on: the service's coordinator,
// providers and exposures.
type setHost struct{ s *Server }

func (h setHost) Supports(ctx context.Context, m fsrvp.Member) error {
	p, err := h.s.reg.Get(m.Provider)
	if err == nil {
		err = p.Supports(ctx, m.Volume)
	}
	return err
}

func (h setHost) CommitSet(ctx context.Context, id string, vols []string, writers, persistent bool) ([]provider.Snapshot, error) {
	s := h.s
	if writers {
		defer s.saveWriters() // their history, failures included
	}
	set, err := s.coord.CreateSet(ctx, coordinator.Request{Volumes: vols, Writers: writers, Persistent: persistent, ID: id})
	if err != nil {
		return nil, err
	}
	set.Done()
	s.Metrics.ObserveSet(set.Timings.Hold, set.Timings.FreezeToThaw)
	return set.Snapshots, nil
}

func (h setHost) Expose(ctx context.Context, st fsrvp.Set, m fsrvp.Member, mount bool) error {
	s := h.s
	dir := filepath.Join(s.sh.root, st.ID, strings.ReplaceAll(strings.Trim(m.Volume, "/"), "/", "_"))
	s.sh.mu.Lock()
	defer s.sh.mu.Unlock()
	_, err := s.exposeLocked(ctx, m.Volume, m.Snapshot, dir, mount, &exposure{SetID: st.ID, ShadowID: m.ShadowID, SharePath: m.Path})
	return err
}

// Drop unexposes a set's shadow copy and deletes it. The FSRVP client
// asked for it, and the loop device of the exposure just removed lets go
// of the snapshot's FUSE file a moment later, so it is deleted even in
// use; whom that cut off is logged.
func (h setHost) Drop(ctx context.Context, st fsrvp.Set, m fsrvp.Member) error {
	s := h.s
	s.sh.mu.Lock()
	s.unexposeLocked(m.Volume, m.Snapshot)
	s.sh.mu.Unlock()
	p, err := s.reg.Get(m.Provider)
	if err != nil {
		return nil // its provider is gone, and the snapshot with it
	}
	cut, err := s.dropSnapshot(ctx, p, m.Volume, m.Snapshot, true)
	if len(cut) > 0 {
		s.log.Warn("shadow copy deleted while in use", "set", st.ID, "snapshot", exposureKey(m.Volume, m.Snapshot), "cut_off", cut)
	}
	return err
}

func (h setHost) Exists(ctx context.Context, vol, snap string) bool {
	return h.s.snapshotExists(ctx, vol, snap)
}

func (h setHost) Changed(st fsrvp.Set) {
	h.s.emit("set_state", &umbrav1.Event{SetId: st.ID, State: st.State, Message: st.Err})
}

// setStatus maps the sets' errors to gRPC codes.
func setStatus(err error) error {
	switch {
	case errors.Is(err, fsrvp.ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, fsrvp.ErrState):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, fsrvp.ErrExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, fsrvp.ErrBadRequest):
		return status.Error(codes.InvalidArgument, err.Error())
	}
	if status.Code(err) != codes.Unknown {
		return err
	}
	return toStatus(err)
}

func (s *Server) setMsg(st fsrvp.Set) *umbrav1.ShadowCopySet {
	out := &umbrav1.ShadowCopySet{Id: st.ID, Context: st.Context, State: st.State, Created: timestamppb.New(st.Created), Error: st.Err}
	if !st.Deadline.IsZero() {
		out.Deadline = timestamppb.New(st.Deadline)
	}
	s.sh.mu.Lock()
	defer s.sh.mu.Unlock()
	for _, m := range st.Members {
		sc := &umbrav1.ShadowCopy{Id: m.ShadowID, Path: m.Path, Volume: m.Volume, Provider: m.Provider, Snapshot: m.Snapshot}
		if e := s.sh.exposed[exposureKey(m.Volume, m.Snapshot)]; e != nil && m.Snapshot != "" {
			sc.Mapping = mappingMsg(e)
		}
		out.ShadowCopies = append(out.ShadowCopies, sc)
	}
	return out
}

func mappingMsg(e *exposure) *umbrav1.ShareMapping {
	m := &umbrav1.ShareMapping{SetId: e.SetID, ShadowCopyId: e.ShadowID, SharePath: e.SharePath, Volume: e.Volume, Snapshot: e.Snapshot,
		NbdExport: exposureKey(e.Volume, e.Snapshot), Path: e.Path, Created: timestamppb.New(e.Created)}
	if e.Mount != nil {
		m.MountDir, m.Fstype = e.Mount.Dir, e.Mount.FSType
	}
	return m
}

// setReply answers a set's step: the set as it is now, or the error.
func (s *Server) setReply(st fsrvp.Set, err error) (*umbrav1.ShadowCopySet, error) {
	if err != nil {
		return nil, setStatus(err)
	}
	return s.setMsg(st), nil
}

func (s *Server) StartShadowCopySet(ctx context.Context, req *umbrav1.StartShadowCopySetRequest) (*umbrav1.ShadowCopySet, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	return s.setReply(s.sh.sets.Start(req.GetContext(), time.Duration(req.GetTimeoutMs())*time.Millisecond))
}

func (s *Server) AddToShadowCopySet(ctx context.Context, req *umbrav1.AddToShadowCopySetRequest) (*umbrav1.AddToShadowCopySetResponse, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	vol, prov, err := s.resolvePath(ctx, req.GetPath())
	if err != nil {
		return nil, toStatus(err)
	}
	m, err := s.sh.sets.Add(req.GetSetId(), req.GetPath(), vol, prov)
	if err != nil {
		return nil, setStatus(err)
	}
	return &umbrav1.AddToShadowCopySetResponse{ShadowCopyId: m.ShadowID, Volume: vol}, nil
}

func (s *Server) PrepareShadowCopySet(ctx context.Context, req *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	return s.setReply(s.sh.sets.Prepare(ctx, req.GetSetId()))
}

func (s *Server) CommitShadowCopySet(ctx context.Context, req *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	return s.setReply(s.sh.sets.Commit(ctx, req.GetSetId(), !req.GetNoWriters()))
}

func (s *Server) ExposeShadowCopySet(ctx context.Context, req *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	return s.setReply(s.sh.sets.Expose(ctx, req.GetSetId(), !req.GetNoMount()))
}

func (s *Server) RecoveryCompleteShadowCopySet(ctx context.Context, req *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	return s.setReply(s.sh.sets.RecoveryComplete(req.GetSetId()))
}

func (s *Server) AbortShadowCopySet(ctx context.Context, req *umbrav1.SetRequest) (*umbrav1.ShadowCopySet, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	return s.setReply(s.sh.sets.Abort(ctx, req.GetSetId()))
}

func (s *Server) ListShadowCopySets(ctx context.Context, _ *umbrav1.ListShadowCopySetsRequest) (*umbrav1.ListShadowCopySetsResponse, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	out := &umbrav1.ListShadowCopySetsResponse{}
	for _, st := range s.sh.sets.List() {
		out.Sets = append(out.Sets, s.setMsg(st))
	}
	return out, nil
}

func (s *Server) GetShareMapping(ctx context.Context, req *umbrav1.ShareMappingRequest) (*umbrav1.ShareMapping, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	st, m, err := s.sh.sets.Member(req.GetSetId(), req.GetShadowCopyId())
	if err != nil {
		return nil, setStatus(err)
	}
	s.sh.mu.Lock()
	defer s.sh.mu.Unlock()
	e := s.sh.exposed[exposureKey(m.Volume, m.Snapshot)]
	if e == nil || m.Snapshot == "" {
		return nil, status.Errorf(codes.FailedPrecondition, "shadow copy %s of set %s is not exposed (the set is %s)", m.ShadowID, st.ID, st.State)
	}
	return mappingMsg(e), nil
}

// DeleteShareMapping unexposes one shadow copy and deletes it; a set
// with no shadow copy left is gone.
func (s *Server) DeleteShareMapping(ctx context.Context, req *umbrav1.ShareMappingRequest) (*umbrav1.DeleteShareMappingResponse, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	if err := s.sh.sets.DeleteMember(ctx, req.GetSetId(), req.GetShadowCopyId()); err != nil {
		return nil, setStatus(err)
	}
	return &umbrav1.DeleteShareMappingResponse{}, nil
}

// mountSnapshot mounts a snapshot's filesystem read-only at dir.
func (s *Server) mountSnapshot(ctx context.Context, vol, snap, dir string) (*expose.Mount, error) {
	p, err := s.reg.For(ctx, vol)
	if err != nil {
		return nil, err
	}
	var file string
	if p.Name() == cow.ProviderName {
		if s.sh.fuseDir == "" {
			return nil, fmt.Errorf("%w: mounting a COW snapshot needs the service's FUSE files (umbra serve --fuse-dir); it stays an NBD export %s@%s", errBadRequest, vol, snap)
		}
		file = filepath.Join(s.sh.fuseDir, exposureKey(vol, snap))
	} else {
		list, err := p.List(ctx, vol)
		if err != nil {
			return nil, err
		}
		for _, sn := range list {
			if sn.ID == snap {
				file = sn.Path
			}
		}
		if fi, err := os.Stat(file); err != nil || !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("%w: snapshot %s@%s has no block file to mount", errBadRequest, vol, snap)
		}
	}
	return expose.MountFile(file, dir)
}

// exposeLocked exposes a snapshot: always as its NBD export; as a path
// when the provider's snapshots are directories (btrfs); else, with
// mount, as a read-only mounted directory. Holds mu.
func (s *Server) exposeLocked(ctx context.Context, vol, snap, dir string, mount bool, e *exposure) (*exposure, error) {
	key := exposureKey(vol, snap)
	if old := s.sh.exposed[key]; old != nil {
		return nil, status.Errorf(codes.AlreadyExists, "snapshot %s is exposed already (see `umbra shares list`)", key)
	}
	p, err := s.reg.For(ctx, vol)
	if err != nil {
		return nil, err
	}
	if !s.snapshotExists(ctx, vol, snap) {
		return nil, fmt.Errorf("snapshot %s: %w", key, provider.ErrNotFound)
	}
	if v, err := s.cow.Volume(vol); err == nil {
		if err := frontend.Unreadable(v, snap); err != nil {
			return nil, err
		}
	}
	e.Volume, e.Snapshot, e.Created = vol, snap, time.Now().UTC()
	if p.Name() != cow.ProviderName {
		list, _ := p.List(ctx, vol)
		for _, sn := range list {
			if sn.ID == snap && sn.Path != "" {
				if fi, err := os.Stat(sn.Path); err == nil && fi.IsDir() {
					e.Path = sn.Path
				}
			}
		}
	}
	if mount && e.Path == "" {
		if dir == "" {
			dir = filepath.Join(s.sh.root, key)
		}
		m, err := s.mountSnapshot(ctx, vol, snap, dir)
		if err != nil {
			return nil, err
		}
		e.Mount = m
	}
	if err := s.sh.cat.Put(catalog.Exposures, key, e); err != nil {
		if e.Mount != nil {
			e.Mount.Unmount()
		}
		return nil, err
	}
	s.sh.exposed[key] = e
	s.emit("exposed", &umbrav1.Event{Volume: vol, Snapshot: snap, SetId: e.SetID})
	return e, nil
}

// unexposeLocked removes an exposure if there is one; holds mu.
func (s *Server) unexposeLocked(vol, snap string) error {
	key := exposureKey(vol, snap)
	e := s.sh.exposed[key]
	if e == nil {
		return nil
	}
	var err error
	if e.Mount != nil {
		err = e.Mount.Unmount()
	}
	delete(s.sh.exposed, key)
	s.emit("unexposed", &umbrav1.Event{Volume: vol, Snapshot: snap, SetId: e.SetID})
	if cerr := s.sh.cat.Delete(catalog.Exposures, key); err == nil {
		err = cerr
	}
	return err
}

// unexposeBeforeDelete is called before a snapshot is deleted by force:
// it says what exposure it removed ("" if none).
func (s *Server) unexposeBeforeDelete(vol, snap string) string {
	if s.sh == nil {
		return ""
	}
	s.sh.mu.Lock()
	defer s.sh.mu.Unlock()
	e := s.sh.exposed[exposureKey(vol, snap)]
	if e == nil {
		return ""
	}
	if err := s.unexposeLocked(vol, snap); err != nil {
		s.log.Error("unexpose before a forced delete", "snapshot", exposureKey(vol, snap), "err", err)
	}
	return exposureUse(e)
}

// exposureUse says how a snapshot is exposed, for users and cut-offs.
func exposureUse(e *exposure) string {
	switch {
	case e.Mount != nil:
		return "exposed at " + e.Mount.Dir
	case e.Path != "":
		return "exposed at " + e.Path
	}
	return "exposed as NBD export " + exposureKey(e.Volume, e.Snapshot)
}

func (s *Server) ExposeSnapshot(ctx context.Context, req *umbrav1.ExposeSnapshotRequest) (*umbrav1.ShareMapping, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	if err := provider.ValidateID(req.GetId()); err != nil {
		return nil, toStatus(err)
	}
	dir := req.GetDir()
	if dir != "" && !filepath.IsAbs(dir) {
		return nil, toStatus(fmt.Errorf("%w: --dir %s: give an absolute path", errBadRequest, dir))
	}
	s.sh.mu.Lock()
	defer s.sh.mu.Unlock()
	e, err := s.exposeLocked(ctx, req.GetVolume(), req.GetId(), dir, !req.GetNoMount(), &exposure{})
	if err != nil {
		if status.Code(err) != codes.Unknown {
			return nil, err
		}
		return nil, toStatus(err)
	}
	s.log.Info("snapshot exposed", "snapshot", exposureKey(e.Volume, e.Snapshot), "mount", e.Mount, "path", e.Path)
	return mappingMsg(e), nil
}

func (s *Server) UnexposeSnapshot(ctx context.Context, req *umbrav1.UnexposeSnapshotRequest) (*umbrav1.UnexposeSnapshotResponse, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	s.sh.mu.Lock()
	defer s.sh.mu.Unlock()
	key := exposureKey(req.GetVolume(), req.GetId())
	if s.sh.exposed[key] == nil {
		return nil, status.Errorf(codes.NotFound, "snapshot %s is not exposed (see `umbra shares list`)", key)
	}
	if err := s.unexposeLocked(req.GetVolume(), req.GetId()); err != nil {
		return nil, toStatus(err)
	}
	s.log.Info("snapshot unexposed", "snapshot", key)
	return &umbrav1.UnexposeSnapshotResponse{}, nil
}

func (s *Server) ListShareMappings(ctx context.Context, _ *umbrav1.ListShareMappingsRequest) (*umbrav1.ListShareMappingsResponse, error) {
	if s.sh == nil {
		return nil, errNoShares
	}
	s.sh.mu.Lock()
	defer s.sh.mu.Unlock()
	out := &umbrav1.ListShareMappingsResponse{}
	for _, e := range s.sh.exposed {
		out.Mappings = append(out.Mappings, mappingMsg(e))
	}
	sort.Slice(out.Mappings, func(i, j int) bool { return out.Mappings[i].NbdExport < out.Mappings[j].NbdExport })
	return out, nil
}

// restoreStorage applies the storage associations changed through the
// API in an earlier run, unless the configuration changed since (then
// the configuration wins and the record goes); holds mu.
func (s *Server) restoreStorage() {
	sh := s.sh
	sh.configured = map[string]cow.StorageInfo{}
	for _, v := range s.cow.Volumes() {
		st := v.Storage()
		st.Used, st.Allocated = 0, 0 // the configuration, not the state
		sh.configured[v.Name()] = st
	}
	recs := map[string]storageRecord{}
	catalog.Each(sh.cat, catalog.Storage, func(vol string, rec storageRecord) { recs[vol] = rec }, nil)
	for vol, rec := range recs {
		v, err := s.cow.Volume(vol)
		if err != nil {
			continue
		}
		if rec.Config != sh.configured[vol] {
			s.log.Info("storage association: the configuration changed since it was changed through the API; using the configuration", "volume", vol)
			sh.cat.Delete(catalog.Storage, vol)
			continue
		}
		if err := v.SetStorage(rec.Dir, rec.Max, cow.Policy(rec.Policy)); err != nil {
			s.log.Error("storage association changed through the API cannot be restored; using the configuration", "volume", vol, "err", err)
			continue
		}
		s.log.Info("storage association restored", "volume", vol, "dir", rec.Dir, "max", rec.Max, "policy", rec.Policy)
	}
}

// saveStorage records a storage association changed through the API.
func (s *Server) saveStorage(v *cow.Volume) {
	if s.sh == nil {
		return
	}
	s.sh.mu.Lock()
	defer s.sh.mu.Unlock()
	st := v.Storage()
	rec := storageRecord{Dir: st.Dir, Max: st.Max, Policy: string(st.Policy), Config: s.sh.configured[v.Name()]}
	if err := s.sh.cat.Put(catalog.Storage, v.Name(), rec); err != nil {
		s.log.Error("catalog: storage association not recorded; it will not outlive a restart", "volume", v.Name(), "err", err)
	}
}

// saveWriters records the writers' states and history (after a set, so
// never inside a freeze window).
func (s *Server) saveWriters() {
	if s.sh == nil || s.writers == nil {
		return
	}
	for _, st := range s.writers.States() {
		s.sh.cat.Put(catalog.Writers, st.Name, st)
	}
}
