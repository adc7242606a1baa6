// Package rtprio lifts every thread of the process to real-time priority
// (SCHED_FIFO) for short windows and puts each back as it was, within a
// budget of real-time time. It is off until SetEnabled(true).
//
// The hold window of a snapshot is such a window: new writes wait while
// the writes in flight finish, the volume flushes and the snapshot
// commits. Under load the goroutines doing that are runnable but their
// threads are preempted by the load itself (fio on both cores kept the
// hold's threads off a CPU for milliseconds, measured), and every write
// on the volume waits for them. At SCHED_FIFO for those milliseconds they
// run first: bench/hold.sh p99 2.5-4.1 ms at normal priority, 0.7-1.0 ms
// with the windows (docs/benchmarks.md).
//
// Why it is off by default: threads at one FIFO priority are not
// time-sliced, and the Go runtime needs its sysmon thread to preempt
// goroutines and its timers to run. With goroutines in the process that
// keep a CPU busy (BenchmarkHoldWindow's writers; a backup compressing),
// they keep both CPUs, nothing preempts them, and a hold measured up to
// ~0.9 s instead of ~0.2 ms — even the cut below waits for a CPU. It
// suits a service whose work is I/O-driven (serving NBD, FUSE).
//
// Bounds: a window lasts at most MaxWindow (a timer: see above), and
// windows spend at most Budget of real-time time per second (token
// bucket: a window starts only with budget left and is cut when it runs
// out). Outside its windows the process never runs at real-time
// priority. Threads born in a window inherit SCHED_FIFO (the runtime may
// start one to run the window's goroutines) and are put to SCHED_NORMAL
// when it ends.
//
// No library does this; it is sched_setattr for each thread listed in
// /proc/self/task. Without CAP_SYS_NICE Raise does nothing.
package rtprio

import (
	"errors"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// MaxWindow bounds one window.
	MaxWindow = 50 * time.Millisecond
	// Budget is the real-time time windows may spend per second (5 %,
	// where the kernel's own RT throttling leaves others 5 % of a CPU).
	Budget = 50 * time.Millisecond
)

var (
	mu      sync.Mutex // guards the fields below
	enabled = false
	denied  bool // EPERM once: not allowed here
	depth   int  // Raise calls not yet lowered
	epoch   int  // counts windows, so a stale cut does nothing
	began   time.Time
	tokens  = Budget
	filled  time.Time // when tokens were last refilled
	cutter  stopper
	saved   map[int]unix.SchedAttr // raised threads, as they were
	kept    map[int]bool           // threads at another policy, left alone
)

// clock is where windows read the time and set their cut: the system's,
// or a test's that moves only when told to.
type clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) stopper
}

type stopper interface{ Stop() bool }

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }
func (systemClock) AfterFunc(d time.Duration, f func()) stopper {
	return time.AfterFunc(d, f)
}

var clk clock = systemClock{} // guarded by mu

// SetEnabled turns the windows on or off (the default).
func SetEnabled(on bool) {
	mu.Lock()
	defer mu.Unlock()
	enabled = on
}

// ErrDenied is what Probe returns when the process may not use
// real-time priority (no CAP_SYS_NICE, or a cgroup without RT runtime).
var ErrDenied = errors.New("real-time priority not permitted (needs CAP_SYS_NICE)")

// Probe reports whether windows can be opened here, trying one on the
// calling thread.
func Probe() error {
	a := unix.SchedAttr{Policy: unix.SCHED_FIFO, Priority: 1}
	tid := unix.Gettid()
	old, err := unix.SchedGetAttr(tid, 0)
	if err != nil {
		return err
	}
	if err := unix.SchedSetAttr(tid, &a, 0); err != nil {
		if errors.Is(err, unix.EPERM) {
			return ErrDenied
		}
		return err
	}
	return unix.SchedSetAttr(tid, old, 0)
}

