// Package frontend adapts the COW engine's volumes and snapshots to the
// front-ends that serve them: NBD exports (package nbd) and FUSE files
// (package fusefile). Each volume is served read-write under its name and
// each live snapshot read-only as VOLUME@SNAPSHOT.
package frontend

import (
	"context"
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"

	"umbra/cow"
	"umbra/fusefile"
	"umbra/nbd"
	"umbra/provider"
)

// ErrReadOnly is returned by writes to a read-only backend: a snapshot,
// another provider's snapshot, a backup image.
var ErrReadOnly = errors.New("snapshot is read-only")

// image is what a read-only backend serves: the bytes of a snapshot or
// a backup image, and their size.
type image interface {
	ReadAt(p []byte, off int64) (int, error)
	Size() int64
}

// readOnly serves an image as a block backend (nbd.Backend and
// fusefile.Backend) whose writes are refused. It hides every other
// method of the image, so the front-ends find no fast path
// (nbd.TryWriter, nbd.SpliceWriter, ...) that could bypass the refusal.
type readOnly struct{ img image }

func (r readOnly) ReadAt(p []byte, off int64) (int, error) { return r.img.ReadAt(p, off) }
func (r readOnly) Size() int64                             { return r.img.Size() }

// WriteAt refuses, writing nothing.
func (readOnly) WriteAt(p []byte, off int64) (int, error) { return 0, ErrReadOnly }

// Flush has nothing to make durable.
func (readOnly) Flush() error { return nil }

// maxName is the NBD protocol's bound on a string such as an export
// name.
const maxName = 4096

// ParseName splits an export (or FUSE file) name "VOLUME" or
// "VOLUME@SNAPSHOT" (snapshot "" for a volume). It refuses, wrapping
// provider.ErrBadID, every name that is not one of those two forms: empty
// parts ("vol@", "@snap", ""), more than one '@', a snapshot id outside
// [A-Za-z0-9._-], a volume that is neither such a name nor a clean file
// path (the name of a reflink or btrfs volume), control characters,
// invalid UTF-8, and more than 4096 bytes. A malformed name must never
// fall back to another export: "vol@" once served the live volume
// read-write.
func ParseName(name string) (vol, snap string, err error) {
	bad := func(why string) (string, string, error) {
		shown := name
		if len(shown) > 64 {
			shown = shown[:64] + "..."
		}
		return "", "", fmt.Errorf("export name %q: %s (want VOLUME or VOLUME@SNAPSHOT; NBD_OPT_LIST shows the exports): %w",
			shown, why, provider.ErrBadID)
	}
	switch {
	case name == "":
		return bad("empty")
	case len(name) > maxName:
		return bad(fmt.Sprintf("%d bytes, more than %d", len(name), maxName))
	case !utf8.ValidString(name):
		return bad("not valid UTF-8")
	case strings.IndexFunc(name, unicode.IsControl) >= 0:
		return bad("has a control character")
	case strings.Count(name, "@") > 1:
		return bad("more than one '@'")
	}
	vol, snap, hasSnap := strings.Cut(name, "@")
	if vol == "" {
		return bad("no volume before '@'")
	}
	if hasSnap {
		if snap == "" {
			return bad("no snapshot after '@'")
		}
		if provider.ValidateID(snap) != nil {
			return bad("snapshot id not 1-128 of [A-Za-z0-9._-] starting with a letter or digit")
		}
	}
	if strings.Contains(vol, "/") {
		if path.Clean(vol) != vol {
			return bad("volume path not in clean form")
		}
	} else if provider.ValidateID(vol) != nil {
		return bad("volume name not 1-128 of [A-Za-z0-9._-] starting with a letter or digit")
	}
	return vol, snap, nil
}

// Names lists every volume and live snapshot of p as export names; not
// a backup base, which cannot be read.
func Names(p *cow.Provider) []string {
	var out []string
	for _, v := range p.Volumes() {
		out = append(out, v.Name())
		for _, s := range v.Snapshots() {
			if provider.StateOf(s) != provider.StateBackupBase {
				out = append(out, v.Name()+"@"+s.ID)
			}
		}
	}
	sort.Strings(out)
	return out
}

// Unreadable says why snapshot id of v cannot be served or exposed (a
// backup base: its data was released), or is nil.
func Unreadable(v *cow.Volume, id string) error {
	for _, s := range v.Snapshots() {
		if s.ID == id && provider.StateOf(s) == provider.StateBackupBase {
			return fmt.Errorf("snapshot %s@%s is a backup base (%s): it only tells the next incremental backup what changed and cannot be read; create a snapshot to read the volume (umbra snapshot create %s): %w",
				v.Name(), id, s.Reason, v.Name(), cow.ErrReleased)
		}
	}
	return nil
}

// NBDExports serves p's volumes and snapshots over NBD, and, when reg is
// not nil, the block-image snapshots of its other providers as read-only
// exports VOLUME@SNAPSHOT (a reflink volume's name is its file's path).
func NBDExports(p *cow.Provider, reg *provider.Registry) nbd.Exports { return nbdExports{p, reg} }

