// Package metrics exposes the service's Prometheus metrics on an opt-in
// HTTP listener (umbra serve --metrics-listen): diff-area bytes used and
// allowed per volume, preserved copies, live snapshots, hold and freeze
// durations of snapshot sets, writer failures, NBD requests and errors,
// NBD buffers, job runs and each job's last success, live restores'
// progress.
// Engine figures are read at scrape time; events are counted as they
// happen through the hooks below.
package metrics

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"umbra/cow"
	"umbra/nbd"
)

// Metrics holds the collectors of one service.
type Metrics struct {
	reg         *prometheus.Registry
	hold        prometheus.Histogram
	freeze      prometheus.Histogram
	writerFails *prometheus.CounterVec
	nbdReqs     *prometheus.CounterVec
	nbdErrs     *prometheus.CounterVec
	nbdReqCtrs  sync.Map // command -> prometheus.Counter of nbdReqs
	nbdErrCtrs  sync.Map // command -> prometheus.Counter of nbdErrs
	nbd         *nbdServers
	jobRuns     *prometheus.CounterVec
	jobSuccess  *prometheus.GaugeVec
	memPending  prometheus.Gauge
	live        *live
}

var (
	descNBDHeld    = prometheus.NewDesc("umbra_nbd_buffered_bytes", "Bytes NBD connections hold for read replies not yet sent and write payloads not yet written.", nil, nil)
	descNBDWaiting = prometheus.NewDesc("umbra_nbd_waiting_connections", "NBD connections that stopped reading requests until their client reads replies (or their writes finish).", nil, nil)
)

// nbdServers reads the NBD servers' buffers at scrape time.
type nbdServers struct {
	mu   sync.Mutex // guards srvs
	srvs []*nbd.Server
}

func (n *nbdServers) Describe(ch chan<- *prometheus.Desc) {
	ch <- descNBDHeld
	ch <- descNBDWaiting
}

func (n *nbdServers) Collect(ch chan<- prometheus.Metric) {
	n.mu.Lock()
	var held int64
	var waiting int
	for _, s := range n.srvs {
		st := s.BufferStats()
		held, waiting = held+st.Held, waiting+st.Waiting
	}
	n.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(descNBDHeld, prometheus.GaugeValue, float64(held))
	ch <- prometheus.MustNewConstMetric(descNBDWaiting, prometheus.GaugeValue, float64(waiting))
}

// WatchNBD adds an NBD server's buffers to umbra_nbd_buffered_bytes and
// umbra_nbd_waiting_connections.
func (m *Metrics) WatchNBD(s *nbd.Server) {
	if m == nil {
		return
	}
	m.nbd.mu.Lock()
	m.nbd.srvs = append(m.nbd.srvs, s)
	m.nbd.mu.Unlock()
}

var (
	descUsed  = prometheus.NewDesc("umbra_diff_area_used_bytes", "Shadow storage used by a volume's snapshots.", []string{"volume"}, nil)
	descAlloc = prometheus.NewDesc("umbra_diff_area_allocated_bytes", "Space a volume's diff-area files occupy: used plus freed space kept for reuse and the metadata log.", []string{"volume"}, nil)
	descMax   = prometheus.NewDesc("umbra_diff_area_limit_bytes", "Shadow storage limit of a volume (0: unlimited).", []string{"volume"}, nil)
	descSnap  = prometheus.NewDesc("umbra_snapshots", "Live snapshots of a volume.", []string{"volume"}, nil)
	descCopy  = prometheus.NewDesc("umbra_preserved_chunks_total", "Chunks preserved (copied before overwrite) since the service started.", []string{"volume"}, nil)
)

// engine reads the COW volumes at scrape time.
type engine struct{ p *cow.Provider }

func (e engine) Describe(ch chan<- *prometheus.Desc) {
	ch <- descUsed
	ch <- descAlloc
	ch <- descMax
	ch <- descSnap
	ch <- descCopy
}

func (e engine) Collect(ch chan<- prometheus.Metric) {
	for _, v := range e.p.Volumes() {
		st := v.Storage()
		ch <- prometheus.MustNewConstMetric(descUsed, prometheus.GaugeValue, float64(st.Used), v.Name())
		ch <- prometheus.MustNewConstMetric(descAlloc, prometheus.GaugeValue, float64(st.Allocated), v.Name())
		ch <- prometheus.MustNewConstMetric(descMax, prometheus.GaugeValue, float64(st.Max), v.Name())
		ch <- prometheus.MustNewConstMetric(descSnap, prometheus.GaugeValue, float64(len(v.Snapshots())), v.Name())
		ch <- prometheus.MustNewConstMetric(descCopy, prometheus.CounterValue, float64(v.Preserved()), v.Name())
	}
}

