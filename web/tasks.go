package web

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"
)

// maxTasks bounds the finished tasks kept for the tasks page.
const maxTasks = 50

// task is one long piece of work the console started (a verify, a
// prune): its progress is polled by the task page.
type task struct {
	ID      int       `json:"id"`
	Kind    string    `json:"kind"`
	Target  string    `json:"target"`
	Who     string    `json:"who"`
	Started time.Time `json:"started"`
	Ended   time.Time `json:"ended,omitzero"`
	Done    int64     `json:"done"`
	Total   int64     `json:"total"` // 0: unknown
	State   string    `json:"state"` // running, done, failed
	Result  string    `json:"result,omitempty"`
	Error   string    `json:"error,omitempty"`
	Problem bool      `json:"problem"` // done, but found damage
}

// tasks runs and keeps the tasks.
type tasks struct {
	now    func() time.Time
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // the running tasks

	mu   sync.Mutex // guards list, next and the tasks in list
	list []*task
	next int
}

func newTasks(now func() time.Time) *tasks {
	ctx, cancel := context.WithCancel(context.Background())
	return &tasks{now: now, ctx: ctx, cancel: cancel}
}

// taskProgress is what a task's function reports through.
type taskProgress struct {
	ts *tasks
	t  *task
}

// Progress sets how far the task is.
func (p taskProgress) Progress(done, total int64) {
	p.ts.mu.Lock()
	p.t.Done, p.t.Total = done, total
	p.ts.mu.Unlock()
}

// start runs fn as a task; it returns the task's ID. fn's result is
// what the task page says when it is done; problem marks a result that
// needs attention.
func (ts *tasks) start(kind, target, who string, fn func(ctx context.Context, p taskProgress) (result string, problem bool, err error)) int {
	ts.mu.Lock()
	ts.next++
	t := &task{ID: ts.next, Kind: kind, Target: target, Who: who, Started: ts.now(), State: "running"}
	ts.list = append(ts.list, t)
	if len(ts.list) > maxTasks {
		if i := slices.IndexFunc(ts.list, func(t *task) bool { return t.State != "running" }); i >= 0 {
			ts.list = slices.Delete(ts.list, i, i+1)
		}
	}
	ts.mu.Unlock()
	ts.wg.Add(1)
	go func() {
		defer ts.wg.Done()
		res, problem, err := fn(ts.ctx, taskProgress{ts, t})
		ts.mu.Lock()
		defer ts.mu.Unlock()
		t.Ended, t.Result, t.Problem = ts.now(), res, problem
		if err != nil {
			t.State, t.Error = "failed", err.Error()
		} else {
			t.State = "done"
			if t.Total > 0 {
				t.Done = t.Total
			}
		}
	}()
	return t.ID
}

// snapshot copies the tasks, newest first.
func (ts *tasks) snapshot() []task {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	out := make([]task, 0, len(ts.list))
	for i := len(ts.list) - 1; i >= 0; i-- {
		out = append(out, *ts.list[i])
	}
	return out
}

func (ts *tasks) get(id int) (task, bool) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	for _, t := range ts.list {
		if t.ID == id {
			return *t, true
		}
	}
	return task{}, false
}

// close cancels the running tasks and waits for them.
func (ts *tasks) close() {
	ts.cancel()
	ts.wg.Wait()
}

type tasksData struct{ Tasks []task }

func (tasksData) title() string { return "Tasks" }

func (s *Server) tasksPage(w http.ResponseWriter, r *http.Request, sess *session) {
	s.render(w, r, http.StatusOK, "tasks", sess, tasksData{s.tasks.snapshot()})
}

type taskData struct{ Task task }

func (d taskData) title() string { return "Task " + strconv.Itoa(d.Task.ID) }

// taskPage shows one task; with Accept: application/json it is the
// task's progress, which the page's script polls.
func (s *Server) taskPage(w http.ResponseWriter, r *http.Request, sess *session) {
	id, _ := strconv.Atoi(r.PathValue("id"))
	t, ok := s.tasks.get(id)
	if !ok {
		s.render(w, r, http.StatusNotFound, "error", sess, errorPage{Title: "No such task", Message: "That task is not known: the service keeps the last 50 and forgets them when it restarts. See the task list."})
		return
	}
	if r.Header.Get("Accept") == "application/json" {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		json.NewEncoder(w).Encode(t)
		return
	}
	s.render(w, r, http.StatusOK, "task", sess, taskData{t})
}
