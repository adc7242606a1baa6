package catalog

import (
	"path/filepath"
	"testing"
)

func TestLogBoundedNewestFirst(t *testing.T) {
	path := filepath.Join(t.TempDir(), "catalog.db")
	c, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 7; i++ {
		seq, err := c.Append(JobRuns, "a", i, 3)
		if err != nil || seq != uint64(i) {
			t.Fatalf("append %d: seq %d, %v", i, seq, err)
		}
	}
	c.Append(JobRuns, "b", 100, 3)
	if err := c.Replace(JobRuns, "a", 7, 70); err != nil {
		t.Fatal(err)
	}
	if err := c.Replace(JobRuns, "a", 1, 10); err == nil {
		t.Fatal("replacing a dropped record succeeded")
	}
	c.Close()
	// Reopened: the bound held, the sequence goes on.
	if c, err = Open(path); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var got []int
	EachLog(c, JobRuns, "a", func(g string, seq uint64, v int) bool { got = append(got, v); return true })
	if want := []int{70, 6, 5}; len(got) != 3 || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("records %v, want %v", got, want)
	}
	if seq, _ := c.Append(JobRuns, "a", 8, 3); seq != 8 {
		t.Fatalf("sequence after reopen: %d, want 8", seq)
	}
	var groups []string
	EachLog(c, JobRuns, "", func(g string, seq uint64, v int) bool { groups = append(groups, g); return true })
	if len(groups) != 4 || groups[0] != "a" || groups[3] != "b" {
		t.Fatalf("all groups: %v", groups)
	}
	var v int
	if ok, err := c.Get(JobRuns, "nope", &v); ok || err != nil {
		t.Fatalf("Get of a missing record: %v %v", ok, err)
	}
}
