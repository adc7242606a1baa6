package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// LiveStat is one live restore's figures (umbra restore --live).
type LiveStat struct {
	Volume   string
	Size     int64
	Restored int64 // bytes that hold their final data
	Demand   int64 // chunks fetched ahead of the background order
	Waiting  bool  // the repository cannot be read
}

var (
	descLiveSize     = prometheus.NewDesc("umbra_live_restore_size_bytes", "Size of a volume being restored live.", []string{"volume"}, nil)
	descLiveRestored = prometheus.NewDesc("umbra_live_restore_restored_bytes", "Bytes of a volume being restored live that hold their final data (restored or written).", []string{"volume"}, nil)
	descLiveDemand   = prometheus.NewDesc("umbra_live_restore_demand_chunks_total", "Chunks of a live restore fetched on demand, ahead of the background order.", []string{"volume"}, nil)
	descLiveWaiting  = prometheus.NewDesc("umbra_live_restore_waiting", "1 while a live restore waits for its repository (reads of unrestored data fail).", []string{"volume"}, nil)
)

// live reads the live restores at scrape time.
type live struct {
	mu    sync.Mutex // guards stats
	stats func() []LiveStat
}

func (l *live) Describe(ch chan<- *prometheus.Desc) {
	ch <- descLiveSize
	ch <- descLiveRestored
	ch <- descLiveDemand
	ch <- descLiveWaiting
}

func (l *live) Collect(ch chan<- prometheus.Metric) {
	l.mu.Lock()
	fn := l.stats
	l.mu.Unlock()
	if fn == nil {
		return
	}
	for _, s := range fn() {
		waiting := 0.0
		if s.Waiting {
			waiting = 1
		}
		ch <- prometheus.MustNewConstMetric(descLiveSize, prometheus.GaugeValue, float64(s.Size), s.Volume)
		ch <- prometheus.MustNewConstMetric(descLiveRestored, prometheus.GaugeValue, float64(s.Restored), s.Volume)
		ch <- prometheus.MustNewConstMetric(descLiveDemand, prometheus.CounterValue, float64(s.Demand), s.Volume)
		ch <- prometheus.MustNewConstMetric(descLiveWaiting, prometheus.GaugeValue, waiting, s.Volume)
	}
}

// WatchLive reads the live restores through stats at every scrape.
func (m *Metrics) WatchLive(stats func() []LiveStat) {
	if m == nil {
		return
	}
	m.live.mu.Lock()
	m.live.stats = stats
	m.live.mu.Unlock()
}
