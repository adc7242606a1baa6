package cow

import (
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
