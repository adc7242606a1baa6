// Package api is the Umbra service's management API: the gRPC service
// defined in umbra.proto (generated code in umbrav1), served on a unix
// socket that only root and the service's own user may use (checked with
// SO_PEERCRED on every connection). It lists volumes and shadow copies,
// creates snapshot sets under one write hold, deletes and reverts, and
// manages shadow storage associations.
package api

// Regenerating umbrav1 needs protoc (Debian's protobuf-compiler, 3.21.12)
// and, on PATH, protoc-gen-go v1.36.12 and protoc-gen-go-grpc v1.5.1
// (go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12 and
// google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.5.1).
//go:generate protoc --go_out=umbrav1 --go_opt=paths=source_relative --go-grpc_out=umbrav1 --go-grpc_opt=paths=source_relative umbra.proto

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"umbra/api/umbrav1"
	"umbra/coordinator"
	"umbra/cow"
	"umbra/metrics"
	"umbra/provider"
	"umbra/writer"
)

// Server implements umbrav1.UmbraServer over the COW provider.
type Server struct {
	umbrav1.UnimplementedUmbraServer
	cow     *cow.Provider
	reg     *provider.Registry // every provider, the COW one included
	coord   *coordinator.Coordinator
	writers *writer.Registry
	log     *slog.Logger

	repoMu   sync.Mutex // guards repos
	repos    map[[32]byte]*repoEntry
	repoIdle time.Duration // how long an unused repository stays open (repocache.go)

	// Giving memory back after a backup runs beside the next request,
	// not before the backup's reply (repocache.go).
	freeing  atomic.Bool    // a collection is queued and has not started
	freeWG   sync.WaitGroup // the collections running; CloseRepos waits
	freeHook func()         // what a collection runs; nil: freeMemory (tests set it)

	sh *shares // FSRVP sets and exposures; nil until EnableShares

	// Metrics, when set before Serve, records snapshot set timings.
	Metrics *metrics.Metrics
	// Jobs, when set before Serve, answers the job calls.
	Jobs JobService
	// Audit, when set before Serve, logs every mutating call.
	Audit *Audit
	// SocketGroup, when set before Serve, gives the operator role on the
	// unix socket to peers whose groups (SO_PEERGROUPS) include it.
	SocketGroup *SocketGroup
	// Live, when set before Serve, restores images live (RestoreLive)
	// and reports them in ListVolumes.
	Live LiveRestorer

	events events // what happens, for Events subscribers
}

// NewServer returns the API over p; every snapshot set is made by coord
// (nil: a coordinator over reg and writers, with no mount lookup).
func NewServer(p *cow.Provider, reg *provider.Registry, coord *coordinator.Coordinator, writers *writer.Registry, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	if writers == nil {
		writers = writer.NewRegistry()
	}
	if coord == nil {
		coord = coordinator.New(reg, writers, nil, log)
	}
	return &Server{cow: p, reg: reg, coord: coord, writers: writers, log: log, repoIdle: DefaultRepoIdle}
}

// ListProviders lists the providers and their capabilities.
func (s *Server) ListProviders(ctx context.Context, _ *umbrav1.ListProvidersRequest) (*umbrav1.ListProvidersResponse, error) {
	out := &umbrav1.ListProvidersResponse{}
	for _, p := range s.reg.All() {
		c := p.Capabilities()
		out.Providers = append(out.Providers, &umbrav1.Provider{Name: p.Name(), Kind: c.Kind, CommitCost: c.CommitCost,
			Revert: c.Revert, Tracking: c.Tracking, StorageLimit: c.StorageLimit, BlockImage: c.BlockImage,
			Persistent: c.Persistent, NonPersistent: c.NonPersistent, Notes: c.Notes})
	}
	return out, nil
}

