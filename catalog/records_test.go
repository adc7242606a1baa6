package catalog

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

type rec struct {
	Name string `json:"name"`
	N    int    `json:"n"`
}

func openTemp(t *testing.T) (*Catalog, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "catalog.db")
	c, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	return c, path
}

// Records put, replaced and deleted are what a reopened catalog reads.
func TestRecordsSurviveReopen(t *testing.T) {
	c, path := openTemp(t)
	if err := c.Put(Sets, "b", rec{"bee", 2}); err != nil {
		t.Fatal(err)
	}
	if err := c.PutAll(Sets, map[string]any{"a": rec{"ay", 1}, "c": rec{"sea", 3}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(Sets, "c", rec{"see", 30}); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(Sets, "a"); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(Sets, "never-there"); err != nil {
		t.Fatalf("deleting a missing record: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var got []string
	if err := Each(c, Sets, func(id string, v rec) { got = append(got, id+"="+v.Name) }, nil); err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, " ") != "b=bee c=see" {
		t.Fatalf("records after reopen: %v, want b=bee c=see in key order", got)
	}
	var v rec
	if ok, err := c.Get(Sets, "c", &v); !ok || err != nil || v.N != 30 {
		t.Fatalf("Get c: %v %v %+v", ok, err, v)
	}
	// Buckets are separate: the same id elsewhere is another record.
	if ok, err := c.Get(Exposures, "c", &v); ok || err != nil {
		t.Fatalf("Get c of another bucket: %v %v", ok, err)
	}
}

// A record that does not decode is reported and skipped; the others are
// read.
func TestEachReportsBadRecords(t *testing.T) {
	c, _ := openTemp(t)
	defer c.Close()
	c.Put(Writers, "good", rec{"ok", 1})
	c.Put(Writers, "bad", "a string where a record should be")
	var good, bad []string
	err := Each(c, Writers, func(id string, v rec) { good = append(good, id) }, func(id string, err error) { bad = append(bad, id) })
	if err != nil {
		t.Fatal(err)
	}
	if len(good) != 1 || good[0] != "good" || len(bad) != 1 || bad[0] != "bad" {
		t.Fatalf("good %v, bad %v", good, bad)
	}
	var v rec
	if ok, err := c.Get(Writers, "bad", &v); !ok || err == nil {
		t.Fatalf("Get of a record that does not decode: %v %v, want an error", ok, err)
	}
}

// PutAll is one transaction: when one record cannot be stored, none is.
func TestPutAllAllOrNothing(t *testing.T) {
	c, _ := openTemp(t)
	defer c.Close()
	err := c.PutAll(Jobs, map[string]any{"a": rec{"ay", 1}, "b": make(chan int), "c": rec{"sea", 3}})
	if err == nil {
		t.Fatal("PutAll stored a record JSON cannot encode")
	}
	n := 0
	Each(c, Jobs, func(string, rec) { n++ }, nil)
	if n != 0 {
		t.Fatalf("%d records stored by a failed PutAll, want none", n)
	}
}

// A bucket the catalog does not have is an error naming it, never a
// crash, and changes nothing.
func TestUnknownBucket(t *testing.T) {
	c, _ := openTemp(t)
	defer c.Close()
	var v rec
	for name, err := range map[string]error{
		"Put":     c.Put("nope", "a", rec{}),
		"PutAll":  c.PutAll("nope", map[string]any{"a": rec{}}),
		"Delete":  c.Delete("nope", "a"),
		"Get":     func() error { _, err := c.Get("nope", "a", &v); return err }(),
		"Each":    Each(c, "nope", func(string, rec) {}, nil),
		"Append":  func() error { _, err := c.Append("nope", "g", rec{}, 3); return err }(),
		"Replace": c.Replace("nope", "g", 1, rec{}),
		"EachLog": EachLog(c, "nope", "", func(string, uint64, rec) bool { return true }),
	} {
		if !errors.Is(err, ErrNoBucket) || !strings.Contains(err.Error(), `"nope"`) {
			t.Errorf("%s on an unknown bucket: %v, want an error naming it", name, err)
		}
	}
}

// A log with keep 0 keeps every record; EachLog stops when fn says so,
// across groups too.
func TestLogUnboundedAndStop(t *testing.T) {
	c, _ := openTemp(t)
	defer c.Close()
	for i := range 5 {
		c.Append(JobRuns, "a", i, 0)
		c.Append(JobRuns, "b", 10+i, 0)
	}
	n := 0
	EachLog(c, JobRuns, "a", func(string, uint64, int) bool { n++; return true })
	if n != 5 {
		t.Fatalf("%d records kept with keep 0, want 5", n)
	}
	var seen []int
	EachLog(c, JobRuns, "", func(g string, _ uint64, v int) bool { seen = append(seen, v); return len(seen) < 7 })
	if len(seen) != 7 || seen[0] != 4 || seen[5] != 14 {
		t.Fatalf("records until stop: %v, want a newest first (4..0) then b from 14, 7 in all", seen)
	}
	if err := c.Replace(JobRuns, "nogroup", 1, 0); err == nil {
		t.Fatal("Replace in a group that does not exist succeeded")
	}
}
