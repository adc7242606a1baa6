// Package writer defines writers — applications that quiesce around a
// snapshot, VSS's "writer" role — their registry with the state
// `umbra writers list` shows, and how a writer's components are matched to
// the volumes of a snapshot set (through the mounts of loop devices that
// carry the volumes). Built-in writers live in sub-packages.
package writer

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// Level orders freezing: applications freeze first (in parallel), then
// filesystems; thaw runs in reverse. A filesystem frozen first would block
// the application's own flush until the freeze timeout.
type Level int

const (
	LevelApplication Level = 0
	LevelFilesystem  Level = 1
)

// Volume is one volume of a snapshot set as writers see it.
type Volume struct {
	Name string `json:"name"`
	// Devices are the files or block devices that carry the volume to the
	// kernel (its FUSE file, a block device): a filesystem mounted from a
	// loop device over one of them lives on the volume.
	Devices []string `json:"devices"`
	// Mounts are the mount points of filesystems on the volume.
	Mounts []string `json:"mounts"`
	// Paths are the files or directories that are the volume, for system
	// providers (a reflink file, a btrfs subvolume): application writers
	// whose data lies there are involved. Filesystem writers are not: a
	// FICLONE or a btrfs snapshot needs its filesystem writable (it would
	// wait on a freeze), and each flushes the data it snapshots itself.
	Paths []string `json:"paths,omitempty"`
}

// Set is what a writer is told about the snapshot set.
type Set struct {
	ID        string   `json:"id"`
	Volumes   []Volume `json:"volumes"`
	ForBackup bool     `json:"for_backup"`
}

// Mounts returns every mount point of the set.
func (s Set) Mounts() []string {
	var out []string
	for _, v := range s.Volumes {
		out = append(out, v.Mounts...)
	}
	return out
}

// Holds reports whether path lies on a volume of the set: under one of
// its mounts or its paths. Application writers use it for Involved.
func (s Set) Holds(path string) bool {
	for _, v := range s.Volumes {
		for _, d := range append(append([]string(nil), v.Mounts...), v.Paths...) {
			if Under(path, d) {
				return true
			}
		}
	}
	return false
}

// Writer quiesces an application around a snapshot. Every method is
// bounded by its context; Thaw and Abort must be safe to call when Freeze
// was not called or failed.
type Writer interface {
	Name() string
	Level() Level
	// Involved says whether the writer's components are in the set.
	Involved(set Set) bool
	PrepareForBackup(ctx context.Context, set Set) error
	PrepareForSnapshot(ctx context.Context, set Set) error
	Freeze(ctx context.Context, set Set) error
	Thaw(ctx context.Context, set Set) error
	PostSnapshot(ctx context.Context, set Set) error
	BackupComplete(ctx context.Context, set Set, ok bool) error
	Abort(ctx context.Context, set Set) error
}

// StateNotParticipating is the state of a writer whose data lies on a
// set's volumes but that had nothing to quiesce there (Idler).
const StateNotParticipating = "not participating"

// Idler is a writer that can have nothing to quiesce on volumes that hold
// its data (a configured database not created yet). Such a writer does
// not participate in the set, as a VSS writer that reports no components
// does not, and the set goes on without it.
type Idler interface {
	// Idle says why the writer has nothing to quiesce in set; "" when it
	// has.
	Idle(set Set) string
}

// Base gives writers no-op phases to embed.
type Base struct{}

func (Base) PrepareForBackup(context.Context, Set) error     { return nil }
func (Base) PrepareForSnapshot(context.Context, Set) error   { return nil }
func (Base) PostSnapshot(context.Context, Set) error         { return nil }
func (Base) BackupComplete(context.Context, Set, bool) error { return nil }
func (Base) Abort(context.Context, Set) error                { return nil }

// State is a writer's state, as `vssadmin list writers` shows it.
type State struct {
	Name      string    `json:"name"`
	State     string    `json:"state"` // stable, waiting for completion, failed, disconnected, not participating
	LastPhase string    `json:"last_phase,omitempty"`
	LastError string    `json:"last_error,omitempty"`
	Updated   time.Time `json:"updated"`
	History   []Event   `json:"history,omitempty"`
}

