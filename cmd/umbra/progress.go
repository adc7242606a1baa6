package main

import (
	"encoding/json"
	"os"
	"sync"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

// progress shows long work: bars with bytes, rate and ETA when stderr is
// a terminal; with --json, one JSON object per update on stderr (stdout
// keeps the final result); otherwise nothing.
type progress struct {
	op string

	mu   sync.Mutex // guards bars, last
	ui   *mpb.Progress
	bars map[string]*mpb.Bar
	last time.Time
	enc  *json.Encoder
}

func newProgress(op string) *progress {
	pr := &progress{op: op, bars: map[string]*mpb.Bar{}}
	switch {
	case gflags.json:
		pr.enc = json.NewEncoder(os.Stderr)
	case isatty.IsTerminal(os.Stderr.Fd()):
		pr.ui = mpb.New(mpb.WithOutput(os.Stderr), mpb.WithWidth(32), mpb.WithRefreshRate(200*time.Millisecond))
	}
	return pr
}

// progressEvent is one --json progress line.
type progressEvent struct {
	Event string  `json:"event"` // "progress"
	Op    string  `json:"op"`
	Item  string  `json:"item"`
	Done  int64   `json:"done"`
	Total int64   `json:"total"`
	Time  float64 `json:"elapsed_seconds"`
}

var progressStart = time.Now()

// update reports done of total bytes for item.
func (pr *progress) update(item string, done, total int64) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	switch {
	case pr.enc != nil:
		if now := time.Now(); now.Sub(pr.last) >= 200*time.Millisecond || done == total {
			pr.last = now
			pr.enc.Encode(progressEvent{Event: "progress", Op: pr.op, Item: item, Done: done, Total: total, Time: time.Since(progressStart).Seconds()})
		}
	case pr.ui != nil:
		b, ok := pr.bars[item]
		if !ok {
			b = pr.ui.AddBar(total,
				mpb.PrependDecorators(decor.Name(pr.op+" "+item+" ", decor.WCSyncSpaceR), decor.Counters(decor.SizeB1024(0), "% .1f / % .1f", decor.WCSyncSpace)),
				mpb.AppendDecorators(decor.Percentage(decor.WCSyncSpace), decor.AverageSpeed(decor.SizeB1024(0), " % .1f", decor.WCSyncSpace),
					decor.OnComplete(decor.AverageETA(decor.ET_STYLE_GO, decor.WCSyncSpace), " done")))
			pr.bars[item] = b
		}
		b.SetTotal(total, false)
		b.SetCurrent(done)
	}
}

// finish completes the bars and waits for the last render.
func (pr *progress) finish() {
	if pr.ui == nil {
		return
	}
	pr.mu.Lock()
	for _, b := range pr.bars {
		if !b.Completed() {
			b.Abort(false)
		}
	}
	pr.mu.Unlock()
	pr.ui.Wait()
}
