package web

import (
	"bytes"
	"net/http"
	"strings"

	"github.com/BurntSushi/toml"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"umbra/api"
	"umbra/api/umbrav1"
	"umbra/jobs"
)

// jobForm is the jobs page's form that adds a job, as it was posted: a
// refused one is shown again with what was wrong.
type jobForm struct {
	Name, Kind, Schedule, Volumes, Repo, More string
	Error                                     string
}

// Kinds are the kinds of job the form offers.
func (jobForm) Kinds() []string { return jobs.KindNames() }

// definition is the form as one job's TOML keys, as `umbra jobs add
// --from-file` takes them: the fields it has, then the other keys as
// typed.
func (f jobForm) definition() (string, error) {
	keys := map[string]any{"kind": f.Kind, "schedule": f.Schedule}
	if vols := strings.FieldsFunc(f.Volumes, func(r rune) bool { return r == ',' || r == ' ' }); len(vols) > 0 {
		keys["volumes"] = vols
	}
	if f.Repo != "" {
		keys["repo"] = f.Repo
	}
	var b bytes.Buffer
	if err := toml.NewEncoder(&b).Encode(keys); err != nil {
		return "", err
	}
	b.WriteString("\n")
	b.WriteString(f.More)
	return b.String(), nil
}

// addJob defines a job through the API, as `umbra jobs add` does
// (operator, audited). A job the service refuses shows the form again
// with the service's reason, which names the field.
func (s *Server) addJob(w http.ResponseWriter, r *http.Request, sess *session) {
	f := jobForm{
		Name:     strings.TrimSpace(r.PostFormValue("name")),
		Kind:     r.PostFormValue("kind"),
		Schedule: strings.TrimSpace(r.PostFormValue("schedule")),
		Volumes:  strings.TrimSpace(r.PostFormValue("volumes")),
		Repo:     strings.TrimSpace(r.PostFormValue("repo")),
		More:     strings.ReplaceAll(r.PostFormValue("more"), "\r\n", "\n"),
	}
	def, err := f.definition()
	if err != nil {
		err = status.Errorf(codes.InvalidArgument, "job %s: %v", f.Name, err)
	} else {
		_, err = api.Call(r.Context(), s.cfg.API, sess.caller, "AddJob", &umbrav1.AddJobRequest{Name: f.Name, Definition: def}, s.cfg.API.AddJob)
	}
	if err != nil {
		f.Error = explain(err)
		s.jobsPageWith(w, r, sess, http.StatusUnprocessableEntity, f)
		return
	}
	s.back(w, r, sess, "/jobs", nil, "Job "+f.Name+" added: it is scheduled, and kept over restarts until removed here or with umbra jobs remove.")
}

// removeJob removes a job added through the API, as `umbra jobs remove`
// does (operator, audited).
func (s *Server) removeJob(w http.ResponseWriter, r *http.Request, sess *session) {
	name := r.PathValue("job")
	_, err := api.Call(r.Context(), s.cfg.API, sess.caller, "RemoveJob", &umbrav1.RemoveJobRequest{Name: name}, s.cfg.API.RemoveJob)
	s.back(w, r, sess, "/jobs", err, "Job "+name+" removed: its history stays in the catalog.")
}