// Event is one entry of a writer's recent history.
type Event struct {
	Time   time.Time `json:"time"`
	SetID  string    `json:"set_id"`
	Phase  string    `json:"phase"`
	Error  string    `json:"error,omitempty"`
	Millis int64     `json:"ms"`
}

const historyLen = 32

// goneMax is how many writers no longer registered keep their state (the
// most recently updated): writers connect under names of their choosing,
// and a service must not keep one for every name it was ever given.
const goneMax = 64

// Registry holds the writers of a service and their states.
type Registry struct {
	// OnFailure, when set before use, is told of every failed phase (for
	// metrics); it runs under the registry's lock and must not call it.
	OnFailure func(writer, phase string)

	mu      sync.Mutex // guards writers and states
	writers map[string]Writer
	states  map[string]*State
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{writers: map[string]Writer{}, states: map[string]*State{}}
}

// Add registers w; names are unique.
func (r *Registry) Add(w Writer) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.writers[w.Name()]; ok {
		return fmt.Errorf("writer %q is already registered", w.Name())
	}
	r.writers[w.Name()] = w
	if st, ok := r.states[w.Name()]; ok { // a writer coming back keeps its history
		st.State, st.Updated = "stable", time.Now()
		return nil
	}
	r.states[w.Name()] = &State{Name: w.Name(), State: "stable", Updated: time.Now()}
	return nil
}

// Remove unregisters the writer called name; its state stays, as
// "disconnected" unless it failed, so its last error can still be read.
func (r *Registry) Remove(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.writers, name)
	if st, ok := r.states[name]; ok && st.State != "failed" {
		st.State, st.Updated = "disconnected", time.Now()
	}
	r.trimGoneLocked()
}

// trimGoneLocked drops the states of writers no longer registered beyond
// the goneMax most recently updated. Callers hold r.mu.
func (r *Registry) trimGoneLocked() {
	var gone []*State
	for name, st := range r.states {
		if _, ok := r.writers[name]; !ok {
			gone = append(gone, st)
		}
	}
	if len(gone) <= goneMax {
		return
	}
	sort.Slice(gone, func(i, j int) bool { return gone[i].Updated.After(gone[j].Updated) })
	for _, st := range gone[goneMax:] {
		delete(r.states, st.Name)
	}
}

// Writers returns the registered writers sorted by name.
func (r *Registry) Writers() []Writer {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Writer, 0, len(r.writers))
	for _, w := range r.writers {
		out = append(out, w)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name() < out[j].Name() })
	return out
}

