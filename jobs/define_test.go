package jobs

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"umbra/api/umbrav1"
)

// TestAddRemoveThroughAPI adds a job through the API, refuses bad
// definitions (naming the field) and config jobs' names, keeps the job
// over a new Manager on the same catalog, and removes it.
func TestAddRemoveThroughAPI(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	cfgJob := Def{Name: "tl", Kind: "snapshot", Schedule: "hourly", Volumes: []string{"a"}, Keep: Keep{Hourly: 2}}
	m := w.manager([]Def{cfgJob}, nil)

	add := func(m *Manager, name, def string) (*umbrav1.Job, error) {
		return m.AddJob(ctx, &umbrav1.AddJobRequest{Name: name, Definition: def})
	}
	good := "[[job]]\nkind = \"snapshot\"\nschedule = \"*:*:0/5\"\nvolumes = [\"a\"]\nkeep = { hourly = 2 }\n"
	for _, c := range []struct{ name, def, want string }{
		{"quick", strings.Replace(good, "*:*:0/5", "now-ish", 1), "job quick: schedule:"},
		{"quick", good + "colour = \"red\"\n", "job quick: colour: unknown field"},
		{"quick", strings.Replace(good, "kind", "name = \"other\"\nkind", 1), "job quick: name: \"other\""},
		{"quick", good + "[[job]]\nname = \"b\"\n", "2 [[job]] tables"},
		{"quick", "kind = \"snapshot\"\nschedule = \"hourly\"\nvolumes = [\"a\"]\n", "job quick: keep:"},
		{"tl", good, "job tl: defined in the config file: edit it there"},
	} {
		_, err := add(m, c.name, c.def)
		if !strings.Contains(status.Convert(err).Message(), c.want) {
			t.Errorf("add %q: got %v, want %q", c.def, err, c.want)
		}
	}
	if got := len(m.List()); got != 1 {
		t.Fatalf("refused definitions changed the jobs: %d jobs", got)
	}
	j, err := add(m, "quick", good)
	if err != nil {
		t.Fatal(err)
	}
	if j.Source != SourceAPI || j.Kind != "snapshot" || j.Next == nil {
		t.Fatalf("added job: %v", j)
	}
	if _, err := add(m, "quick", good); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("added twice: %v", err)
	}
	if err := m.SetEnabled("quick", false); err != nil {
		t.Fatal(err)
	}
	if _, err := m.RemoveJob(ctx, &umbrav1.RemoveJobRequest{Name: "tl"}); !strings.Contains(status.Convert(err).Message(), "defined in the config file: edit it there") {
		t.Fatalf("removed a config job: %v", err)
	}

	m2 := w.manager([]Def{cfgJob}, nil)
	var sources []string
	for _, st := range m2.List() {
		sources = append(sources, st.Name+"="+st.Source)
	}
	if strings.Join(sources, " ") != "tl=config quick=api" {
		t.Fatalf("jobs after a restart: %v", sources)
	}
	if st, _ := m2.Get("quick"); st.Enabled || st.Schedule != "*:*:0/5" {
		t.Fatalf("quick after a restart: %+v", st)
	}
	if err := w.runAt(m2, "quick", w.clock.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := m2.RemoveJob(ctx, &umbrav1.RemoveJobRequest{Name: "quick"}); err != nil {
		t.Fatal(err)
	}
	if _, err := m2.Get("quick"); err == nil {
		t.Fatal("removed job still there")
	}
	if got := len(w.manager([]Def{cfgJob}, nil).List()); got != 1 {
		t.Fatalf("removed job back after a restart: %d jobs", got)
	}
	if _, err := m2.RemoveJob(ctx, &umbrav1.RemoveJobRequest{Name: "quick"}); status.Code(err) != codes.NotFound {
		t.Fatalf("removed twice: %v", err)
	}
}
