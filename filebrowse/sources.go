package filebrowse

import (
	"context"
	"fmt"
	"sync"

	"umbra/backup"
	"umbra/cow"
	"umbra/frontend"
	"umbra/provider"
)

// Snapshot is snapshot id of volume vol, opened through the service's
// providers: the COW engine's snapshots (kept in use while mounted, so a
// delete is refused until the mount goes: see Browser.Drop) and the
// block-image snapshots of the other providers (reflink, LVM thin).
func Snapshot(reg *provider.Registry, vol, id string) Source {
	return snapshotSource{reg, vol, id}
}

type snapshotSource struct {
	reg     *provider.Registry
	vol, id string
}

// SnapshotKey is the key of Snapshot(_, vol, id), for Browser.Drop.
func SnapshotKey(vol, id string) string { return "snapshot\x00" + vol + "\x00" + id }

func (s snapshotSource) Key() string    { return SnapshotKey(s.vol, s.id) }
func (s snapshotSource) String() string { return "snapshot " + s.vol + "@" + s.id }

func (s snapshotSource) Open(ctx context.Context) (Image, error) {
	if err := provider.ValidateID(s.id); err != nil {
		return nil, err
	}
	p, err := s.reg.For(ctx, s.vol)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w: %w", s.vol, provider.ErrNotFound, err)
	}
	if cp, ok := p.(*cow.Provider); ok {
		v, err := cp.Volume(s.vol)
		if err != nil {
			return nil, err
		}
		if err := frontend.Unreadable(v, s.id); err != nil {
			return nil, err
		}
		snap, err := v.OpenSnapshot(s.id)
		if err != nil {
			return nil, err
		}
		done := snap.Use("file browser")
		return &closer{Image: snap, close: func() error { done(); return snap.Close() }}, nil
	}
	img, err := p.Open(ctx, s.vol, s.id)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s, err)
	}
	return img, nil
}

// RepoOpener opens a repository and returns the function that releases
// it (the service's repository cache, or backup.OpenWith and Close).
type RepoOpener func(ctx context.Context) (*backup.Repo, func(), error)

// BackupImage is image id of the repository open opens; repo names that
// repository in the key (its location).
func BackupImage(repo string, open RepoOpener, id string) Source {
	return imageSource{repo, open, id}
}

type imageSource struct {
	repo string
	open RepoOpener
	id   string
}

// ImageKey is the key of BackupImage(repo, _, id).
func ImageKey(repo, id string) string { return "image\x00" + repo + "\x00" + id }

func (s imageSource) Key() string    { return ImageKey(s.repo, s.id) }
func (s imageSource) String() string { return "backup image " + s.id + " in " + s.repo }

func (s imageSource) Open(ctx context.Context) (Image, error) {
	r, release, err := s.open(ctx)
	if err != nil {
		return nil, err
	}
	ir, err := r.OpenImage(ctx, s.id)
	if err != nil {
		release()
		return nil, err
	}
	return &closer{Image: imageReader{ir}, close: func() error { release(); return nil }}, nil
}

type imageReader struct{ *backup.ImageReader }

func (imageReader) Close() error { return nil }

// closer is an image whose Close is close (once).
type closer struct {
	Image
	once  sync.Once
	close func() error
	err   error
}

func (c *closer) Close() error {
	c.once.Do(func() { c.err = c.close() })
	return c.err
}