// States returns every writer's state, sorted by name.
func (r *Registry) States() []State {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []State
	for _, s := range r.states {
		c := *s
		c.History = append([]Event(nil), s.History...)
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Restore brings back states saved by an earlier run (their history and
// last error); a writer not registered (yet) shows as disconnected.
func (r *Registry) Restore(saved []State) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, st := range saved {
		if cur, ok := r.states[st.Name]; ok {
			cur.History = append(append([]Event(nil), st.History...), cur.History...)
			if len(cur.History) > historyLen {
				cur.History = cur.History[len(cur.History)-historyLen:]
			}
			if cur.LastError == "" {
				cur.LastError, cur.LastPhase = st.LastError, st.LastPhase
			}
			continue
		}
		c := st
		c.State = "disconnected"
		r.states[st.Name] = &c
	}
	r.trimGoneLocked()
}

// Record notes that writer name went through phase for set (err nil on
// success) and sets its state.
func (r *Registry) Record(name, setID, phase string, took time.Duration, err error, state string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.states[name]
	if !ok {
		return
	}
	ev := Event{Time: time.Now(), SetID: setID, Phase: phase, Millis: took.Milliseconds()}
	if err != nil {
		ev.Error = err.Error()
		s.State, s.LastError = "failed", err.Error()
		if r.OnFailure != nil {
			r.OnFailure(name, phase)
		}
	} else if state != "" {
		s.State = state
	}
	s.LastPhase, s.Updated = phase, ev.Time
	s.History = append(s.History, ev)
	if len(s.History) > historyLen {
		s.History = s.History[len(s.History)-historyLen:]
	}
}

// Mount is one line of /proc/self/mountinfo that matters here.
type Mount struct {
	Point  string
	Source string
	FSType string
}

// MountInfo is the mount table ReadMounts reads (a variable so that a
// test can give its own, beside SysBlock).
var MountInfo = "/proc/self/mountinfo"

// ReadMounts parses the mount table (/proc/self/mountinfo).
func ReadMounts() ([]Mount, error) {
	f, err := os.Open(MountInfo)
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	var out []Mount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m, ok := parseMountinfo(sc.Text()); ok {
			out = append(out, m)
		}
	}
	return out, sc.Err()
}

// parseMountinfo parses one mountinfo line: fields, then " - " fstype
// source options. Octal escapes (\040) are decoded.
func parseMountinfo(line string) (Mount, bool) {
	pre, post, ok := strings.Cut(line, " - ")
	if !ok {
		return Mount{}, false
	}
	f := strings.Fields(pre)
	g := strings.Fields(post)
	if len(f) < 5 || len(g) < 2 {
		return Mount{}, false
	}
	return Mount{Point: unescape(f[4]), FSType: g[0], Source: unescape(g[1])}, true
}

func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// LoopBacking returns the backing file of a loop device like /dev/loop3.
func LoopBacking(dev string) (string, bool) {
	name := filepath.Base(dev)
	if !strings.HasPrefix(name, "loop") {
		return "", false
	}
	b, err := os.ReadFile(filepath.Join("/sys/block", name, "loop", "backing_file"))
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(string(b)), true
}

// ResolveMounts fills each volume's Mounts: filesystems whose source is one
// of the volume's devices (or a partition of one: /dev/nbd0p1 of
// /dev/nbd0), or a loop device backed by one.
func ResolveMounts(vols []Volume) ([]Volume, error) {
	mounts, err := ReadMounts()
	if err != nil {
		return vols, err
	}
	return resolveMounts(vols, mounts, LoopBacking), nil
}

func resolveMounts(vols []Volume, mounts []Mount, backing func(dev string) (string, bool)) []Volume {
	out := make([]Volume, len(vols))
	for i, v := range vols {
		out[i] = v
		out[i].Mounts = nil
		for _, m := range mounts {
			src := m.Source
			if b, ok := backing(src); ok {
				src = b
			}
			for _, d := range v.Devices {
				if src == d || m.Source == d || partitionOf(m.Source, d) {
					out[i].Mounts = append(out[i].Mounts, m.Point)
					break
				}
			}
		}
	}
	return out
}

// partitionOf reports whether dev is a partition of disk by the kernel's
// naming: /dev/nbd0p1 of /dev/nbd0, /dev/loop3p2 of /dev/loop3.
func partitionOf(dev, disk string) bool {
	if !strings.HasPrefix(disk, "/dev/") {
		return false
	}
	rest, ok := strings.CutPrefix(dev, disk+"p")
	if !ok || rest == "" {
		return false
	}
	for _, r := range rest {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// SysBlock is where the kernel lists block devices (a variable so that a
// test can give a directory of its own: this machine may have no nbd).
var SysBlock = "/sys/block"

// NBDDevices returns the kernel nbd devices (/dev/nbdX) connected to a
// server whose clients are the processes pids.
//
// How a device is matched to a connection: the kernel records in
// /sys/block/nbdX/pid the process that started the device (netlink
// NBD_CMD_CONNECT, or the NBD_DO_IT ioctl), and the server reads with
// SO_PEERCRED the process that connected the socket. nbd-client in
// netlink mode (Debian's default) connects, negotiates and starts the
// device in one process, so the two are the same pid: a pid names one
// live process, and a device of another server's client cannot match.
// The file stays while the device is connected, even after that process
// exits. A client that starts the device from another process than the
// one that connected (an ioctl-mode client that forks in between) is not
// matched: its filesystems are not found (docs/architecture.md).
// The kernel path is tested in scripts/vmtest; here through SysBlock.
func NBDDevices(pids []int) []string {
	if len(pids) == 0 {
		return nil
	}
	want := map[int]bool{}
	for _, p := range pids {
		want[p] = true
	}
	ents, err := os.ReadDir(SysBlock)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "nbd") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(SysBlock, e.Name(), "pid"))
		if err != nil {
			continue // not connected
		}
		var pid int
		if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d", &pid); err == nil && want[pid] {
			out = append(out, "/dev/"+e.Name())
		}
	}
	return out
}

// Under reports whether path lies in the tree of dir.
func Under(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}