// ListWriters lists the writers and their states.
func (s *Server) ListWriters(ctx context.Context, _ *umbrav1.ListWritersRequest) (*umbrav1.ListWritersResponse, error) {
	out := &umbrav1.ListWritersResponse{}
	if s.writers == nil {
		return out, nil
	}
	for _, st := range s.writers.States() {
		w := &umbrav1.Writer{Name: st.Name, State: st.State, LastPhase: st.LastPhase, LastError: st.LastError, Updated: timestamppb.New(st.Updated)}
		for _, ev := range st.History {
			w.History = append(w.History, &umbrav1.WriterEvent{Time: timestamppb.New(ev.Time), SetId: ev.SetID, Phase: ev.Phase, Error: ev.Error, Millis: ev.Millis})
		}
		out.Writers = append(out.Writers, w)
	}
	return out, nil
}

// SocketGroup is the unix group whose members may drive the service as
// operators on its unix socket (e.g. Samba's FSRVP commands, which run as
// the SMB user): `umbra serve --api-socket-group`.
type SocketGroup struct {
	Name string
	GID  uint32
}

// Serve serves the API on the unix socket l until ctx ends: callers are
// root or the service's user (SO_PEERCRED), with the admin role, and
// members of SocketGroup, with the operator role; their mutating calls
// are audited.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	g := grpc.NewServer(s.interceptors(nil)...)
	s.register(g)
	stop := context.AfterFunc(ctx, g.GracefulStop)
	defer stop()
	return g.Serve(peerCheck{l, s.SocketGroup})
}

func (s *Server) register(g *grpc.Server) { umbrav1.RegisterUmbraServer(g, s) }

// credConn carries the peer's uid and, when the peer is in the socket
// group, that group as its remote address ("uid=1001 group=umbra-fsrvp"):
// who reads it, the audit records it.
type credConn struct {
	net.Conn
	name string
}

func (c credConn) RemoteAddr() net.Addr {
	return &net.UnixAddr{Name: c.name, Net: "unix"}
}

// peerName is the address credConn gives a peer with uid and groups.
func peerName(uid uint32, gids []uint32, grp *SocketGroup) string {
	name := fmt.Sprintf("uid=%d", uid)
	if grp != nil && slices.Contains(gids, grp.GID) {
		name += " group=" + grp.Name
	}
	return name
}

// peerGroups reads the peer's primary and supplementary groups as they
// were when it connected (SO_PEERGROUPS): what it holds then, not what
// /etc/group says now.
func peerGroups(fd int, gid uint32) ([]uint32, error) {
	gids := make([]uint32, 256)
	for {
		n := uint32(len(gids) * 4)
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS, uintptr(unsafe.Pointer(&gids[0])), uintptr(unsafe.Pointer(&n)), 0)
		if e == unix.ERANGE {
			gids = make([]uint32, n/4+1)
			continue
		}
		if e != 0 {
			return nil, fmt.Errorf("SO_PEERGROUPS: %w", e)
		}
		return append(gids[:n/4], gid), nil
	}
}

// peerCheck reads each unix connection's peer uid (SO_PEERCRED) into its
// address. It lets every uid in: who refuses all but root and the
// service's own user per call, so that a refused caller is told why
// (PermissionDenied: the CLI's exit 5) and the refusal is audited, where
// closing the connection here said "not reachable" and left no trace.
type peerCheck struct {
	net.Listener
	group *SocketGroup // nil: no socket group
}

func (p peerCheck) Accept() (net.Conn, error) {
	for {
		c, err := p.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			return c, nil
		}
		raw, err := uc.SyscallConn()
		if err != nil {
			c.Close()
			continue
		}
		var cred *unix.Ucred
		var gids []uint32
		raw.Control(func(fd uintptr) {
			if cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil && p.group != nil {
				gids, err = peerGroups(int(fd), cred.Gid)
			}
		})
		if err != nil {
			c.Close()
			continue
		}
		return credConn{c, peerName(cred.Uid, gids, p.group)}, nil
	}
}

