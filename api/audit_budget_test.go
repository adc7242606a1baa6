package api

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"umbra/api/umbrav1"
)

// TestAuditRefusedBudget: a flood of refused calls writes at most
// refusedPerSecond lines a second, and the next line counts the rest;
// served calls are always written.
func TestAuditRefusedBudget(t *testing.T) {
	p := filepath.Join(t.TempDir(), "audit.log")
	a, err := OpenAudit(p)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	const flood = 500
	refused := status.Error(codes.Unauthenticated, "unknown bearer token")
	for range flood {
		if err := a.log(identity{name: "unknown-token"}, "192.0.2.1:4242", "/umbra.v1.Umbra/ListVolumes", &umbrav1.ListVolumesRequest{}, refused, true); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.log(identity{name: "bob", role: RoleOperator}, "192.0.2.2:4242", "/umbra.v1.Umbra/CreateSnapshotSet",
		&umbrav1.CreateSnapshotSetRequest{Volumes: []string{"v"}}, nil, false); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	logged, dropped := 0, 0
	var last map[string]any
	for line := range strings.Lines(string(b)) {
		var l struct {
			Who     string `json:"who"`
			Dropped int    `json:"refused_not_logged"`
		}
		json.Unmarshal([]byte(line), &l)
		json.Unmarshal([]byte(line), &last)
		if l.Who == "unknown-token" {
			logged++
		}
		dropped += l.Dropped
	}
	// The flood may straddle a second: two budgets at most.
	if logged < refusedPerSecond || logged > 2*refusedPerSecond {
		t.Errorf("%d refused calls logged, want %d to %d", logged, refusedPerSecond, 2*refusedPerSecond)
	}
	if logged+dropped != flood {
		t.Errorf("%d logged + %d counted as not logged, want %d", logged, dropped, flood)
	}
	if last["who"] != "bob" || last["result"] != "OK" {
		t.Errorf("the served call after the flood was not written: %v", last)
	}
}

// TestAuditRequestCap: a huge request is summarized by its size.
func TestAuditRequestCap(t *testing.T) {
	p := filepath.Join(t.TempDir(), "audit.log")
	a, err := OpenAudit(p)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	big := &umbrav1.CreateSnapshotSetRequest{Volumes: []string{strings.Repeat("x", 1<<20)}}
	if err := a.log(identity{name: "anonymous"}, "192.0.2.1:1", "/umbra.v1.Umbra/CreateSnapshotSet", big, errors.New("no"), true); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	if len(b) > 2*maxAuditRequest {
		t.Fatalf("a %d-byte audit line for a 1 MiB request", len(b))
	}
	var l map[string]any
	if err := json.Unmarshal(b, &l); err != nil {
		t.Fatalf("%v: %s", err, b)
	}
	if r, _ := l["request"].(string); !strings.Contains(r, "bytes, not logged") {
		t.Errorf("request summary %v", l["request"])
	}
}
