package web

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"umbra/api"
	"umbra/api/umbrav1"
	"umbra/cow"
	"umbra/provider"
)

// fakeSource is a made-up service of many volumes and snapshots, of the
// shape the API returns: the overview's rendering measured without
// making 5 000 snapshots.
type fakeSource struct {
	vols  []*umbrav1.Volume
	snaps []*umbrav1.Snapshot
	jobs  []*umbrav1.Job
}

func newFakeSource(nvol, nsnap int) *fakeSource {
	f := &fakeSource{}
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	for v := range nvol {
		name := fmt.Sprintf("vol%02d", v)
		max := int64(10 << 30)
		used := max * int64(v%10) / 10
		f.vols = append(f.vols, &umbrav1.Volume{Name: name, Origin: "/dev/vg/" + name, Size: 100 << 30, ChunkSize: 4096,
			Provider: "cow", CanShadowCopy: true, Snapshots: int32(nsnap / nvol),
			Storage: &umbrav1.Storage{Volume: name, Dir: "/srv/shadow", MaxBytes: max, UsedBytes: used, Policy: "delete-oldest"}})
		for i := range nsnap / nvol {
			s := &umbrav1.Snapshot{Volume: name, Id: fmt.Sprintf("s%04d", i), Provider: "cow", SetId: fmt.Sprintf("set-%d", i),
				Created: timestamppb.New(t0.Add(time.Duration(i) * time.Hour)), Persistent: true, Valid: true, State: provider.StateValid,
				Size: 100 << 30, DiffBytes: 1 << 20}
			switch {
			case i == nsnap/nvol-1:
				s.State = provider.StateBackupBase
			case v%7 == 0 && i == 3:
				s.Valid, s.State, s.Reason = false, provider.StateInvalid, "shadow storage full"
			}
			f.snaps = append(f.snaps, s)
		}
	}
	// A nightly backup of every volume but the last, one failed.
	var names []string
	for _, v := range f.vols[:len(f.vols)-1] {
		names = append(names, v.Name)
	}
	f.jobs = []*umbrav1.Job{
		{Name: "nightly", Kind: "backup", Schedule: "*-*-* 02:00", Enabled: true, Volumes: names[:len(names)/2], Repo: "/srv/backup",
			Last: &umbrav1.JobRun{Job: "nightly", Seq: 40, Result: "success", Start: timestamppb.New(t0), End: timestamppb.New(t0.Add(time.Hour))},
			Next: timestamppb.New(t0.Add(24 * time.Hour))},
		{Name: "nightly-b", Kind: "backup", Schedule: "*-*-* 03:00", Enabled: true, Volumes: names[len(names)/2:], Repo: "/srv/backup",
			Last: &umbrav1.JobRun{Job: "nightly-b", Seq: 40, Result: "failed", Error: "repository locked", Start: timestamppb.New(t0), End: timestamppb.New(t0.Add(time.Hour))},
			Next: timestamppb.New(t0.Add(24 * time.Hour))},
	}
	return f
}

func (f *fakeSource) Volumes(context.Context, api.Caller) ([]*umbrav1.Volume, error) {
	return f.vols, nil
}
func (f *fakeSource) Snapshots(_ context.Context, _ api.Caller, vol string) ([]*umbrav1.Snapshot, error) {
	if vol == "" {
		return f.snaps, nil
	}
	var out []*umbrav1.Snapshot
	for _, s := range f.snaps {
		if s.Volume == vol {
			out = append(out, s)
		}
	}
	return out, nil
}
func (f *fakeSource) Writers(context.Context, api.Caller) ([]*umbrav1.Writer, error) { return nil, nil }
func (f *fakeSource) Jobs(context.Context, api.Caller) ([]*umbrav1.Job, error)       { return f.jobs, nil }
func (f *fakeSource) Mappings(context.Context, api.Caller) ([]*umbrav1.ShareMapping, error) {
	return nil, nil
}

// BenchmarkOverviewFakeSource50Volumes5000Snapshots: server time of the
// overview page of 50 volumes with 100 snapshots each (a made-up
// source behind the interface the page renders from), and its weight.
func BenchmarkOverviewFakeSource50Volumes5000Snapshots(b *testing.B) {
	benchPage(b, newFakeSource(50, 5000), "/")
}

// BenchmarkVolumePageFakeSource100Snapshots: one volume's page with its
// 100 snapshots on the timeline and in the table.
func BenchmarkVolumePageFakeSource100Snapshots(b *testing.B) {
	benchPage(b, newFakeSource(50, 5000), "/volumes/vol07")
}

func benchPage(b *testing.B, src Source, path string) {
	tokens := filepath.Join(b.TempDir(), "tokens")
	if err := os.WriteFile(tokens, []byte("token bench-token-0123456789 viewer bench\n"), 0o600); err != nil {
		b.Fatal(err)
	}
	ids, err := api.LoadIdentities(tokens)
	if err != nil {
		b.Fatal(err)
	}
	s, err := New(Config{API: api.NewServer(cow.NewProvider(), &provider.Registry{}, nil, nil, nil), Identities: ids, Source: src})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	c, _ := ids.ByToken("bench-token-0123456789")
	sess := s.sessions.start(c)
	h := s.Handler()
	req := httptest.NewRequest(http.MethodGet, path, nil)
	req.AddCookie(&http.Cookie{Name: cookieName, Value: sess.id})
	var size int
	b.ReportAllocs()
	for b.Loop() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusOK {
			b.Fatalf("%s: %d %s", path, w.Code, w.Body.String())
		}
		size = w.Body.Len()
	}
	b.ReportMetric(float64(size), "page-bytes")
}

// TestVolumeNamedByPath: a volume named by its path (a reflink file, a
// btrfs subvolume) links to its page as one escaped segment, and that
// page finds it.
func TestVolumeNamedByPath(t *testing.T) {
	src := newFakeSource(2, 4)
	const name = "/srv/vms/db.img"
	src.vols[1].Name = name
	for _, sn := range src.snaps {
		if sn.Volume == "vol01" {
			sn.Volume = name
		}
	}
	tokens := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(tokens, []byte("token path-token-0123456789 viewer t\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ids, err := api.LoadIdentities(tokens)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{API: api.NewServer(cow.NewProvider(), &provider.Registry{}, nil, nil, nil), Identities: ids, Source: src})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c, _ := ids.ByToken("path-token-0123456789")
	sess := s.sessions.start(c)
	get := func(path string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodGet, path, nil)
		req.AddCookie(&http.Cookie{Name: cookieName, Value: sess.id})
		w := httptest.NewRecorder()
		s.Handler().ServeHTTP(w, req)
		return w
	}
	const link = "/volumes/%2Fsrv%2Fvms%2Fdb.img"
	if w := get("/"); w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `href="`+link+`"`) {
		t.Fatalf("overview: %d, no link %s in:\n%s", w.Code, link, w.Body.String())
	}
	w := get(link)
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), name) || !strings.Contains(w.Body.String(), link+"/snapshots") {
		t.Fatalf("%s: %d\n%s", link, w.Code, w.Body.String())
	}
}