// Raise opens a window: the process's threads run at SCHED_FIFO
// (priority 1) until every Raise is lowered, MaxWindow has passed, or the
// budget runs out. Calls nest. It returns the function that lowers it
// (once; later calls do nothing).
func Raise() (lower func()) {
	mu.Lock()
	defer mu.Unlock()
	if !enabled || denied {
		return func() {}
	}
	if depth == 0 {
		now := clk.Now()
		if !filled.IsZero() {
			tokens = min(Budget, tokens+time.Duration(float64(now.Sub(filled))*float64(Budget)/float64(time.Second)))
		}
		filled = now
		if tokens <= 0 || !raiseAll() {
			return func() {}
		}
		epoch++
		began = now
		e := epoch
		cutter = clk.AfterFunc(min(MaxWindow, tokens), func() { cut(e) })
	}
	depth++
	e := epoch
	var once sync.Once
	return func() { once.Do(func() { release(e) }) }
}

func release(e int) {
	mu.Lock()
	defer mu.Unlock()
	if e != epoch || depth == 0 {
		return // cut already
	}
	depth--
	if depth == 0 {
		end()
	}
}

func cut(e int) {
	mu.Lock()
	defer mu.Unlock()
	if e == epoch && depth > 0 {
		depth = 0
		end()
	}
}

// end closes the window. Caller holds mu.
func end() {
	cutter.Stop()
	lowerAll()
	now := clk.Now()
	tokens -= now.Sub(began)
	epoch++ // lowers of this window do nothing now
}

// raiseAll sets every thread at SCHED_NORMAL to SCHED_FIFO, saving what
// each had; threads at another policy (already real-time, batch, idle)
// are left as they are. A thread may be born while this runs from one
// not raised yet, and would miss the window: hence the passes, until one
// finds no thread it has not seen. False when none could be raised.
func raiseAll() bool {
	saved, kept = map[int]unix.SchedAttr{}, map[int]bool{}
	for pass := 0; pass < 4; pass++ {
		fresh := 0
		for _, tid := range threads() {
			if _, ok := saved[tid]; ok || kept[tid] {
				continue
			}
			old, err := unix.SchedGetAttr(tid, 0)
			if err != nil {
				continue // gone
			}
			if old.Policy != unix.SCHED_NORMAL {
				if pass == 0 {
					kept[tid] = true // not ours to change
				}
				// Later, a thread at SCHED_FIFO 1 was born of a raised
				// one: lowerAll puts it to SCHED_NORMAL.
				continue
			}
			fresh++
			a := unix.SchedAttr{Policy: unix.SCHED_FIFO, Priority: 1}
			if err := unix.SchedSetAttr(tid, &a, 0); err != nil {
				if errors.Is(err, unix.EPERM) {
					denied = true
					lowerAll()
					return false
				}
				continue
			}
			saved[tid] = *old
		}
		if fresh == 0 {
			break
		}
	}
	return len(saved) > 0
}

// lowerAll puts every thread back: those raised to what they had, those
// born in the window (SCHED_FIFO priority 1, neither saved nor kept) to
// SCHED_NORMAL. A thread may be born while this runs, hence the passes.
func lowerAll() {
	for pass := 0; pass < 4; pass++ {
		born := 0
		for _, tid := range threads() {
			if old, ok := saved[tid]; ok {
				_ = unix.SchedSetAttr(tid, &old, 0) // ESRCH: the thread is gone
				delete(saved, tid)
				continue
			}
			if kept[tid] {
				continue
			}
			cur, err := unix.SchedGetAttr(tid, 0)
			if err != nil || cur.Policy != unix.SCHED_FIFO || cur.Priority != 1 {
				continue
			}
			born++
			_ = unix.SchedSetAttr(tid, &unix.SchedAttr{Policy: unix.SCHED_NORMAL}, 0)
		}
		if born == 0 {
			break
		}
	}
	saved, kept = nil, nil
}

func threads() []int {
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return nil
	}
	tids := make([]int, 0, len(ents))
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids
}
