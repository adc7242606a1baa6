package service

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"umbra/api"
	"umbra/backup"
	"umbra/filebrowse"
	"umbra/provider"
	"umbra/web"
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

// browseReq is the audit record of a browse refused.
type browseReq struct {
	Source string `json:"source"`
}

// browseHandler serves the file browser in the web console under
// /browse/: the snapshots of this service's volumes, and the images of
// the console's repositories by their number on its repositories page
// (/browse/image/N/IMAGE/). Each request is the logged-in user's and
// needs the operator role (api.ActionBrowseFiles); a refusal is in the
// audit log.
func (s *Service) browseHandler() http.Handler {
	var once sync.Once
	var h http.Handler
	var herr error
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		once.Do(func() {
			b, err := s.Browser()
			if err != nil {
				herr = err
				return
			}
			h = b.Handler(filebrowse.HandlerOptions{Snapshot: s.browseSnapshot, Image: s.browseImage})
		})
		if herr != nil {
			http.Error(w, "file browser: "+herr.Error(), http.StatusServiceUnavailable)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// mayBrowse refuses a caller who may not browse files, through the
// API's role check and audit.
func (s *Service) mayBrowse(r *http.Request, what string) error {
	c, ok := web.CallerFrom(r.Context())
	if !ok {
		return fmt.Errorf("%w: log in to the console first", filebrowse.ErrForbidden)
	}
	_, err := api.Call(r.Context(), s.api, c, api.ActionBrowseFiles, browseReq{Source: what},
		func(context.Context, browseReq) (struct{}, error) { return struct{}{}, nil })
	if status.Code(err) == codes.PermissionDenied {
		return fmt.Errorf("%w: %s", filebrowse.ErrForbidden, status.Convert(err).Message())
	}
	return err
}

func (s *Service) browseSnapshot(r *http.Request, vol, id string) (filebrowse.Source, error) {
	if err := s.mayBrowse(r, "snapshot "+vol+"@"+id); err != nil {
		return nil, err
	}
	return s.SnapshotSource(vol, id), nil
}

func (s *Service) browseImage(r *http.Request, repo, id string) (filebrowse.Source, error) {
	if err := s.mayBrowse(r, "image "+id+" of repository "+repo); err != nil {
		return nil, err
	}
	n, err := strconv.Atoi(repo)
	if err != nil || n < 0 || n >= len(s.cfg.Web.Repositories) {
		return nil, fmt.Errorf("repository %q: %w (the console numbers its repositories from 0, as [[web.repository]] lists them)", repo, provider.ErrNotFound)
	}
	rc := s.cfg.Web.Repositories[n]
	var set backup.Settings
	if rc.PasswordFile != "" {
		b, err := os.ReadFile(rc.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("repository %s: password file: %w", rc.Location, err)
		}
		set.Password = strings.TrimRight(string(b), "\r\n")
	}
	return s.ImageSource(rc.Location, set, id), nil
}
