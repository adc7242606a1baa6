package coordinator

import (
	"context"
	"path/filepath"
	"testing"

	"umbra/writer"
	wsqlite "umbra/writer/sqlite"
)

// onSet is the real SQLite writer as if its database's directory were
// mounted from the set's volume (the one thing faked: the mount lookup;
// cmd/umbra's TestSQLiteWriterNoDatabase goes through a real mount).
type onSet struct{ *wsqlite.Writer }

func (onSet) Involved(writer.Set) bool { return true }

// A configured database that does not exist yet does not abort the set:
// the writer does not participate, the set commits, and the writer's
// state says so.
func TestIdleWriterDoesNotBlockSet(t *testing.T) {
	_, reg := cowVolumes(t, "a")
	ws := writer.NewRegistry()
	db := filepath.Join(t.TempDir(), "not-yet", "app.db")
	w := onSet{wsqlite.New(db)}
	ws.Add(w)
	app := &recWriter{name: "app"}
	ws.Add(app)
	c := New(reg, ws, nil, nil)
	set, err := c.CreateSet(context.Background(), Request{Volumes: []string{"a"}, Writers: true})
	if err != nil {
		t.Fatalf("set with a writer that has nothing to quiesce: %v", err)
	}
	if len(set.Writers) != 1 || set.Writers[0] != "app" || !app.seen("freeze") {
		t.Fatalf("set's writers %v (app phases %v), want only app", set.Writers, app.phases)
	}
	for _, st := range ws.States() {
		if st.Name == w.Name() && (st.State != writer.StateNotParticipating || st.LastError != "") {
			t.Fatalf("idle writer's state %+v, want %q without error", st, writer.StateNotParticipating)
		}
	}
}