// toStatus maps engine errors to gRPC codes with a message that says what
// to do next.
func toStatus(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, provider.ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, provider.ErrExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, provider.ErrBadID), errors.Is(err, errBadRequest), errors.Is(err, coordinator.ErrBadRequest):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, provider.ErrNoStorage):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, provider.ErrHoldTimeout), errors.Is(err, coordinator.ErrFreezeTimeout):
		return status.Error(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, provider.ErrSnapshotInvalid), errors.Is(err, cow.ErrReleased), errors.Is(err, cow.ErrInUse):
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

var errBadRequest = errors.New("bad request")

func snapshotMsg(s provider.Snapshot) *umbrav1.Snapshot {
	m := &umbrav1.Snapshot{
		Volume: s.Volume, Id: s.ID, Provider: s.Provider, SetId: s.SetID,
		Created: timestamppb.New(s.Created), Persistent: s.Persistent, Valid: s.Valid,
		Reason: s.Reason, Size: s.Size, DiffBytes: s.DiffBytes, Export: s.Volume + "@" + s.ID,
		State: provider.StateOf(s),
	}
	if m.State == provider.StateBackupBase {
		m.Export = "" // not exported: nothing behind the cursor reads
	}
	return m
}

func storageMsg(v *cow.Volume) *umbrav1.Storage {
	st := v.Storage()
	return &umbrav1.Storage{Volume: v.Name(), Dir: st.Dir, MaxBytes: st.Max, UsedBytes: st.Used, AllocatedBytes: st.Allocated, Policy: string(st.Policy)}
}

func (s *Server) ListVolumes(ctx context.Context, _ *umbrav1.ListVolumesRequest) (*umbrav1.ListVolumesResponse, error) {
	out := &umbrav1.ListVolumesResponse{}
	for _, v := range s.cow.Volumes() {
		st := v.Storage()
		vol := &umbrav1.Volume{
			Name: v.Name(), Origin: v.OriginPath(), Size: v.Size(), ChunkSize: v.ChunkSize(),
			Provider: cow.ProviderName, CanShadowCopy: st.Dir != "", Storage: storageMsg(v),
			Snapshots: int32(len(v.Snapshots())), Users: v.Users(),
		}
		if st.Dir == "" {
			vol.WhyNot = "no shadow storage association: add one with `umbra storage add`"
		}
		if s.Live != nil {
			vol.LiveRestore = s.Live.LiveRestore(v.Name())
		}
		vol.Mounts = s.volumeMounts(v.Name())
		if vol.CanBeStorage = len(vol.Mounts) > 0; !vol.CanBeStorage {
			vol.StorageWhyNot = "none of its filesystems is mounted (put one on its FUSE file through a loop device); storage for a volume is never on the volume itself"
		}
		out.Volumes = append(out.Volumes, vol)
	}
	for _, pv := range s.providerVolumes() {
		vol := &umbrav1.Volume{Name: pv.vol, Origin: pv.vol, Provider: pv.p.Name(), CanShadowCopy: true,
			StorageWhyNot: "a volume of the " + pv.p.Name() + " provider: its snapshots live where it keeps them, not in shadow storage"}
		if list, err := pv.p.List(ctx, pv.vol); err != nil {
			vol.CanShadowCopy, vol.WhyNot = false, err.Error()
		} else {
			vol.Snapshots = int32(len(list))
		}
		if err := pv.p.Supports(ctx, pv.vol); err != nil {
			vol.CanShadowCopy, vol.WhyNot = false, err.Error()
		}
		out.Volumes = append(out.Volumes, vol)
	}
	return out, nil
}

// volumeMounts lists where filesystems on a COW volume are mounted.
func (s *Server) volumeMounts(name string) []string {
	if s.sh == nil || s.sh.fuseDir == "" {
		return nil
	}
	vols, _ := writer.ResolveMounts([]writer.Volume{{Name: name, Devices: []string{filepath.Join(s.sh.fuseDir, name)}}})
	if len(vols) == 0 {
		return nil
	}
	return vols[0].Mounts
}

