package web

import (
	"cmp"
	"context"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"umbra/api"
	"umbra/api/umbrav1"
	"umbra/backup"
	"umbra/internal/size"
)

// verifyState is what the last verify of a repository found.
type verifyState struct {
	When    time.Time
	OK      bool
	Summary string
}

// volumeImages is one volume's images in a repository.
type volumeImages struct {
	Volume string
	Images int
	Latest *backup.Image
	Bytes  int64 // sum of image sizes
}

type repoView struct {
	N        int
	Location string
	Error    string
	Stats    backup.RepoStats
	Volumes  []volumeImages
	Broken   int
	Verify   verifyState
}

type reposData struct{ Repos []repoView }

func (reposData) title() string { return "Repositories" }

// openRepo opens configured repository n.
func (s *Server) openRepo(ctx context.Context, n int) (*backup.Repo, error) {
	rc := s.cfg.Repositories[n]
	set := backup.Settings{}
	if rc.PasswordFile != "" {
		b, err := os.ReadFile(rc.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("repository %s: password file: %w", rc.Location, err)
		}
		set.Password = strings.TrimRight(string(b), "\r\n")
	}
	r, err := backup.OpenWith(ctx, rc.Location, set)
	if err != nil {
		return nil, fmt.Errorf("repository %s: %w (check [[web.repository]] in the service's configuration)", rc.Location, err)
	}
	return r, nil
}

// listReq is the audit record of a repository action.
type listReq struct {
	Location string `json:"location"`
	Keep     string `json:"keep,omitempty"`
}

func (s *Server) reposPage(w http.ResponseWriter, r *http.Request, sess *session) {
	var d reposData
	for n, rc := range s.cfg.Repositories {
		v, err := api.Call(r.Context(), s.cfg.API, sess.caller, api.ActionListRepository, listReq{Location: rc.Location},
			func(ctx context.Context, _ listReq) (repoView, error) { return s.repoView(ctx, n), nil })
		if err != nil {
			v = repoView{N: n, Location: rc.Location, Error: explain(err)}
		}
		d.Repos = append(d.Repos, v)
	}
	s.render(w, r, http.StatusOK, "repositories", sess, d)
}

func (s *Server) repoView(ctx context.Context, n int) repoView {
	v := repoView{N: n, Location: s.cfg.Repositories[n].Location}
	s.mu.Lock()
	v.Verify = s.verify[v.Location]
	s.mu.Unlock()
	repo, err := s.openRepo(ctx, n)
	if err != nil {
		v.Error = err.Error()
		return v
	}
	defer repo.Close()
	v.Stats = repo.Stats(ctx)
	list, errs := repo.Images()
	v.Broken = len(errs)
	byVol := map[string]*volumeImages{}
	for _, x := range list {
		vi := byVol[x.Volume]
		if vi == nil {
			vi = &volumeImages{Volume: x.Volume}
			byVol[x.Volume] = vi
		}
		vi.Images++
		vi.Bytes += x.Size
		vi.Latest = x // oldest first
	}
	for _, vi := range byVol {
		v.Volumes = append(v.Volumes, *vi)
	}
	slices.SortFunc(v.Volumes, func(a, b volumeImages) int { return cmp.Compare(a.Volume, b.Volume) })
	return v
}

func (s *Server) repoIndex(w http.ResponseWriter, r *http.Request, sess *session) (int, bool) {
	n, err := strconv.Atoi(r.PathValue("n"))
	if err != nil || n < 0 || n >= len(s.cfg.Repositories) {
		s.render(w, r, http.StatusNotFound, "error", sess, errorPage{Title: "No such repository", Message: "That repository is not configured: pick one on the repositories page."})
		return 0, false
	}
	return n, true
}