// New registers the collectors for the volumes of p.
func New(p *cow.Provider) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry(), nbd: &nbdServers{}, live: &live{}}
	buckets := prometheus.ExponentialBuckets(0.0001, 4, 10) // 100 µs to 26 s
	m.hold = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "umbra_hold_seconds", Help: "How long snapshot sets held writes.", Buckets: buckets})
	m.freeze = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "umbra_freeze_seconds", Help: "How long snapshot sets kept writers frozen (freeze to thaw).", Buckets: buckets})
	m.writerFails = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "umbra_writer_failures_total", Help: "Writer phases that failed."}, []string{"writer", "phase"})
	m.nbdReqs = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "umbra_nbd_requests_total", Help: "NBD requests by command."}, []string{"command"})
	m.nbdErrs = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "umbra_nbd_errors_total", Help: "NBD error replies by command."}, []string{"command"})
	m.jobRuns = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "umbra_job_runs_total", Help: "Job runs that ended, by job and result (success, failed, skipped, missed, interrupted, cancelled)."}, []string{"job", "result"})
	m.jobSuccess = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "umbra_job_last_success_timestamp_seconds", Help: "When a job's last successful run ended (Unix seconds); alert when it is too old."}, []string{"job"})
	m.memPending = prometheus.NewGauge(prometheus.GaugeOpts{Name: "umbra_memory_return_pending", Help: "Collections queued or running that give the memory of finished backups back to the system (0: all given back)."})
	m.reg.MustRegister(engine{p}, m.nbd, m.live, m.hold, m.freeze, m.writerFails, m.nbdReqs, m.nbdErrs, m.jobRuns, m.jobSuccess, m.memPending,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

// ObserveSet records a committed snapshot set's hold and freeze times
// (freeze 0: no writers).
func (m *Metrics) ObserveSet(hold, freeze time.Duration) {
	if m == nil {
		return
	}
	m.hold.Observe(hold.Seconds())
	if freeze > 0 {
		m.freeze.Observe(freeze.Seconds())
	}
}

// MemoryReturn adds d (+1 queued, -1 done) to the collections that give
// finished backups' memory back (umbra_memory_return_pending).
func (m *Metrics) MemoryReturn(d int) {
	if m != nil {
		m.memPending.Add(float64(d))
	}
}

// WriterFailed counts a writer phase that failed.
func (m *Metrics) WriterFailed(writer, phase string) {
	if m != nil {
		m.writerFails.WithLabelValues(writer, phase).Inc()
	}
}

// JobRun counts a job run that ended with result at end.
func (m *Metrics) JobRun(job, result string, end time.Time) {
	if m == nil {
		return
	}
	m.jobRuns.WithLabelValues(job, result).Inc()
	if result == "success" {
		m.jobSuccess.WithLabelValues(job).Set(float64(end.UnixNano()) / 1e9)
	}
}

// JobLastSuccess sets when a job's last successful run ended, as the
// history kept it (at start).
func (m *Metrics) JobLastSuccess(job string, end time.Time) {
	if m != nil {
		m.jobSuccess.WithLabelValues(job).Set(float64(end.UnixNano()) / 1e9)
	}
}

// NBD is the nbd.Options.Observe hook: requests handled, and error
// replies (an oversized write is refused before it is handled), by command.
func (m *Metrics) NBD(cmd string, failed bool) {
	if m == nil {
		return
	}
	if failed {
		counterOf(&m.nbdErrCtrs, m.nbdErrs, cmd).Inc()
	} else {
		counterOf(&m.nbdReqCtrs, m.nbdReqs, cmd).Inc()
	}
}

// counterOf returns vec's counter for label, kept in cache: NBD counts
// every request, and WithLabelValues hashes the label and locks the
// vector each time (~2 % of the server's CPU at 130k requests/s).
func counterOf(cache *sync.Map, vec *prometheus.CounterVec, label string) prometheus.Counter {
	if c, ok := cache.Load(label); ok {
		return c.(prometheus.Counter)
	}
	c := vec.WithLabelValues(label)
	cache.Store(label, c)
	return c
}

// Serve serves /metrics on l until ctx ends.
func (m *Metrics) Serve(ctx context.Context, l net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	stop := context.AfterFunc(ctx, func() { srv.Close() })
	defer stop()
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
