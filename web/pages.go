package web

import (
	"bytes"
	"cmp"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"umbra/api"
	"umbra/api/umbrav1"
	"umbra/internal/size"
	"umbra/provider"
)

func (s *Server) routes() {
	m := http.NewServeMux()
	m.Handle("GET /static/", http.StripPrefix("/static/", staticHandler()))
	m.HandleFunc("GET /login", s.loginPage)
	m.HandleFunc("POST /login", s.login)
	m.Handle("POST /logout", s.change(s.logout))
	m.Handle("GET /{$}", s.authed(s.overview))
	m.Handle("GET /volumes/{vol}", s.authed(s.volumePage))
	m.Handle("POST /volumes/{vol}/snapshots", s.change(s.createSnapshot))
	m.Handle("POST /volumes/{vol}/snapshots/{id}/delete", s.change(s.deleteSnapshot))
	m.Handle("POST /volumes/{vol}/snapshots/{id}/revert", s.change(s.revertSnapshot))
	m.Handle("POST /volumes/{vol}/snapshots/{id}/expose", s.change(s.exposeSnapshot))
	m.Handle("POST /volumes/{vol}/snapshots/{id}/unexpose", s.change(s.unexposeSnapshot))
	m.Handle("POST /volumes/{vol}/storage", s.change(s.setStorage))
	m.Handle("POST /volumes/{vol}/storage/delete", s.change(s.deleteStorage))
	m.Handle("GET /writers", s.authed(s.writersPage))
	m.Handle("GET /repositories", s.authed(s.reposPage))
	m.Handle("POST /repositories/{n}/verify", s.change(s.verifyRepo))
	m.Handle("POST /repositories/{n}/prune", s.change(s.pruneRepo))
	m.Handle("GET /tasks", s.authed(s.tasksPage))
	m.Handle("GET /tasks/{id}", s.authed(s.taskPage))
	m.Handle("GET /jobs", s.authed(s.jobsPage))
	m.Handle("POST /jobs/{job}/run", s.change(s.runJob))
	m.Handle("POST /jobs/{job}/enabled", s.change(s.enableJob))
	m.Handle("POST /jobs", s.change(s.addJob))
	m.Handle("POST /jobs/{job}/remove", s.change(s.removeJob))
	m.Handle("GET /events", s.authed(s.eventsPage))
	m.Handle("GET /events/stream", s.authed(s.eventStream))
	if s.cfg.Browse != nil {
		b := http.StripPrefix("/browse", s.cfg.Browse)
		m.Handle("GET /browse/", s.authed(func(w http.ResponseWriter, r *http.Request, sess *session) {
			b.ServeHTTP(w, r.WithContext(withSession(r.Context(), sess)))
		}))
		m.Handle("POST /browse/", s.change(func(w http.ResponseWriter, r *http.Request, sess *session) {
			b.ServeHTTP(w, r.WithContext(withSession(r.Context(), sess)))
		}))
	} else {
		m.Handle("GET /browse/", s.authed(s.browseMissing))
	}
	s.mux = m
}

// page is what every page's layout gets.
type page struct {
	Title  string
	Nav    string // which navigation entry is current
	Who    string
	Role   string
	CSRF   string
	Flash  *flash
	Data   any
	Caller api.Caller
}

var funcs = template.FuncMap{
	"bytes": size.Human,
	"when":  when,
	"ts":    func(t interface{ AsTime() time.Time }) time.Time { return t.AsTime() },
	"ago":   ago,
	"join":  strings.Join,
	"pct":   func(a, b int64) int64 { return pct(a, b) },
	"may":   func(c api.Caller, method string) bool { return c.May(method) },
	// seg escapes a name as one path segment: a volume named by its
	// path (a reflink file, a btrfs subvolume) keeps its slashes in one
	// segment that the mux's {vol} matches and PathValue decodes.
	"seg": url.PathEscape,
}

