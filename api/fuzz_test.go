package api_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"umbra/api"
	"umbra/api/umbrav1"
	"umbra/catalog"
	"umbra/cow"
	"umbra/provider"
)

// newTestServer is an API server over one 1 MiB COW volume "v" in dir,
// without coordinator or writers.
// newAuditedServer is newTestServer with an audit log, dir/audit.log,
// whose path it returns.
func newAuditedServer(t testing.TB, dir string) (*api.Server, string) {
	t.Helper()
	srv := newTestServer(t, dir)
	path := filepath.Join(dir, "audit.log")
	var err error
	if srv.Audit, err = api.OpenAudit(path); err != nil {
		t.Fatal(err)
	}
	return srv, path
}

func newTestServer(t testing.TB, dir string) *api.Server {
	t.Helper()
	origin := filepath.Join(dir, "v.img")
	os.WriteFile(origin, nil, 0o600)
	os.Truncate(origin, 1<<20)
	v, err := cow.Open("v", origin, cow.Options{StorageDir: filepath.Join(dir, "shadow")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	p := cow.NewProvider()
	p.Add(v)
	reg := &provider.Registry{}
	reg.Register(p)
	return api.NewServer(p, reg, nil, nil, nil)
}

// fuzzState is what a refused request must leave as it was.
func fuzzState(ctx context.Context, t *testing.T, s *api.Server) string {
	var b strings.Builder
	snaps, err := s.ListSnapshots(ctx, &umbrav1.ListSnapshotsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, sn := range snaps.Snapshots {
		fmt.Fprintf(&b, "snap %s %s %v\n", sn.Volume, sn.Id, sn.Valid)
	}
	st, _ := s.GetStorage(ctx, &umbrav1.GetStorageRequest{})
	for _, x := range st.Storage {
		fmt.Fprintf(&b, "storage %s %s %d %s\n", x.Volume, x.Dir, x.MaxBytes, x.Policy)
	}
	sets, _ := s.ListShadowCopySets(ctx, &umbrav1.ListShadowCopySetsRequest{})
	for _, x := range sets.Sets {
		fmt.Fprintf(&b, "set %s %s %d\n", x.Id, x.State, len(x.ShadowCopies))
	}
	maps, _ := s.ListShareMappings(ctx, &umbrav1.ListShareMappingsRequest{})
	for _, m := range maps.Mappings {
		fmt.Fprintf(&b, "map %s\n", m.NbdExport)
	}
	return b.String()
}

// FuzzHandlers calls the API's handlers with random field values, in any
// state, with unknown IDs: every error is a typed gRPC status (never
// Unknown or Internal), nothing panics, and a refused request changes
// nothing (snapshots, storage, sets, share mappings).
func FuzzHandlers(f *testing.F) {
	dir := f.TempDir()
	srv := newTestServer(f, dir)
	cat, err := catalog.Open(filepath.Join(dir, "catalog.db"))
	if err != nil {
		f.Fatal(err)
	}
	ctx := context.Background()
	srv.EnableShares(ctx, cat, filepath.Join(dir, "exposed"), "", time.Hour)
	defer srv.CloseShares()

	for i, seed := range []struct {
		a, b string
		n    int64
	}{{"v", "s1", 0}, {"v", "", -1}, {"", "x", 1 << 40}, {"nope", "../../etc", 5}, {"fss-0", "sc-0", 0}, {"v", "s1", 4096}, {"backup", "/", 1}} {
		for op := 0; op < 20; op++ {
			f.Add(uint8(op), seed.a, seed.b, seed.n, i%2 == 0)
		}
	}
	f.Fuzz(func(t *testing.T, op uint8, a, b string, n int64, flag bool) {
		before := fuzzState(ctx, t, srv)
		var err error
		var req proto.Message
		switch op % 20 {
		case 0:
			req = &umbrav1.ListSnapshotsRequest{Volume: a}
			_, err = srv.ListSnapshots(ctx, req.(*umbrav1.ListSnapshotsRequest))
		case 1:
			r := &umbrav1.CreateSnapshotSetRequest{Volumes: []string{a}, Id: b, HoldTimeoutMs: n % 100000, Persistent: flag}
			req = r
			_, err = srv.CreateSnapshotSet(ctx, r)
		case 2:
			r := &umbrav1.DeleteSnapshotsRequest{Volume: a, Id: b, Oldest: flag && n%2 == 0}
			req = r
			_, err = srv.DeleteSnapshots(ctx, r)
		case 3:
			r := &umbrav1.RevertSnapshotRequest{Volume: a, Id: b}
			req = r
			_, err = srv.RevertSnapshot(ctx, r)
		case 4:
			// A directory under the test's, never anywhere else.
			r := &umbrav1.SetStorageRequest{Volume: a, Dir: filepath.Join(dir, "st", filepath.Base(filepath.Clean("/"+b))), MaxBytes: n, Policy: b}
			req = r
			_, err = srv.SetStorage(ctx, r)
		case 5:
			_, err = srv.GetStorage(ctx, &umbrav1.GetStorageRequest{Volume: a})
		case 6:
			// A set whose timer runs out is aborted behind the back of a
			// later op, which would then seem to change the state though
			// refused: timeouts stay above the fuzzing time (the timer
			// itself is tested in cmd/umbra's FSRVP test).
			timeout := uint32(n)
			if timeout != 0 && timeout < 3600_000 {
				timeout += 3600_000
			}
			_, err = srv.StartShadowCopySet(ctx, &umbrav1.StartShadowCopySetRequest{Context: a, TimeoutMs: timeout})
		case 7:
			_, err = srv.AddToShadowCopySet(ctx, &umbrav1.AddToShadowCopySetRequest{SetId: a, Path: b})
		case 8:
			_, err = srv.PrepareShadowCopySet(ctx, &umbrav1.SetRequest{SetId: a})
		case 9:
			_, err = srv.CommitShadowCopySet(ctx, &umbrav1.SetRequest{SetId: a, NoWriters: flag})
		case 10:
			_, err = srv.ExposeShadowCopySet(ctx, &umbrav1.SetRequest{SetId: a, NoMount: true})
		case 11:
			_, err = srv.RecoveryCompleteShadowCopySet(ctx, &umbrav1.SetRequest{SetId: a})
		case 12:
			_, err = srv.AbortShadowCopySet(ctx, &umbrav1.SetRequest{SetId: a})
		case 13:
			_, err = srv.GetShareMapping(ctx, &umbrav1.ShareMappingRequest{SetId: a, ShadowCopyId: b})
		case 14:
			_, err = srv.DeleteShareMapping(ctx, &umbrav1.ShareMappingRequest{SetId: a, ShadowCopyId: b})
		case 15:
			_, err = srv.ExposeSnapshot(ctx, &umbrav1.ExposeSnapshotRequest{Volume: a, Id: b, NoMount: !flag, Dir: "/" + filepath.Join(dir, "x")})
		case 16:
			_, err = srv.UnexposeSnapshot(ctx, &umbrav1.UnexposeSnapshotRequest{Volume: a, Id: b})
		case 17:
			_, err = srv.IsPathSupported(ctx, &umbrav1.PathRequest{Path: a})
		case 18:
			_, err = srv.SetContext(ctx, &umbrav1.SetContextRequest{Context: a})
		case 19:
			_, err = srv.IsPathShadowCopied(ctx, &umbrav1.PathRequest{Path: a})
		}
		_ = req
		if err == nil {
			return
		}
		st, ok := status.FromError(err)
		if !ok || st.Code() == codes.Unknown || st.Code() == codes.Internal {
			t.Fatalf("op %d (%q, %q, %d, %v): untyped error %v", op%20, a, b, n, flag, err)
		}
		if after := fuzzState(ctx, t, srv); after != before {
			t.Fatalf("op %d (%q, %q, %d, %v) failed with %v but changed the state:\nbefore:\n%s\nafter:\n%s", op%20, a, b, n, flag, err, before, after)
		}
	})
}
