package service

import (
	"context"
	"path/filepath"

	"umbra/backup"
	"umbra/filebrowse"
)

// Browser is the service's file browser (file-level restore from
// snapshots and backup images), made at its first use; its mounts live
// under STATE/browse and go at Close, before the volumes close (those a
// service killed with -9 left go when the next one makes its browser). Serve
// it with Browser().Handler, resolving sources with SnapshotSource and
// ImageSource.
func (s *Service) Browser() (*filebrowse.Browser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, filebrowse.ErrClosed
	}
	if s.browser == nil {
		b, err := filebrowse.New(filebrowse.Options{Dir: filepath.Join(s.cfg.StateDir, "browse"), Logger: s.log, CleanStale: true})
		if err != nil {
			return nil, err
		}
		s.browser = b
	}
	return s.browser, nil
}

// SnapshotSource is snapshot id of volume vol of this service, for the
// file browser.
func (s *Service) SnapshotSource(vol, id string) filebrowse.Source {
	return filebrowse.Snapshot(s.reg, vol, id)
}

// ImageSource is backup image id of the repository at location, opened
// with set through the repository cache the service's backups use.
func (s *Service) ImageSource(location string, set backup.Settings, id string) filebrowse.Source {
	return filebrowse.BackupImage(location, func(ctx context.Context) (*backup.Repo, func(), error) {
		return s.api.OpenRepository(ctx, location, set)
	}, id)
}

// closeBrowser tears the file browser's mounts down (it waits for the
// requests still reading them).
func (s *Service) closeBrowser() {
	s.mu.Lock()
	b := s.browser
	s.mu.Unlock()
	if b != nil {
		if err := b.Close(); err != nil {
			s.log.Error("file browser", "err", err)
		}
	}
}