// parsePages parses each page with the layout.
func parsePages() (map[string]*template.Template, error) {
	names := []string{"login", "error", "overview", "volume", "writers", "repositories", "tasks", "task", "jobs", "events", "browse"}
	out := map[string]*template.Template{}
	for _, n := range names {
		t, err := template.New("layout.html").Funcs(funcs).ParseFS(templateFS, "templates/layout.html", "templates/"+n+".html")
		if err != nil {
			return nil, fmt.Errorf("web template %s: %w", n, err)
		}
		out[n] = t
	}
	return out, nil
}

// render writes a page (sess nil: logged out).
func (s *Server) render(w http.ResponseWriter, r *http.Request, code int, name string, sess *session, data any) {
	p := page{Data: data, Nav: name}
	if t, ok := data.(interface{ title() string }); ok {
		p.Title = t.title()
	}
	if sess != nil {
		p.Who, p.Role, p.CSRF, p.Caller = sess.caller.Name(), sess.caller.Role().String(), sess.csrf, sess.caller
		p.Flash = s.sessions.takeFlash(sess)
	}
	var buf bytes.Buffer
	if err := s.pages[name].Execute(&buf, p); err != nil {
		s.log.Error("web: render", "page", name, "err", err)
		http.Error(w, "the page could not be drawn (a bug; the service log has it)", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	w.Write(buf.Bytes())
}

type loginData struct {
	Next, Error, Message string
	CertHint             bool
}

func (loginData) title() string { return "Log in" }

type errorPage struct{ Title, Message string }

func (e errorPage) title() string { return e.Title }

// fail shows an error the API returned, with what to do.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, sess *session, err error) {
	code := http.StatusInternalServerError
	switch status.Code(err) {
	case codes.PermissionDenied:
		code = http.StatusForbidden
	case codes.NotFound:
		code = http.StatusNotFound
	case codes.InvalidArgument:
		code = http.StatusBadRequest
	}
	s.render(w, r, code, "error", sess, errorPage{Title: "Error", Message: explain(err)})
}

// explain is an API error as the page says it.
func explain(err error) string {
	st := status.Convert(err)
	msg := st.Message()
	if st.Code() == codes.PermissionDenied {
		msg += ". Ask an administrator for this, or log in with a token of a role that may."
	}
	return msg
}

// back returns to the page the form was on, with a message.
func (s *Server) back(w http.ResponseWriter, r *http.Request, sess *session, to string, err error, ok string) {
	if err != nil {
		s.sessions.setFlash(sess, true, explain(err))
	} else {
		s.sessions.setFlash(sess, false, ok)
	}
	http.Redirect(w, r, to, http.StatusSeeOther)
}

// ---- overview ----

// volumeRow is one volume on the overview.
type volumeRow struct {
	Name       string
	Used, Max  int64
	Pct        int64
	Snapshots  int
	Invalid    int
	LastBackup time.Time
	Job        string
	JobWarn    string // a job of the volume that failed, or none
	Warnings   []string
}

type overviewData struct {
	Volumes        []volumeRow
	Warnings       int
	WriterFailures []string
	JobsEnabled    bool
}

func (overviewData) title() string { return "Overview" }

// warnAt is the share of a shadow storage limit over which the
// overview warns.
const warnAt = 80

func (s *Server) overviewData(r *http.Request, c api.Caller) (overviewData, error) {
	var d overviewData
	vols, err := s.src.Volumes(r.Context(), c)
	if err != nil {
		return d, err
	}
	snaps, err := s.src.Snapshots(r.Context(), c, "")
	if err != nil {
		return d, err
	}
	writers, err := s.src.Writers(r.Context(), c)
	if err != nil {
		return d, err
	}
	jobList, err := s.src.Jobs(r.Context(), c)
	if err != nil {
		return d, err
	}
	d.JobsEnabled = len(jobList) > 0
	jobsOf := map[string][]*umbrav1.Job{}
	for _, j := range jobList {
		for _, v := range j.GetVolumes() {
			jobsOf[v] = append(jobsOf[v], j)
		}
	}
	byVol := map[string][]*umbrav1.Snapshot{}
	for _, sn := range snaps {
		byVol[sn.GetVolume()] = append(byVol[sn.GetVolume()], sn)
	}
	for _, v := range vols {
		st := v.GetStorage()
		row := volumeRow{Name: v.GetName(), Used: st.GetUsedBytes(), Max: st.GetMaxBytes(), Job: "jobs not configured"}
		if d.JobsEnabled {
			row.Job, row.JobWarn = jobState(jobsOf[v.GetName()])
		}
		row.Pct = pct(row.Used, row.Max)
		list := byVol[v.GetName()]
		row.Snapshots = len(list)
		var lastInvalid *umbrav1.Snapshot
		for _, sn := range list {
			switch sn.GetState() {
			case provider.StateInvalid:
				row.Invalid++
				lastInvalid = sn
			case provider.StateBackupBase:
				if t := sn.GetCreated().AsTime(); t.After(row.LastBackup) {
					row.LastBackup = t
				}
			}
		}
		if st.GetDir() == "" {
			row.Warnings = append(row.Warnings, "no shadow storage association: snapshots cannot be taken; add one on the volume's page")
		}
		if row.Max > 0 && row.Pct >= warnAt {
			row.Warnings = append(row.Warnings, fmt.Sprintf("shadow storage %d%% full (%s of %s): raise the limit or delete old snapshots", row.Pct, size.Human(row.Used), size.Human(row.Max)))
		}
		if row.Invalid > 0 {
			row.Warnings = append(row.Warnings, fmt.Sprintf("%d invalid snapshot(s), the last because %s: delete them", row.Invalid, cmp.Or(lastInvalid.GetReason(), "of an error")))
		}
		if row.JobWarn != "" {
			row.Warnings = append(row.Warnings, row.JobWarn)
		}
		if len(row.Warnings) > 0 {
			d.Warnings++
		}
		d.Volumes = append(d.Volumes, row)
	}
	slices.SortStableFunc(d.Volumes, func(a, b volumeRow) int {
		if (len(a.Warnings) > 0) != (len(b.Warnings) > 0) {
			if len(a.Warnings) > 0 {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Name, b.Name)
	})
	for _, w := range writers {
		if w.GetState() == "failed" || w.GetLastError() != "" {
			d.WriterFailures = append(d.WriterFailures, fmt.Sprintf("writer %s: %s in %s", w.GetName(), cmp.Or(w.GetLastError(), "failed"), cmp.Or(w.GetLastPhase(), "an unknown phase")))
		}
	}
	return d, nil
}

func (s *Server) overview(w http.ResponseWriter, r *http.Request, sess *session) {
	d, err := s.overviewData(r, sess.caller)
	if err != nil {
		s.fail(w, r, sess, err)
		return
	}
	s.render(w, r, http.StatusOK, "overview", sess, d)
}

// jobState says what the jobs of one volume are doing, and what needs
// attention: a volume no job covers, or whose job's last run failed.
func jobState(list []*umbrav1.Job) (state, warn string) {
	if len(list) == 0 {
		return "no job", "no scheduled job snapshots or backs it up: add a [[job]] naming it"
	}
	var parts []string
	for _, j := range list {
		p := j.GetName() + ": "
		switch last := j.GetLast(); {
		case j.GetRunning() != nil:
			p += "running"
		case !j.GetEnabled():
			p += "disabled"
		case last == nil:
			p += "not run yet"
		default:
			p += last.GetResult() + " " + ago(last.GetEnd().AsTime())
			if last.GetResult() == "failed" || last.GetResult() == "interrupted" || last.GetResult() == "missed" {
				warn = fmt.Sprintf("job %s %s: %s (see the jobs page)", j.GetName(), last.GetResult(), cmp.Or(last.GetError(), "no detail"))
			}
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, "; "), warn
}

// ---- a volume ----

type snapRow struct {
	*umbrav1.Snapshot
	Created  time.Time
	Pos      int64 // on the timeline, 0 to 1000
	Exposed  *umbrav1.ShareMapping
	Browsing bool
}

type volumeData struct {
	Volume    *umbrav1.Volume
	Snapshots []snapRow
	From, To  time.Time
	Pct       int64
	Browse    bool
}

func (d volumeData) title() string { return "Volume " + d.Volume.GetName() }

func (s *Server) volumePage(w http.ResponseWriter, r *http.Request, sess *session) {
	name := r.PathValue("vol")
	vols, err := s.src.Volumes(r.Context(), sess.caller)
	if err != nil {
		s.fail(w, r, sess, err)
		return
	}
	i := slices.IndexFunc(vols, func(v *umbrav1.Volume) bool { return v.GetName() == name })
	if i < 0 {
		s.render(w, r, http.StatusNotFound, "error", sess, errorPage{Title: "No such volume", Message: fmt.Sprintf("There is no volume %q: pick one on the overview.", name)})
		return
	}
	snaps, err := s.src.Snapshots(r.Context(), sess.caller, name)
	if err != nil {
		s.fail(w, r, sess, err)
		return
	}
	maps, err := s.src.Mappings(r.Context(), sess.caller)
	if err != nil {
		s.fail(w, r, sess, err)
		return
	}
	d := volumeData{Volume: vols[i], Browse: s.cfg.Browse != nil}
	d.Pct = pct(d.Volume.GetStorage().GetUsedBytes(), d.Volume.GetStorage().GetMaxBytes())
	for _, sn := range snaps {
		row := snapRow{Snapshot: sn, Created: sn.GetCreated().AsTime()}
		for _, m := range maps {
			if m.GetVolume() == name && m.GetSnapshot() == sn.GetId() {
				row.Exposed = m
			}
		}
		d.Snapshots = append(d.Snapshots, row)
	}
	slices.SortStableFunc(d.Snapshots, func(a, b snapRow) int { return a.Created.Compare(b.Created) })
	if n := len(d.Snapshots); n > 0 {
		d.From, d.To = d.Snapshots[0].Created, d.Snapshots[n-1].Created
		span := d.To.Sub(d.From)
		for i := range d.Snapshots {
			if span <= 0 {
				d.Snapshots[i].Pos = 500
			} else {
				d.Snapshots[i].Pos = int64(d.Snapshots[i].Created.Sub(d.From) * 1000 / span)
			}
		}
	}
	s.render(w, r, http.StatusOK, "volume", sess, d)
}

func volURL(vol string) string { return "/volumes/" + url.PathEscape(vol) }

func (s *Server) createSnapshot(w http.ResponseWriter, r *http.Request, sess *session) {
	vol := r.PathValue("vol")
	req := &umbrav1.CreateSnapshotSetRequest{Volumes: []string{vol}, Id: strings.TrimSpace(r.PostFormValue("id")),
		Writers: r.PostFormValue("writers") != "", Persistent: r.PostFormValue("persistent") != ""}
	resp, err := api.Call(r.Context(), s.cfg.API, sess.caller, "CreateSnapshotSet", req, s.cfg.API.CreateSnapshotSet)
	var ok string
	if err == nil {
		ids := []string{}
		for _, sn := range resp.GetSnapshots() {
			ids = append(ids, sn.GetId())
		}
		ok = fmt.Sprintf("Snapshot %s created (writes held %s).", strings.Join(ids, ", "), time.Duration(resp.GetHoldMicros())*time.Microsecond)
		if req.Writers {
			ok += " Writers: " + cmp.Or(strings.Join(resp.GetWriters(), ", "), "none took part") + "."
		}
	}
	s.back(w, r, sess, volURL(vol), err, ok)
}

func (s *Server) deleteSnapshot(w http.ResponseWriter, r *http.Request, sess *session) {
	vol, id := r.PathValue("vol"), r.PathValue("id")
	req := &umbrav1.DeleteSnapshotsRequest{Volume: vol, Id: id, Force: r.PostFormValue("force") != ""}
	_, err := api.Call(r.Context(), s.cfg.API, sess.caller, "DeleteSnapshots", req, s.cfg.API.DeleteSnapshots)
	s.back(w, r, sess, volURL(vol), err, "Snapshot "+id+" deleted.")
}

func (s *Server) revertSnapshot(w http.ResponseWriter, r *http.Request, sess *session) {
	vol, id := r.PathValue("vol"), r.PathValue("id")
	if strings.TrimSpace(r.PostFormValue("confirm")) != vol {
		s.back(w, r, sess, volURL(vol), status.Errorf(codes.InvalidArgument, "Revert of %s to %s not done: type the volume's name, %s, to confirm (a revert overwrites everything written since the snapshot)", vol, id, vol), "")
		return
	}
	req := &umbrav1.RevertSnapshotRequest{Volume: vol, Id: id, Force: r.PostFormValue("force") != ""}
	_, err := api.Call(r.Context(), s.cfg.API, sess.caller, "RevertSnapshot", req, s.cfg.API.RevertSnapshot)
	s.back(w, r, sess, volURL(vol), err, "Volume "+vol+" reverted to "+id+".")
}

func (s *Server) exposeSnapshot(w http.ResponseWriter, r *http.Request, sess *session) {
	vol, id := r.PathValue("vol"), r.PathValue("id")
	req := &umbrav1.ExposeSnapshotRequest{Volume: vol, Id: id, NoMount: r.PostFormValue("no_mount") != ""}
	m, err := api.Call(r.Context(), s.cfg.API, sess.caller, "ExposeSnapshot", req, s.cfg.API.ExposeSnapshot)
	ok := "Snapshot " + id + " exposed as NBD export " + m.GetNbdExport()
	if m.GetMountDir() != "" {
		ok += ", mounted read-only at " + m.GetMountDir()
	}
	s.back(w, r, sess, volURL(vol), err, ok+".")
}

func (s *Server) unexposeSnapshot(w http.ResponseWriter, r *http.Request, sess *session) {
	vol, id := r.PathValue("vol"), r.PathValue("id")
	req := &umbrav1.UnexposeSnapshotRequest{Volume: vol, Id: id}
	_, err := api.Call(r.Context(), s.cfg.API, sess.caller, "UnexposeSnapshot", req, s.cfg.API.UnexposeSnapshot)
	s.back(w, r, sess, volURL(vol), err, "Snapshot "+id+" is no longer exposed.")
}

func (s *Server) setStorage(w http.ResponseWriter, r *http.Request, sess *session) {
	vol := r.PathValue("vol")
	max, err := parseSize(r.PostFormValue("max"))
	if err != nil {
		s.back(w, r, sess, volURL(vol), status.Error(codes.InvalidArgument, err.Error()), "")
		return
	}
	req := &umbrav1.SetStorageRequest{Volume: vol, Dir: strings.TrimSpace(r.PostFormValue("dir")), MaxBytes: max, Policy: r.PostFormValue("policy")}
	resp, err := api.Call(r.Context(), s.cfg.API, sess.caller, "SetStorage", req, s.cfg.API.SetStorage)
	ok := "Shadow storage changed."
	if n := len(resp.GetDeleted()); n > 0 {
		ok += fmt.Sprintf(" %d snapshot(s) deleted to fit: %s.", n, strings.Join(resp.GetDeleted(), ", "))
	}
	if n := len(resp.GetInvalidated()); n > 0 {
		ok += fmt.Sprintf(" %d snapshot(s) invalidated: %s.", n, strings.Join(resp.GetInvalidated(), ", "))
	}
	s.back(w, r, sess, volURL(vol), err, ok)
}

func (s *Server) deleteStorage(w http.ResponseWriter, r *http.Request, sess *session) {
	vol := r.PathValue("vol")
	if strings.TrimSpace(r.PostFormValue("confirm")) != vol {
		s.back(w, r, sess, volURL(vol), status.Errorf(codes.InvalidArgument, "Shadow storage of %s not deleted: type the volume's name, %s, to confirm (every snapshot of the volume goes with it)", vol, vol), "")
		return
	}
	req := &umbrav1.DeleteStorageRequest{Volume: vol}
	resp, err := api.Call(r.Context(), s.cfg.API, sess.caller, "DeleteStorage", req, s.cfg.API.DeleteStorage)
	s.back(w, r, sess, volURL(vol), err, fmt.Sprintf("Shadow storage association of %s deleted, with %d snapshot(s).", vol, len(resp.GetDeleted())))
}

// ---- writers ----

type writersData struct{ Writers []*umbrav1.Writer }

func (writersData) title() string { return "Writers" }

func (s *Server) writersPage(w http.ResponseWriter, r *http.Request, sess *session) {
	ws, err := s.src.Writers(r.Context(), sess.caller)
	if err != nil {
		s.fail(w, r, sess, err)
		return
	}
	s.render(w, r, http.StatusOK, "writers", sess, writersData{ws})
}

// ---- jobs, browse ----

type plainData struct{ Title string }

func (p plainData) title() string { return p.Title }

type jobsData struct {
	Jobs    []*umbrav1.Job
	History []*umbrav1.JobRun
	Form    jobForm // the form that adds a job
}

func (jobsData) title() string { return "Jobs" }

// historyShown is how many runs the jobs page lists.
const historyShown = 50

func (s *Server) jobsPage(w http.ResponseWriter, r *http.Request, sess *session) {
	s.jobsPageWith(w, r, sess, http.StatusOK, jobForm{Kind: "backup"})
}

// jobsPageWith draws the jobs page with its add form filled as f.
func (s *Server) jobsPageWith(w http.ResponseWriter, r *http.Request, sess *session, code int, f jobForm) {
	list, err := s.src.Jobs(r.Context(), sess.caller)
	if err != nil {
		s.fail(w, r, sess, err)
		return
	}
	d := jobsData{Jobs: list, Form: f}
	if len(list) > 0 {
		h, err := api.Call(r.Context(), s.cfg.API, sess.caller, "JobHistory", &umbrav1.JobHistoryRequest{Limit: historyShown}, s.cfg.API.JobHistory)
		if err != nil {
			s.fail(w, r, sess, err)
			return
		}
		d.History = h.GetRuns()
	}
	s.render(w, r, code, "jobs", sess, d)
}

func (s *Server) runJob(w http.ResponseWriter, r *http.Request, sess *session) {
	name := r.PathValue("job")
	_, err := api.Call(r.Context(), s.cfg.API, sess.caller, "RunJob", &umbrav1.RunJobRequest{Name: name}, s.cfg.API.RunJob)
	s.back(w, r, sess, "/jobs", err, "Job "+name+" started: its run shows below, and on the events page as it goes.")
}

func (s *Server) enableJob(w http.ResponseWriter, r *http.Request, sess *session) {
	name, on := r.PathValue("job"), r.PostFormValue("enabled") == "1"
	_, err := api.Call(r.Context(), s.cfg.API, sess.caller, "SetJobEnabled", &umbrav1.SetJobEnabledRequest{Name: name, Enabled: on}, s.cfg.API.SetJobEnabled)
	what := "disabled: it runs no more until enabled"
	if on {
		what = "enabled"
	}
	s.back(w, r, sess, "/jobs", err, "Job "+name+" "+what+".")
}

func (s *Server) browseMissing(w http.ResponseWriter, r *http.Request, sess *session) {
	s.render(w, r, http.StatusNotFound, "browse", sess, plainData{"Browse files"})
}

// ---- helpers ----

func pct(a, b int64) int64 {
	if b <= 0 {
		return 0
	}
	return min(100, a*100/b)
}

func when(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return t.UTC().Format("2006-01-02 15:04:05 UTC")
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := time.Since(t).Round(time.Second)
	switch {
	case d < time.Minute:
		return "just now"
	case d < time.Hour:
		return fmt.Sprintf("%d min ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%d h ago", int(d.Hours()))
	}
	return fmt.Sprintf("%d days ago", int(d.Hours()/24))
}

// parseSize parses a size such as 10G or 512M ("" or 0: unlimited).
func parseSize(v string) (int64, error) {
	if v = strings.TrimSpace(v); v == "" || v == "0" {
		return 0, nil
	}
	n, err := size.Parse(v)
	if err != nil {
		return 0, fmt.Errorf("maximum size: %w (0 or empty: unlimited)", err)
	}
	return n, nil
}