func (s *Server) volumes(name string) ([]*cow.Volume, error) {
	if name == "" {
		return s.cow.Volumes(), nil
	}
	v, err := s.cow.Volume(name)
	if err != nil {
		return nil, err
	}
	return []*cow.Volume{v}, nil
}

func (s *Server) ListSnapshots(ctx context.Context, req *umbrav1.ListSnapshotsRequest) (*umbrav1.ListSnapshotsResponse, error) {
	if name := req.GetVolume(); name != "" {
		if _, err := s.cow.Volume(name); err != nil {
			p, perr := s.reg.For(ctx, name)
			if perr != nil {
				return nil, toStatus(err)
			}
			list, err := p.List(ctx, name)
			if err != nil {
				return nil, toStatus(err)
			}
			out := &umbrav1.ListSnapshotsResponse{}
			for _, sn := range list {
				m := snapshotMsg(sn)
				m.Users = s.snapshotUsers(sn.Volume, sn.ID)
				out.Snapshots = append(out.Snapshots, m)
			}
			return out, nil
		}
	}
	vols, err := s.volumes(req.GetVolume())
	if err != nil {
		return nil, toStatus(err)
	}
	out := &umbrav1.ListSnapshotsResponse{}
	for _, v := range vols {
		for _, sn := range v.Snapshots() {
			m := snapshotMsg(sn)
			m.Users = s.snapshotUsers(sn.Volume, sn.ID)
			out.Snapshots = append(out.Snapshots, m)
		}
	}
	if req.GetVolume() != "" {
		return out, nil
	}
	// Every volume means the other providers' volumes too (reflink
	// files, btrfs subvolumes, thin LVs the service was started with).
	for _, pv := range s.providerVolumes() {
		list, err := pv.p.List(ctx, pv.vol)
		if err != nil {
			return nil, toStatus(fmt.Errorf("list snapshots of %s (%s): %w", pv.vol, pv.p.Name(), err))
		}
		for _, sn := range list {
			m := snapshotMsg(sn)
			m.Users = s.snapshotUsers(sn.Volume, sn.ID)
			out.Snapshots = append(out.Snapshots, m)
		}
	}
	return out, nil
}

// volumeLister is a provider that knows the volumes it was given
// (`umbra serve --reflink-volume`, `--btrfs-volume`, `--lvmthin-volume`).
type volumeLister interface{ Volumes() []string }

type providerVolume struct {
	p   provider.Provider
	vol string
}

// providerVolumes lists the volumes of the providers other than the COW
// engine's, by provider name then as each gives them.
func (s *Server) providerVolumes() []providerVolume {
	var out []providerVolume
	for _, p := range s.reg.All() {
		if p.Name() == cow.ProviderName {
			continue
		}
		l, ok := p.(volumeLister)
		if !ok {
			continue
		}
		for _, v := range l.Volumes() {
			out = append(out, providerVolume{p, v})
		}
	}
	return out
}

