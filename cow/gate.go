package cow

import (
	"context"
	"fmt"
	"sync"
	"time"

	"umbra/internal/rtprio"
	"umbra/provider"
)

// gate admits writes to the origin and lets a hold close it: new writes
// wait, writes in flight drain. Its job is that fence and nothing else:
// every origin write (WriteAt, TryWriteAt, TryWriteFrom, WriteZeroes,
// Trim) enters it and leaves it when done; Hold, CreateSnapshot, Revert
// and Close close it so that no write is half-applied while they run.
// Reads never pass through it.
//
// It owns the count of writes in flight and of writes waiting, and the
// channels that wake them; its mu guards them all and is held only for
// a few instructions (never across a wait).
type gate struct {
	mu       sync.Mutex // guards the fields below
	inflight int
	waiting  int // writes waiting for the gate to reopen
	closed   bool
	open     chan struct{} // closed when the gate reopens
	drained  chan struct{} // closed when inflight reaches 0 while closed
}

func (g *gate) enter() {
	g.mu.Lock()
	for g.closed {
		ch := g.open
		g.waiting++
		g.mu.Unlock()
		<-ch
		g.mu.Lock()
		g.waiting--
	}
	g.inflight++
	g.mu.Unlock()
}

// waiters is how many writes wait for the gate to reopen.
func (g *gate) waiters() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waiting
}

// tryEnter is enter unless the gate is closed (a hold): then false.
func (g *gate) tryEnter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.inflight++
	return true
}

func (g *gate) leave() {
	g.mu.Lock()
	g.inflight--
	if g.closed && g.inflight == 0 && g.drained != nil {
		close(g.drained)
		g.drained = nil
	}
	g.mu.Unlock()
}

// close blocks new writes and waits for those in flight, until ctx ends.
// Only one closer at a time: a second waits for the first to reopen.
func (g *gate) close(ctx context.Context) error {
	g.mu.Lock()
	for g.closed {
		ch := g.open
		g.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
		g.mu.Lock()
	}
	g.closed = true
	g.open = make(chan struct{})
	if g.inflight == 0 {
		g.mu.Unlock()
		return nil
	}
	d := make(chan struct{})
	g.drained = d
	g.mu.Unlock()
	select {
	case <-d:
		return nil
	case <-ctx.Done():
		g.reopen()
		return ctx.Err()
	}
}

func (g *gate) reopen() {
	g.mu.Lock()
	if g.closed {
		g.closed = false
		g.drained = nil
		close(g.open)
	}
	g.mu.Unlock()
}

// Hold is a write fence on a volume: while it stands, new writes wait and
// none is in flight. It releases by itself when its limit passes.
type Hold struct {
	v     *Volume
	start time.Time
	timer *time.Timer
	lower func() // ends the hold's real-time window (rtprio)

	mu      sync.Mutex // guards the fields below
	done    bool
	expired bool
	ended   time.Time // when writes resumed
}

// Hold blocks new writes, waits for those in flight, flushes and returns.
// Reads go on. The hold ends with Release or, after limit (0: 10 s), by
// itself; a snapshot committed through it after that fails.
func (v *Volume) Hold(ctx context.Context, limit time.Duration) (*Hold, error) {
	return v.hold(ctx, limit, true)
}

func (v *Volume) hold(ctx context.Context, limit time.Duration, flush bool) (*Hold, error) {
	if limit <= 0 {
		limit = DefaultHoldLimit
	}
	// Writes wait from here until Release: the threads that finish the
	// writes in flight, flush and commit run first (see rtprio).
	lower := rtprio.Raise()
	start := time.Now()
	dctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	if err := v.gate.close(dctx); err != nil {
		lower()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("hold volume %s: %w", v.name, ctx.Err())
		}
		return nil, fmt.Errorf("hold volume %s: writes in flight did not drain within %v: %w", v.name, limit, provider.ErrHoldTimeout)
	}
	if flush {
		if err := v.Flush(); err != nil {
			v.gate.reopen()
			lower()
			return nil, err
		}
	}
	h := &Hold{v: v, start: start, lower: lower}
	left := limit - time.Since(start)
	if left <= 0 {
		v.gate.reopen()
		lower()
		return nil, fmt.Errorf("hold volume %s: flush took longer than %v: %w", v.name, limit, provider.ErrHoldTimeout)
	}
	h.timer = time.AfterFunc(left, h.expire)
	return h, nil
}

func (h *Hold) expire() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.done {
		h.done, h.expired = true, true
		h.v.gate.reopen()
		h.ended = time.Now()
		h.lower()
	}
}

// Release resumes held writes. It returns provider.ErrHoldTimeout when
// the hold had already released itself at its limit.
func (h *Hold) Release() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.expired {
		return fmt.Errorf("hold volume %s: %w", h.v.name, provider.ErrHoldTimeout)
	}
	if !h.done {
		h.done = true
		h.timer.Stop()
		h.v.gate.reopen()
		h.ended = time.Now()
		h.lower()
	}
	return nil
}

// Elapsed is how long writes have been held: until now, or until they
// resumed once the hold has ended.
func (h *Hold) Elapsed() time.Duration {
	start, end := h.Window()
	if end.IsZero() {
		return time.Since(start)
	}
	return end.Sub(start)
}

// Window is when writes began to wait and when they resumed (zero while
// the hold stands).
func (h *Hold) Window() (start, end time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.start, h.ended
}

// HoldWindow is how long writes were held by a set of ended holds: from
// the first hold's start to the last one's end (writes on some volume of
// the set were waiting all that time).
func HoldWindow(holds []*Hold) time.Duration {
	var first, last time.Time
	for _, h := range holds {
		start, end := h.Window()
		if end.IsZero() {
			end = time.Now()
		}
		if first.IsZero() || start.Before(first) {
			first = start
		}
		if end.After(last) {
			last = end
		}
	}
	return last.Sub(first)
}

// CreateSnapshot commits a snapshot inside the hold window.
func (h *Hold) CreateSnapshot(ctx context.Context, opts provider.SnapshotOptions) (provider.Snapshot, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.expired {
		return provider.Snapshot{}, fmt.Errorf("commit on volume %s: %w", h.v.name, provider.ErrHoldTimeout)
	}
	if h.done {
		return provider.Snapshot{}, fmt.Errorf("commit on volume %s: the hold was released", h.v.name)
	}
	return h.v.commit(opts)
}
