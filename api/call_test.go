package api_test

import (
	"context"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"umbra/api"
	"umbra/api/umbrav1"
)

// TestCallAsIdentity: an in-process call as an identity gets the same
// role check and audit lines as the same call over gRPC: a viewer's
// delete is refused and logged, an operator's snapshot is made and
// logged, a viewer's list is neither refused nor logged.
func TestCallAsIdentity(t *testing.T) {
	dir := t.TempDir()
	srv, logPath := newAuditedServer(t, dir)
	ctx := context.Background()
	viewer := api.NewCaller("alice", api.RoleViewer, "web 192.0.2.1:1")
	operator := api.NewCaller("bob", api.RoleOperator, "web 192.0.2.2:2")
	if _, err := api.Call(ctx, srv, viewer, "ListVolumes", &umbrav1.ListVolumesRequest{}, srv.ListVolumes); err != nil {
		t.Fatalf("viewer list: %v", err)
	}
	if _, err := api.Call(ctx, srv, operator, "CreateSnapshotSet", &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"v"}, Id: "s1"}, srv.CreateSnapshotSet); err != nil {
		t.Fatalf("operator create: %v", err)
	}
	_, err := api.Call(ctx, srv, viewer, "DeleteSnapshots", &umbrav1.DeleteSnapshotsRequest{Volume: "v", Id: "s1"}, srv.DeleteSnapshots)
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("viewer delete: %v, want PermissionDenied", err)
	}
	list, err := srv.ListSnapshots(ctx, &umbrav1.ListSnapshotsRequest{Volume: "v"})
	if err != nil || len(list.GetSnapshots()) != 1 {
		t.Fatalf("after the refused delete: %v %v, want s1 still there", list, err)
	}
	if viewer.May("DeleteSnapshots") || !operator.May("CreateSnapshotSet") || operator.May(api.ActionPruneRepository) {
		t.Fatal("May disagrees with the roles")
	}
	lines := auditLines(t, logPath)
	want := []struct{ who, method, result, addr string }{
		{"bob", "/umbra.v1.Umbra/CreateSnapshotSet", "OK", "web 192.0.2.2:2"},
		{"alice", "/umbra.v1.Umbra/DeleteSnapshots", "PermissionDenied", "web 192.0.2.1:1"},
	}
	if len(lines) != len(want) {
		t.Fatalf("audit lines %v, want %d", lines, len(want))
	}
	for i, w := range want {
		l := lines[i]
		if l["who"] != w.who || l["method"] != w.method || l["result"] != w.result || l["addr"] != w.addr {
			t.Errorf("audit line %d: %v, want %+v", i, l, w)
		}
	}
}