// CreateSnapshotSet makes a snapshot set through the coordinator (the
// one path that makes sets): with writers, or over volumes of a system
// provider, application-consistent; always every volume committed
// inside one hold window. Any failure deletes what was created.
func (s *Server) CreateSnapshotSet(ctx context.Context, req *umbrav1.CreateSnapshotSetRequest) (*umbrav1.CreateSnapshotSetResponse, error) {
	if len(req.GetVolumes()) == 0 {
		return nil, toStatus(fmt.Errorf("%w: name at least one volume", errBadRequest))
	}
	if req.GetWriters() {
		defer s.saveWriters() // their history, failures included
	}
	set, err := s.coord.CreateSet(ctx, coordinator.Request{
		Volumes: req.GetVolumes(), Writers: req.GetWriters(), Persistent: req.GetPersistent(), ID: req.GetId(),
		FreezeTimeout: time.Duration(req.GetFreezeTimeoutMs()) * time.Millisecond,
		HoldTimeout:   time.Duration(req.GetHoldTimeoutMs()) * time.Millisecond,
	})
	if err != nil {
		return nil, toStatus(err)
	}
	set.Done()
	s.Metrics.ObserveSet(set.Timings.Hold, set.Timings.FreezeToThaw)
	resp := &umbrav1.CreateSnapshotSetResponse{SetId: set.ID, HoldMicros: set.Timings.Hold.Microseconds(),
		FreezeMicros: set.Timings.FreezeToThaw.Microseconds(), Writers: set.Writers}
	var msg string
	if req.GetWriters() {
		msg = "writers: " + strings.Join(set.Writers, ",")
	}
	for _, sn := range set.Snapshots {
		resp.Snapshots = append(resp.Snapshots, snapshotMsg(sn))
		s.emit("snapshot_created", &umbrav1.Event{Volume: sn.Volume, Snapshot: sn.ID, SetId: set.ID, Message: msg})
	}
	return resp, nil
}

// DeleteSnapshots deletes one snapshot, the oldest, all of a volume's or
// all of a set's. While any of them is in use (exposed, open through a
// loop device over its FUSE file, read by an NBD client) it refuses,
// naming the users, and deletes none; with force it deletes them and
// says what it cut off.
func (s *Server) DeleteSnapshots(ctx context.Context, req *umbrav1.DeleteSnapshotsRequest) (*umbrav1.DeleteSnapshotsResponse, error) {
	if req.GetSetId() != "" {
		return s.deleteSet(ctx, req.GetSetId(), req.GetForce())
	}
	v, err := s.cow.Volume(req.GetVolume())
	if err != nil {
		if p, perr := s.reg.For(ctx, req.GetVolume()); perr == nil && req.GetId() != "" {
			return s.deleteSnapshots(ctx, p, []provider.Snapshot{{Volume: req.GetVolume(), ID: req.GetId()}}, req.GetForce(), "")
		}
		return nil, toStatus(err)
	}
	var list []provider.Snapshot
	all := v.Snapshots()
	switch {
	case req.GetAll():
		list = all
	case req.GetOldest():
		if len(all) > 0 {
			list = all[:1]
		}
	case req.GetId() != "":
		list = []provider.Snapshot{{Volume: v.Name(), ID: req.GetId()}}
	default:
		return nil, toStatus(fmt.Errorf("%w: give a snapshot id, oldest or all", errBadRequest))
	}
	return s.deleteSnapshots(ctx, s.cow, list, req.GetForce(), "")
}

// deleteSnapshots deletes list (all of p) as DeleteSnapshots says.
func (s *Server) deleteSnapshots(ctx context.Context, p provider.Provider, list []provider.Snapshot, force bool, setID string) (*umbrav1.DeleteSnapshotsResponse, error) {
	if !force {
		if err := s.refuseInUse(ctx, list); err != nil {
			return nil, err
		}
	}
	out := &umbrav1.DeleteSnapshotsResponse{}
	for _, sn := range list {
		var cut []string
		if force {
			if e := s.unexposeBeforeDelete(sn.Volume, sn.ID); e != "" {
				cut = append(cut, e)
				// The exposure's loop device lets go of its FUSE file a
				// moment after losetup -d returns: not a user cut off.
				s.waitClientsGone(ctx, sn.Volume, sn.ID)
			}
		}
		users, err := s.dropSnapshot(ctx, p, sn.Volume, sn.ID, force)
		if err != nil {
			return out, toStatus(err)
		}
		if cut = append(cut, users...); len(cut) > 0 {
			out.CutOff = append(out.CutOff, fmt.Sprintf("%s@%s: %s", sn.Volume, sn.ID, strings.Join(cut, ", ")))
			s.log.Warn("snapshot deleted while in use (forced)", "snapshot", sn.Volume+"@"+sn.ID, "cut_off", cut)
		}
		out.Deleted = append(out.Deleted, sn.ID)
		out.Snapshots = append(out.Snapshots, sn.Volume+"@"+sn.ID)
		s.emit("snapshot_deleted", &umbrav1.Event{Volume: sn.Volume, Snapshot: sn.ID, SetId: setID})
	}
	if setID == "" {
		s.log.Info("snapshots deleted", "snapshots", out.Snapshots)
	}
	return out, nil
}

