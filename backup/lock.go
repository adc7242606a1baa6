package backup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Locks are objects under locks/: backups take shared locks (they only
// add), prune takes an exclusive one (it deletes). A lock is refreshed
// while its holder runs; one not refreshed for lockStale, or whose holder
// is a process on this host that no longer exists (kill -9), is stale and
// is removed by the next locker.

// ErrLocked: another process holds a conflicting lock.
var ErrLocked = errors.New("the repository is locked")

type lockInfo struct {
	Host      string    `json:"host"`
	PID       int       `json:"pid"`
	Op        string    `json:"op"`
	Exclusive bool      `json:"exclusive"`
	Created   time.Time `json:"created"`
	Refreshed time.Time `json:"refreshed"`
}

var (
	lockStale   = 30 * time.Minute
	lockRefresh = 5 * time.Minute
)

func (l lockInfo) stale(now time.Time) bool {
	if now.Sub(l.Refreshed) > lockStale {
		return true
	}
	host, _ := os.Hostname()
	if l.Host == host && l.PID > 0 {
		err := syscall.Kill(l.PID, 0)
		return errors.Is(err, syscall.ESRCH)
	}
	return false
}

// Lock takes a lock for op and returns its release. It fails with
// ErrLocked, naming the holder, when a live conflicting lock exists.
func (r *Repo) Lock(ctx context.Context, op string, exclusive bool) (func(), error) {
	host, _ := os.Hostname()
	now := time.Now().UTC()
	me := lockInfo{Host: host, PID: os.Getpid(), Op: op, Exclusive: exclusive, Created: now, Refreshed: now}
	name := "locks/" + randomID()
	if err := r.checkLocks(ctx, "", exclusive); err != nil {
		return nil, err
	}
	b, _ := json.Marshal(me)
	if err := r.be.Put(ctx, name, wrapObject(r.seal.seal(nil, b))); err != nil {
		return nil, fmt.Errorf("lock repository %s: %w", r.Location(), err)
	}
	// Two lockers may have passed the first check together: look again
	// now that ours is visible; the later one backs off.
	if err := r.checkLocks(ctx, name, exclusive); err != nil {
		r.be.Delete(context.WithoutCancel(ctx), name)
		return nil, err
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(lockRefresh)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				me.Refreshed = time.Now().UTC()
				b, _ := json.Marshal(me)
				r.be.Put(context.Background(), name, wrapObject(r.seal.seal(nil, b)))
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(stop)
			wg.Wait()
			r.be.Delete(context.Background(), name)
		})
	}, nil
}

// checkLocks fails if a live lock other than self conflicts; stale
// locks are removed.
func (r *Repo) checkLocks(ctx context.Context, self string, exclusive bool) error {
	names, err := r.be.List(ctx, "locks/")
	if err != nil {
		return fmt.Errorf("lock repository %s: %w", r.Location(), err)
	}
	now := time.Now()
	for _, n := range names {
		if n == self {
			continue
		}
		l, err := r.readLock(ctx, n)
		if err != nil {
			continue // unreadable (mid-write or another key): ignore
		}
		if l.stale(now) {
			r.be.Delete(ctx, n)
			continue
		}
		if exclusive || l.Exclusive {
			kind := "shared"
			if l.Exclusive {
				kind = "exclusive"
			}
			return fmt.Errorf("%w: %s lock by %q on %s pid %d since %s; wait for it to finish, or if that process is gone run `umbra repo unlock --repo %s`",
				ErrLocked, kind, l.Op, l.Host, l.PID, l.Created.Local().Format(time.DateTime), r.Location())
		}
	}
	return nil
}

// Unlock removes every lock (all of them with all=true, else only stale
// ones) and returns how many it removed.
func (r *Repo) Unlock(ctx context.Context, all bool) (int, error) {
	names, err := r.be.List(ctx, "locks/")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, name := range names {
		if !all {
			if l, err := r.readLock(ctx, name); err == nil && !l.stale(time.Now()) {
				continue
			}
		}
		if strings.HasPrefix(name, "locks/") {
			if err := r.be.Delete(ctx, name); err != nil {
				return n, err
			}
			n++
		}
	}
	return n, nil
}

func (r *Repo) readLock(ctx context.Context, name string) (lockInfo, error) {
	var l lockInfo
	// Locks of any format are read: a process that opened the repository
	// before its upgrade to the envelope may still hold one.
	b, err := r.be.Get(ctx, name, 0, -1)
	if err == nil {
		b, err = unwrapObject(name, b, true)
	}
	if err == nil {
		b, err = r.seal.open(nil, b)
	}
	if err == nil {
		if jerr := json.Unmarshal(b, &l); jerr != nil {
			err = corrupt(name, "not a lock: "+jerr.Error())
		}
	}
	return l, err
}
