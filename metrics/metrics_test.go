package metrics_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"umbra/cow"
	"umbra/metrics"
	"umbra/provider"
)

// scraper fetches /metrics over HTTP and reads single samples from it.
type scraper struct {
	t    *testing.T
	url  string
	body string
}

func (s *scraper) scrape() {
	s.t.Helper()
	resp, err := http.Get(s.url)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		s.t.Fatalf("GET %s: %s %v", s.url, resp.Status, err)
	}
	if ct := resp.Header.Get("Content-Type"); !regexp.MustCompile(`^text/plain`).MatchString(ct) {
		s.t.Errorf("content type %q, want the Prometheus text format", ct)
	}
	s.body = string(b)
}

// value is a sample's value; missing is -1.
func (s *scraper) value(sample string) float64 {
	m := regexp.MustCompile("(?m)^" + regexp.QuoteMeta(sample) + ` (\S+)$`).FindStringSubmatch(s.body)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		s.t.Fatalf("%s: %v", sample, err)
	}
	return v
}

// TestScrape serves the metrics of a real COW volume over HTTP and
// checks that they follow a snapshot, the writes it preserves, a
// committed set, a writer failure and NBD requests.
func TestScrape(t *testing.T) {
	dir := t.TempDir()
	origin := filepath.Join(dir, "a.img")
	os.WriteFile(origin, nil, 0o600)
	os.Truncate(origin, 4<<20)
	v, err := cow.Open("a", origin, cow.Options{StorageDir: filepath.Join(dir, "shadow"), MaxStorage: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	p := cow.NewProvider()
	if err := p.Add(v); err != nil {
		t.Fatal(err)
	}
	m := metrics.New(p)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- m.Serve(ctx, l) }()
	s := &scraper{t: t, url: "http://" + l.Addr().String() + "/metrics"}

	s.scrape()
	for sample, want := range map[string]float64{
		`umbra_diff_area_limit_bytes{volume="a"}`:     2 << 20,
		`umbra_diff_area_used_bytes{volume="a"}`:      0,
		`umbra_diff_area_allocated_bytes{volume="a"}`: 0,
		`umbra_snapshots{volume="a"}`:                 0,
		`umbra_preserved_chunks_total{volume="a"}`:    0,
		`umbra_hold_seconds_count`:                    0,
		`umbra_freeze_seconds_count`:                  0,
	} {
		if got := s.value(sample); got != want {
			t.Errorf("before: %s = %v, want %v", sample, got, want)
		}
	}

	data := bytes.Repeat([]byte{0x5a}, 64<<10)
	if _, err := v.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(bytes.Repeat([]byte{0xa5}, 64<<10), 0); err != nil { // 16 chunks of 4 KiB preserved
		t.Fatal(err)
	}
	m.ObserveSet(3*time.Millisecond, 40*time.Millisecond)
	m.ObserveSet(time.Millisecond, 0) // no writers: no freeze
	m.WriterFailed("sqlite:/db", "freeze")
	m.NBD("write", false)
	m.NBD("write", false)
	m.NBD("read", false)
	m.NBD("read", true)
	m.JobRun("nightly", "success", time.Unix(1700000000, 0))
	m.JobRun("nightly", "failed", time.Unix(1700000100, 0))
	m.JobRun("nightly", "failed", time.Unix(1700000200, 0))
	m.JobLastSuccess("weekly", time.Unix(1600000000, 0)) // from the history, at start
	m.WatchLive(func() []metrics.LiveStat {
		return []metrics.LiveStat{{Volume: "r", Size: 8 << 20, Restored: 3 << 20, Demand: 7, Waiting: true}}
	})

	s.scrape()
	for sample, want := range map[string]float64{
		`umbra_diff_area_limit_bytes{volume="a"}`:                         2 << 20,
		`umbra_snapshots{volume="a"}`:                                     1,
		`umbra_preserved_chunks_total{volume="a"}`:                        16,
		`umbra_hold_seconds_count`:                                        2,
		`umbra_freeze_seconds_count`:                                      1,
		`umbra_writer_failures_total{phase="freeze",writer="sqlite:/db"}`: 1,
		`umbra_nbd_requests_total{command="write"}`:                       2,
		`umbra_nbd_requests_total{command="read"}`:                        1,
		`umbra_nbd_errors_total{command="read"}`:                          1,
		`umbra_hold_seconds_bucket{le="+Inf"}`:                            2,
		`umbra_freeze_seconds_bucket{le="+Inf"}`:                          1,
		`umbra_job_runs_total{job="nightly",result="success"}`:            1,
		`umbra_job_runs_total{job="nightly",result="failed"}`:             2,
		`umbra_job_last_success_timestamp_seconds{job="nightly"}`:         1700000000,
		`umbra_job_last_success_timestamp_seconds{job="weekly"}`:          1600000000,
		`umbra_live_restore_size_bytes{volume="r"}`:                       8 << 20,
		`umbra_live_restore_restored_bytes{volume="r"}`:                   3 << 20,
		`umbra_live_restore_demand_chunks_total{volume="r"}`:              7,
		`umbra_live_restore_waiting{volume="r"}`:                          1,
	} {
		if got := s.value(sample); got != want {
			t.Errorf("after: %s = %v, want %v", sample, got, want)
		}
	}
	used := s.value(`umbra_diff_area_used_bytes{volume="a"}`)
	if used < 64<<10 {
		t.Errorf("diff area used %v bytes after 64 KiB was preserved", used)
	}
	if a := s.value(`umbra_diff_area_allocated_bytes{volume="a"}`); a < used {
		t.Errorf("diff area allocated %v bytes, less than the %v used", a, used)
	}
	if s.value("go_goroutines") < 1 || s.value("process_open_fds") < 1 {
		t.Errorf("the Go and process collectors are missing")
	}

	if err := v.DeleteSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	s.scrape()
	if got := s.value(`umbra_snapshots{volume="a"}`); got != 0 {
		t.Errorf("after delete: %v snapshots", got)
	}
	if got := s.value(`umbra_preserved_chunks_total{volume="a"}`); got != 16 {
		t.Errorf("a counter went back after delete: %v", got)
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve after its context ended: %v", err)
	}
	if _, err := http.Get(s.url); err == nil {
		t.Error("the listener still answers after its context ended")
	}
}

// TestNilMetrics: a server built without metrics calls the hooks on nil.
func TestNilMetrics(t *testing.T) {
	var m *metrics.Metrics
	m.ObserveSet(time.Second, time.Second)
	m.WriterFailed("w", "freeze")
	m.NBD("read", true)
}