// clientGrace is how long a delete waits for front-end clients of a
// snapshot that are going away: the kernel closes a FUSE file, and
// nbdfuse or nbd-client their connections, a moment after the command
// that let them go (losetup -d, nbd-client -d) has returned.
const clientGrace = 5 * time.Second

// waitClientsGone gives the front-end clients of snapshot id of vol (a
// COW volume's) up to clientGrace to go.
func (s *Server) waitClientsGone(ctx context.Context, vol, id string) {
	if v, err := s.cow.Volume(vol); err == nil && len(v.SnapshotUsers(id)) > 0 {
		wctx, cancel := context.WithTimeout(ctx, clientGrace)
		v.WaitSnapshotUnused(wctx, id)
		cancel()
	}
}

// refuseInUse refuses, naming them, if any snapshot of list is in use.
// A snapshot that only front-end clients hold (no exposure) gets
// clientGrace for them to go first.
func (s *Server) refuseInUse(ctx context.Context, list []provider.Snapshot) error {
	var busy []string
	for _, sn := range list {
		if !s.isExposed(sn.Volume, sn.ID) {
			s.waitClientsGone(ctx, sn.Volume, sn.ID)
		}
		if users := s.snapshotUsers(sn.Volume, sn.ID); len(users) > 0 {
			busy = append(busy, fmt.Sprintf("%s@%s (%s)", sn.Volume, sn.ID, strings.Join(users, ", ")))
		}
	}
	if len(busy) == 0 {
		return nil
	}
	return toStatus(fmt.Errorf("delete: %w: %s; nothing was deleted: unexpose it (umbra snapshot unexpose), detach the loop device over its FUSE file (umount, losetup -d) and disconnect its NBD clients, or delete with --force",
		cow.ErrSnapshotInUse, strings.Join(busy, "; ")))
}

// isExposed says whether snapshot id of vol is exposed (mounted).
func (s *Server) isExposed(vol, id string) bool {
	if s.sh == nil {
		return false
	}
	s.sh.mu.Lock()
	defer s.sh.mu.Unlock()
	return s.sh.exposed[exposureKey(vol, id)] != nil
}

// snapshotUsers names what uses a snapshot: its exposure and, for a COW
// volume, the front-end clients that have it open.
func (s *Server) snapshotUsers(vol, id string) []string {
	var out []string
	if s.sh != nil {
		s.sh.mu.Lock()
		if e := s.sh.exposed[exposureKey(vol, id)]; e != nil {
			out = append(out, exposureUse(e))
		}
		s.sh.mu.Unlock()
	}
	if v, err := s.cow.Volume(vol); err == nil {
		out = append(out, v.SnapshotUsers(id)...)
	}
	return out
}

// dropSnapshot deletes snapshot id of vol through p. A snapshot that
// front-end clients have open is refused unless force; forced, the users
// cut off are returned.
func (s *Server) dropSnapshot(ctx context.Context, p provider.Provider, vol, id string, force bool) ([]string, error) {
	if fd, ok := p.(provider.ForceDeleter); ok && force {
		return fd.ForceDelete(ctx, vol, id)
	}
	return nil, p.Delete(ctx, vol, id)
}

