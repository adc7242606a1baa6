package cow

import (
	"context"
	"sync"
)

// groupSyncer shares one fsync among concurrent callers (group commit):
// a caller's data is covered once a sync that started after the caller
// asked has finished. Errors are sticky: after a failed fsync the kernel
// may have dropped dirty pages, so nothing later can be trusted either.
type groupSyncer struct {
	fn func() error

	mu      sync.Mutex // guards the fields below
	cond    *sync.Cond
	req     uint64 // tickets handed out
	done    uint64 // tickets covered by a finished sync
	running bool
	err     error
}

func newGroupSyncer(fn func() error) *groupSyncer {
	g := &groupSyncer{fn: fn}
	g.cond = sync.NewCond(&g.mu)
	return g
}

func (g *groupSyncer) sync() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.req++
	t := g.req
	for g.done < t && g.err == nil {
		if g.running {
			g.cond.Wait()
			continue
		}
		g.running = true
		target := g.req
		g.mu.Unlock()
		err := g.fn()
		g.mu.Lock()
		g.running = false
		g.done = target
		if err != nil && g.err == nil {
			g.err = err
		}
		g.cond.Broadcast()
	}
	return g.err
}

// gate counts writes in flight and lets a hold close it: new writes wait,
// writes in flight drain. Reads never pass through the gate.
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