// verifyRepo starts a verify of a repository (operator).
func (s *Server) verifyRepo(w http.ResponseWriter, r *http.Request, sess *session) {
	n, ok := s.repoIndex(w, r, sess)
	if !ok {
		return
	}
	loc := s.cfg.Repositories[n].Location
	id, err := api.Call(r.Context(), s.cfg.API, sess.caller, api.ActionVerifyRepository, listReq{Location: loc}, func(ctx context.Context, _ listReq) (int, error) {
		return s.tasks.start("verify", loc, sess.caller.Name(), func(ctx context.Context, p taskProgress) (string, bool, error) {
			repo, err := s.openRepo(ctx, n)
			if err != nil {
				return "", false, err
			}
			defer repo.Close()
			rep := repo.VerifyWith(ctx, backup.VerifyOptions{Record: true}, p.Progress)
			if ctx.Err() != nil {
				return "", false, fmt.Errorf("verify cancelled: the service stopped")
			}
			bad := len(rep.BadChunks) + len(rep.BadImages) + len(rep.BadIndexes) + len(rep.BadPacks)
			sum := fmt.Sprintf("%d packs, %d chunks, %d good images", rep.Packs, rep.Chunks, rep.GoodImages)
			if bad > 0 {
				sum += fmt.Sprintf("; DAMAGE: %d bad images (%s), %d bad chunks, %d bad packs, %d bad indexes: run `umbra repair` on the repository", len(rep.BadImages), strings.Join(rep.BadImages, ", "), len(rep.BadChunks), len(rep.BadPacks), len(rep.BadIndexes))
			}
			if len(rep.Unreadable) > 0 {
				sum += fmt.Sprintf("; %d images unreadable now (run verify again)", len(rep.Unreadable))
			}
			s.mu.Lock()
			s.verify[loc] = verifyState{When: time.Now(), OK: bad == 0 && len(rep.Unreadable) == 0, Summary: sum}
			s.mu.Unlock()
			s.cfg.API.Publish("repository_verified", &umbrav1.Event{Message: loc + ": " + sum})
			return sum, bad > 0, nil
		}), nil
	})
	if err != nil {
		s.back(w, r, sess, "/repositories", err, "")
		return
	}
	http.Redirect(w, r, "/tasks/"+strconv.Itoa(id), http.StatusSeeOther)
}

// pruneRepo starts a prune of a repository (admin) by the form's keep
// rules.
func (s *Server) pruneRepo(w http.ResponseWriter, r *http.Request, sess *session) {
	n, ok := s.repoIndex(w, r, sess)
	if !ok {
		return
	}
	loc := s.cfg.Repositories[n].Location
	var p backup.Policy
	var keep []string
	for _, f := range []struct {
		name string
		dst  *int
	}{{"last", &p.Last}, {"hourly", &p.Hourly}, {"daily", &p.Daily}, {"weekly", &p.Weekly}, {"monthly", &p.Monthly}} {
		v := strings.TrimSpace(r.PostFormValue("keep_" + f.name))
		if v == "" {
			continue
		}
		k, err := strconv.Atoi(v)
		if err != nil || k < 0 {
			s.sessions.setFlash(sess, true, fmt.Sprintf("Keep %s %q: want a whole number of images, 0 or more. Nothing was pruned.", f.name, v))
			http.Redirect(w, r, "/repositories", http.StatusSeeOther)
			return
		}
		*f.dst = k
		keep = append(keep, fmt.Sprintf("%s=%d", f.name, k))
	}
	if p == (backup.Policy{}) {
		s.sessions.setFlash(sess, true, "Prune needs at least one keep rule (keep last, hourly, daily, weekly or monthly): without one it would delete every image. Nothing was pruned.")
		http.Redirect(w, r, "/repositories", http.StatusSeeOther)
		return
	}
	req := listReq{Location: loc, Keep: strings.Join(keep, " ")}
	id, err := api.Call(r.Context(), s.cfg.API, sess.caller, api.ActionPruneRepository, req, func(ctx context.Context, _ listReq) (int, error) {
		return s.tasks.start("prune", loc, sess.caller.Name(), func(ctx context.Context, _ taskProgress) (string, bool, error) {
			repo, err := s.openRepo(ctx, n)
			if err != nil {
				return "", false, err
			}
			defer repo.Close()
			rep, err := repo.Prune(ctx, p, false)
			if err != nil {
				return "", false, fmt.Errorf("prune: %w", err)
			}
			sum := fmt.Sprintf("kept %d images, removed %d; %d packs deleted, %d repacked, %s freed", len(rep.Kept), len(rep.Removed), rep.PacksDeleted, rep.PacksRepacked, size.Human(rep.BytesFreed))
			s.cfg.API.Publish("repository_pruned", &umbrav1.Event{Message: loc + ": " + sum})
			return sum, false, nil
		}), nil
	})
	if err != nil {
		s.back(w, r, sess, "/repositories", err, "")
		return
	}
	http.Redirect(w, r, "/tasks/"+strconv.Itoa(id), http.StatusSeeOther)
}