// deleteSet deletes every snapshot of a snapshot set, on every provider.
func (s *Server) deleteSet(ctx context.Context, setID string, force bool) (*umbrav1.DeleteSnapshotsResponse, error) {
	type member struct {
		p    provider.Provider
		list []provider.Snapshot
	}
	var members []member
	for _, p := range s.reg.All() {
		var vols []string
		if p.Name() == cow.ProviderName {
			for _, v := range s.cow.Volumes() {
				vols = append(vols, v.Name())
			}
		} else if lister, ok := p.(interface{ Volumes() []string }); ok {
			vols = lister.Volumes()
		}
		m := member{p: p}
		for _, vol := range vols {
			list, err := p.List(ctx, vol)
			if err != nil {
				continue
			}
			for _, sn := range list {
				if sn.SetID == setID {
					m.list = append(m.list, provider.Snapshot{Volume: vol, ID: sn.ID})
				}
			}
		}
		if len(m.list) > 0 {
			members = append(members, m)
		}
	}
	if len(members) == 0 {
		return nil, status.Errorf(codes.NotFound, "snapshot set %q: no snapshot of it is left (see `umbra snapshot list`)", setID)
	}
	if !force { // refuse before deleting any, on every provider
		var all []provider.Snapshot
		for _, m := range members {
			all = append(all, m.list...)
		}
		if err := s.refuseInUse(ctx, all); err != nil {
			return nil, err
		}
	}
	out := &umbrav1.DeleteSnapshotsResponse{}
	for _, m := range members {
		r, err := s.deleteSnapshots(ctx, m.p, m.list, force, setID)
		if r != nil {
			out.Deleted = append(out.Deleted, r.Deleted...)
			out.Snapshots = append(out.Snapshots, r.Snapshots...)
			out.CutOff = append(out.CutOff, r.CutOff...)
		}
		if err != nil {
			return out, err
		}
	}
	s.log.Info("snapshot set deleted", "set", setID, "snapshots", out.Snapshots)
	return out, nil
}

func (s *Server) RevertSnapshot(ctx context.Context, req *umbrav1.RevertSnapshotRequest) (*umbrav1.RevertSnapshotResponse, error) {
	v, err := s.cow.Volume(req.GetVolume())
	if err != nil {
		if p, perr := s.reg.For(ctx, req.GetVolume()); perr == nil {
			if err := p.Revert(ctx, req.GetVolume(), req.GetId()); err != nil {
				return nil, toStatus(err)
			}
			s.emit("snapshot_reverted", &umbrav1.Event{Volume: req.GetVolume(), Snapshot: req.GetId()})
			return &umbrav1.RevertSnapshotResponse{}, nil
		}
		return nil, toStatus(err)
	}
	// A snapshot that does not exist is the first thing to say, before
	// that the volume is in use (which would send the user off to
	// unmount it for nothing).
	if !slices.ContainsFunc(v.Snapshots(), func(sn provider.Snapshot) bool { return sn.ID == req.GetId() }) {
		return nil, toStatus(fmt.Errorf("revert %s to %s: %w (see `umbra snapshot list %s`)", v.Name(), req.GetId(), provider.ErrNotFound, v.Name()))
	}
	revert := v.Revert
	if req.GetForce() {
		revert = v.ForceRevert
	}
	if err := revert(req.GetId()); err != nil {
		return nil, toStatus(err)
	}
	s.emit("snapshot_reverted", &umbrav1.Event{Volume: v.Name(), Snapshot: req.GetId()})
	s.log.Info("volume reverted", "volume", v.Name(), "snapshot", req.GetId())
	return &umbrav1.RevertSnapshotResponse{}, nil
}

