package api_test

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"umbra/api"
	"umbra/api/umbrav1"
	"umbra/coordinator"
	"umbra/cow"
	"umbra/provider"
	"umbra/writer"
)

// countingProvider is the COW provider counting the snapshot
// transactions it is asked to prepare: only the coordinator prepares one.
type countingProvider struct {
	*cow.Provider
	prepared atomic.Int32
}

func (p *countingProvider) Prepare(ctx context.Context, vol string, opts provider.SnapshotOptions) (provider.Txn, error) {
	p.prepared.Add(1)
	return p.Provider.Prepare(ctx, vol, opts)
}

// TestCreateSnapshotSetThroughCoordinator: a snapshot set asked for
// through the API, with or without writers, is made by the coordinator
// (the one path that makes sets); bad requests are refused as invalid
// before anything is made.
func TestCreateSnapshotSetThroughCoordinator(t *testing.T) {
	dir := t.TempDir()
	p := cow.NewProvider()
	for _, n := range []string{"a", "b"} {
		origin := filepath.Join(dir, n+".img")
		os.WriteFile(origin, nil, 0o600)
		os.Truncate(origin, 1<<20)
		v, err := cow.Open(n, origin, cow.Options{StorageDir: filepath.Join(dir, "shadow-"+n)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { v.Close() })
		p.Add(v)
	}
	cp := &countingProvider{Provider: p}
	reg := &provider.Registry{}
	reg.Register(cp)
	ws := writer.NewRegistry()
	srv := api.NewServer(p, reg, coordinator.New(reg, ws, nil, nil), ws, nil)
	ctx := context.Background()

	resp, err := srv.CreateSnapshotSet(ctx, &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"a", "b"}, Id: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	if n := cp.prepared.Load(); n != 2 {
		t.Fatalf("a set without writers prepared %d transactions through the coordinator, want 2", n)
	}
	if len(resp.Snapshots) != 2 || resp.Snapshots[0].SetId != resp.SetId || resp.Snapshots[1].SetId != resp.SetId {
		t.Fatalf("set %+v", resp)
	}
	if resp.FreezeMicros != 0 {
		t.Fatalf("a set without writers reports %d µs frozen", resp.FreezeMicros)
	}
	if _, err := srv.CreateSnapshotSet(ctx, &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"a"}, Id: "s2", Writers: true}); err != nil {
		t.Fatal(err)
	}
	if n := cp.prepared.Load(); n != 3 {
		t.Fatalf("%d transactions prepared after a set with writers, want 3", n)
	}

	for _, tc := range []struct {
		name string
		req  *umbrav1.CreateSnapshotSetRequest
		code codes.Code
	}{
		{"no volume", &umbrav1.CreateSnapshotSetRequest{}, codes.InvalidArgument},
		{"volume twice", &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"a", "a"}}, codes.InvalidArgument},
		{"bad id", &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"a"}, Id: "../x"}, codes.InvalidArgument},
		{"unknown volume", &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"a", "nosuch"}}, codes.NotFound},
		{"id taken", &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"b", "a"}, Id: "s2"}, codes.AlreadyExists},
	} {
		before := cp.prepared.Load()
		_, err := srv.CreateSnapshotSet(ctx, tc.req)
		if status.Code(err) != tc.code {
			t.Fatalf("%s: %v, want %v", tc.name, err, tc.code)
		}
		for _, name := range []string{"a", "b"} {
			v, _ := p.Volume(name)
			if n := len(v.Snapshots()); n != map[string]int{"a": 2, "b": 1}[name] {
				t.Fatalf("%s: volume %s has %d snapshots after a refused set", tc.name, name, n)
			}
		}
		if tc.name != "id taken" && cp.prepared.Load() != before {
			t.Fatalf("%s: refused only after a transaction was prepared", tc.name)
		}
	}
}