type nbdExports struct {
	p   *cow.Provider
	reg *provider.Registry
}

// systemExport looks name up among the other providers' snapshots.
func (e nbdExports) systemExport(name, volName, snapID string) (*nbd.Export, error) {
	if e.reg == nil || snapID == "" {
		return nil, fmt.Errorf("export %q: %w", name, provider.ErrNotFound)
	}
	ctx := context.Background()
	p, err := e.reg.For(ctx, volName)
	if err != nil || p.Name() == cow.ProviderName {
		return nil, fmt.Errorf("export %q: %w", name, provider.ErrNotFound)
	}
	img, err := p.Open(ctx, volName, snapID)
	if err != nil {
		return nil, err
	}
	return &nbd.Export{
		Name:        name,
		Description: fmt.Sprintf("%s snapshot %s of %s", p.Name(), snapID, volName),
		Backend:     readOnly{img},
		ReadOnly:    true,
		Release:     func() { img.Close() },
	}, nil
}

func (e nbdExports) List() []string { return Names(e.p) }

func (e nbdExports) Lookup(name string) (*nbd.Export, error) {
	volName, snapID, err := ParseName(name)
	if err != nil {
		return nil, err
	}
	v, err := e.p.Volume(volName)
	if err != nil {
		if x, serr := e.systemExport(name, volName, snapID); serr == nil {
			return x, nil
		}
		return nil, err
	}
	if snapID == "" {
		return &nbd.Export{
			Name:         name,
			Description:  fmt.Sprintf("Umbra volume %s (%s)", v.Name(), v.OriginPath()),
			Backend:      v,
			Trim:         v.Trim,
			WriteZeroes:  v.WriteZeroes,
			Extents:      convert(v.Allocation),
			Changed:      func(since string) (*provider.Bitmap, bool, error) { return v.Changed(since, "") },
			ChangedBases: func() []string { return changedBases(v, "") },
			Release:      v.Use("NBD connection"),
		}, nil
	}
	if err := Unreadable(v, snapID); err != nil {
		return nil, err
	}
	s, err := v.OpenSnapshot(snapID)
	if err != nil {
		return nil, err
	}
	done := s.Use("NBD connection") // deleting the snapshot refuses meanwhile
	return &nbd.Export{
		Name:         name,
		Description:  fmt.Sprintf("Umbra shadow copy %s of volume %s", snapID, v.Name()),
		Backend:      readOnly{s},
		ReadOnly:     true,
		Extents:      convert(s.Allocation),
		Changed:      s.Changed,
		ChangedBases: func() []string { return changedBases(v, snapID) },
		Release:      func() { done(); s.Close() },
	}, nil
}

// changedBases lists the valid snapshots of v that changes can be
// counted from: all of them for the volume (upto ""), those up to and
// including snapshot upto for a snapshot.
func changedBases(v *cow.Volume, upto string) []string {
	var out []string
	for _, s := range v.Snapshots() { // oldest first
		if s.Valid {
			out = append(out, s.ID)
		}
		if s.ID == upto {
			break
		}
	}
	return out
}

func convert(f func(off, length int64) ([]cow.Extent, error)) func(off, length int64) ([]nbd.Extent, error) {
	return func(off, length int64) ([]nbd.Extent, error) {
		ext, err := f(off, length)
		if err != nil {
			return nil, err
		}
		out := make([]nbd.Extent, len(ext))
		for i, e := range ext {
			out[i] = nbd.Extent{Off: e.Off, Len: e.Len, Hole: e.Hole, Zero: e.Zero}
		}
		return out, nil
	}
}

// FUSESource serves p's volumes and snapshots as FUSE files.
func FUSESource(p *cow.Provider) fusefile.Source { return fuseSource{p} }

type fuseSource struct{ p *cow.Provider }

func (s fuseSource) List() []string { return Names(s.p) }

func (s fuseSource) Open(name string) (*fusefile.Entry, error) {
	volName, snapID, err := ParseName(name)
	if err != nil {
		return nil, err
	}
	v, err := s.p.Volume(volName)
	if err != nil {
		return nil, err
	}
	if snapID == "" {
		return &fusefile.Entry{Name: name, Backend: v, Trim: v.Trim,
			Zero:   func(off, n int64) error { return v.WriteZeroes(off, n, true) },
			Opened: func() func() { return v.Use("open FUSE file") }}, nil
	}
	if err := Unreadable(v, snapID); err != nil {
		return nil, err
	}
	snap, err := v.OpenSnapshot(snapID)
	if err != nil {
		return nil, err
	}
	return &fusefile.Entry{Name: name, Backend: readOnly{snap}, ReadOnly: true, Release: func() { snap.Close() },
		Opened: func() func() { return snap.Use("open FUSE file") }}, nil
}