func (s *Server) DeleteStorage(ctx context.Context, req *umbrav1.DeleteStorageRequest) (*umbrav1.DeleteStorageResponse, error) {
	v, err := s.cow.Volume(req.GetVolume())
	if err != nil {
		return nil, toStatus(err)
	}
	out := &umbrav1.DeleteStorageResponse{}
	if len(v.Snapshots()) > 0 {
		del, err := s.DeleteSnapshots(ctx, &umbrav1.DeleteSnapshotsRequest{Volume: v.Name(), All: true})
		if errors.Is(err, cow.ErrInUse) || status.Code(err) == codes.FailedPrecondition {
			return nil, status.Errorf(codes.FailedPrecondition, "delete storage of %s: its shadow copies go with it, and %s (`umbra snapshot delete %s --all --force` deletes them first)",
				v.Name(), status.Convert(err).Message(), v.Name())
		}
		if err != nil {
			return nil, err
		}
		out.Deleted = del.Deleted
	}
	if err := v.SetStorage("", 0, v.Storage().Policy); err != nil {
		return nil, toStatus(err)
	}
	s.saveStorage(v)
	s.emit("storage_changed", &umbrav1.Event{Volume: v.Name(), Message: "shadow storage association deleted"})
	s.log.Info("storage association deleted", "volume", v.Name(), "snapshots_deleted", len(out.Deleted))
	return out, nil
}

func (s *Server) GetStorage(ctx context.Context, req *umbrav1.GetStorageRequest) (*umbrav1.GetStorageResponse, error) {
	vols, err := s.volumes(req.GetVolume())
	if err != nil {
		return nil, toStatus(err)
	}
	out := &umbrav1.GetStorageResponse{}
	for _, v := range vols {
		out.Storage = append(out.Storage, storageMsg(v))
	}
	return out, nil
}

func (s *Server) SetStorage(ctx context.Context, req *umbrav1.SetStorageRequest) (*umbrav1.SetStorageResponse, error) {
	v, err := s.cow.Volume(req.GetVolume())
	if err != nil {
		return nil, toStatus(err)
	}
	if req.GetMaxBytes() < 0 {
		return nil, toStatus(fmt.Errorf("%w: negative max bytes", errBadRequest))
	}
	cur := v.Storage()
	dir, policy := cur.Dir, cur.Policy
	if req.GetDir() != "" {
		dir = req.GetDir()
		// A diff area on the volume it protects would write through
		// itself: every preserved chunk a write to the volume.
		for _, m := range s.volumeMounts(v.Name()) {
			if writer.Under(filepath.Clean(dir), m) {
				return nil, toStatus(fmt.Errorf("%w: %s is on volume %s itself (mounted at %s): give a directory on another filesystem", errBadRequest, dir, v.Name(), m))
			}
		}
	}
	if req.GetPolicy() != "" {
		policy = cow.Policy(strings.ToLower(req.GetPolicy()))
	}
	before := v.Snapshots()
	if err := v.SetStorage(dir, req.GetMaxBytes(), policy); err != nil {
		return nil, toStatus(fmt.Errorf("%w: %v", errBadRequest, err))
	}
	out := &umbrav1.SetStorageResponse{Storage: storageMsg(v)}
	// A shrink below what is used applies the policy now: say which
	// snapshots it took.
	after := map[string]provider.Snapshot{}
	for _, sn := range v.Snapshots() {
		after[sn.ID] = sn
	}
	for _, sn := range before {
		if now, ok := after[sn.ID]; !ok {
			out.Deleted = append(out.Deleted, v.Name()+"@"+sn.ID)
			s.emit("snapshot_deleted", &umbrav1.Event{Volume: v.Name(), Snapshot: sn.ID, Message: "deleted to fit the shadow storage's new size"})
		} else if sn.Valid && !now.Valid {
			out.Invalidated = append(out.Invalidated, v.Name()+"@"+sn.ID)
		}
	}
	s.saveStorage(v)
	s.emit("storage_changed", &umbrav1.Event{Volume: v.Name(), Message: fmt.Sprintf("dir %s max %d policy %s", dir, req.GetMaxBytes(), policy)})
	s.log.Info("storage changed", "volume", v.Name(), "dir", dir, "max", req.GetMaxBytes(), "policy", policy,
		"snapshots_deleted", out.Deleted, "snapshots_invalidated", out.Invalidated)
	return out, nil
}
