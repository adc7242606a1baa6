package rtprio

import (
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"umbra/internal/testutil"
)

// policies counts the process's threads by policy/priority/nice.
func policies(t *testing.T) map[[3]int]int {
	t.Helper()
	out := map[[3]int]int{}
	for _, tid := range threads() {
		a, err := unix.SchedGetAttr(tid, 0)
		if err != nil {
			continue
		}
		out[[3]int{int(a.Policy), int(a.Priority), int(a.Nice)}]++
	}
	return out
}

func onlyNormal(t *testing.T, what string) {
	t.Helper()
	for k, n := range policies(t) {
		if k[0] != unix.SCHED_NORMAL {
			t.Fatalf("%s: %d threads at policy %d priority %d", what, n, k[0], k[1])
		}
	}
}

func onlyFIFO(t *testing.T, what string) {
	t.Helper()
	for k, n := range policies(t) {
		if k[0] != unix.SCHED_FIFO || k[1] != 1 {
			t.Fatalf("%s: %d threads at policy %d priority %d, want all SCHED_FIFO 1", what, n, k[0], k[1])
		}
	}
}

// fakeClock moves only when Advance moves it, and runs the functions
// due on the way at their own instant: a window's cut is then a step of
// the test, not a race with the scheduler.
type fakeClock struct {
	mu     sync.Mutex // guards the fields below
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c       *fakeClock
	at      time.Time
	f       func()
	stopped bool // guarded by c.mu
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) stopper {
	c.mu.Lock()
	defer c.mu.Unlock()
	tm := &fakeTimer{c: c, at: c.now.Add(d), f: f}
	c.timers = append(c.timers, tm)
	return tm
}

func (tm *fakeTimer) Stop() bool {
	tm.c.mu.Lock()
	defer tm.c.mu.Unlock()
	was := !tm.stopped
	tm.stopped = true
	return was
}

// Advance moves the clock by d, running each timer that falls due at its
// deadline, in order.
func (c *fakeClock) Advance(d time.Duration) { c.advance(d, false) }

// AdvanceLate moves the clock by d and only then runs the timers due, as
// the system's run late when their goroutine waits for a CPU.
func (c *fakeClock) AdvanceLate(d time.Duration) { c.advance(d, true) }

func (c *fakeClock) advance(d time.Duration, late bool) {
	c.mu.Lock()
	end := c.now.Add(d)
	if late {
		c.now = end
	}
	for {
		var next *fakeTimer
		for _, tm := range c.timers {
			if !tm.stopped && !tm.at.After(end) && (next == nil || tm.at.Before(next.at)) {
				next = tm
			}
		}
		if next == nil {
			break
		}
		next.stopped = true
		if !late {
			c.now = next.at
		}
		c.mu.Unlock()
		next.f()
		c.mu.Lock()
	}
	c.now = end
	c.mu.Unlock()
}

// fresh enables windows with a full budget on a clock the test moves.
func fresh(t *testing.T) *fakeClock {
	testutil.NeedRoot(t)
	if err := Probe(); err != nil {
		t.Skipf("rtprio: %v", err)
	}
	c := &fakeClock{now: time.Unix(1e9, 0)}
	mu.Lock()
	tokens, filled, enabled, denied, clk = Budget, time.Time{}, true, false, c
	mu.Unlock()
	t.Cleanup(func() {
		mu.Lock()
		if depth > 0 { // a failed test left its window open
			depth = 0
			end()
		}
		clk = systemClock{}
		mu.Unlock()
	})
	return c
}

// lockedThread runs a goroutine on its own thread until stop is closed;
// with set, it first applies attr to that thread.
func lockedThread(t *testing.T, set *unix.SchedAttr, stop chan struct{}) (tid int) {
	t.Helper()
	ch := make(chan int)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if set != nil {
			if err := unix.SchedSetAttr(unix.Gettid(), set, 0); err != nil {
				t.Error(err)
			}
		}
		ch <- unix.Gettid()
		<-stop
	}()
	return <-ch
}

// TestRaiseLower: every thread runs at SCHED_FIFO inside a window and as
// it was after — a thread's nice value kept, one already real-time left
// alone, threads born in the window put to SCHED_NORMAL.
func TestRaiseLower(t *testing.T) {
	fresh(t)
	stop := make(chan struct{})
	defer close(stop)
	niced := lockedThread(t, &unix.SchedAttr{Policy: unix.SCHED_NORMAL, Nice: 5}, stop)
	rt := lockedThread(t, &unix.SchedAttr{Policy: unix.SCHED_FIFO, Priority: 2}, stop)
	defer unix.SchedSetAttr(rt, &unix.SchedAttr{Policy: unix.SCHED_NORMAL}, 0)

	lower := Raise()
	for tid, want := range map[int][2]uint32{niced: {unix.SCHED_FIFO, 1}, rt: {unix.SCHED_FIFO, 2}} {
		a, err := unix.SchedGetAttr(tid, 0)
		if err != nil || a.Policy != want[0] || a.Priority != want[1] {
			t.Fatalf("thread %d in the window: %+v %v, want policy %d priority %d", tid, a, err, want[0], want[1])
		}
	}
	// Threads born now: each locked goroutine needs one of its own.
	born := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			wg.Done()
			<-born
		}()
	}
	wg.Wait()
	lower()
	lower() // twice: no effect
	close(born)

	a, err := unix.SchedGetAttr(niced, 0)
	if err != nil || a.Policy != unix.SCHED_NORMAL || a.Nice != 5 {
		t.Fatalf("niced thread after: %+v %v, want SCHED_NORMAL nice 5", a, err)
	}
	a, err = unix.SchedGetAttr(rt, 0)
	if err != nil || a.Policy != unix.SCHED_FIFO || a.Priority != 2 {
		t.Fatalf("real-time thread after: %+v %v, want SCHED_FIFO 2 as before", a, err)
	}
	unix.SchedSetAttr(rt, &unix.SchedAttr{Policy: unix.SCHED_NORMAL}, 0)
	onlyNormal(t, "after the window")
}

// TestNested: the window lasts until the last of nested Raises lowers.
func TestNested(t *testing.T) {
	fresh(t)
	l1 := Raise()
	l2 := Raise()
	l1()
	onlyFIFO(t, "one of two lowered")
	l2()
	onlyNormal(t, "both lowered")
}

// TestCutAtMaxWindow: a window not lowered ends by itself at MaxWindow,
// not before.
func TestCutAtMaxWindow(t *testing.T) {
	c := fresh(t)
	lower := Raise()
	onlyFIFO(t, "in the window")
	c.Advance(MaxWindow - time.Nanosecond)
	onlyFIFO(t, "just before MaxWindow")
	c.Advance(time.Nanosecond)
	onlyNormal(t, "at MaxWindow")
	lower() // late: nothing
	// The cut window spent the whole budget: a window now would not open.
	// After 20 s the budget is full again (capped at Budget).
	c.Advance(20 * time.Second)
	l2 := Raise()
	onlyFIFO(t, "a new window after a cut")
	lower() // the cut window's lower does not end the new one
	onlyFIFO(t, "the cut window lowered again")
	l2()
	onlyNormal(t, "after")
}

// TestBudget: windows spend the budget (refilled at Budget per second),
// one that runs out of it is cut when it does, none opens with nothing
// left, and one opens again once it refills.
func TestBudget(t *testing.T) {
	c := fresh(t)
	// Windows of 10 ms, each 10 ms after the last opened: 5 % of 10 ms
	// (0.5 ms) comes back between them. Budget left when each opens:
	// 50, 40.5, 31, 21.5, 12, then 2.5 ms.
	for i := range 5 {
		lower := Raise()
		onlyFIFO(t, fmt.Sprintf("window %d", i+1))
		c.Advance(10 * time.Millisecond)
		lower()
		onlyNormal(t, fmt.Sprintf("window %d lowered", i+1))
	}
	lower := Raise()
	onlyFIFO(t, "window 6, with 2.5 ms left")
	c.Advance(2500*time.Microsecond - time.Nanosecond)
	onlyFIFO(t, "window 6 just before its budget runs out")
	c.Advance(time.Nanosecond)
	onlyNormal(t, "window 6 with the budget spent")
	lower()
	// Window 7 opens with the 0.125 ms refilled during window 6; its cut
	// runs 10 ms late (a loaded machine), which overdraws the budget by
	// 9.875 ms: the next window stays shut until that is refilled.
	lower = Raise()
	onlyFIFO(t, "window 7, with 0.125 ms left")
	c.AdvanceLate(10 * time.Millisecond)
	onlyNormal(t, "window 7 cut late")
	lower()
	l := Raise() // refills 0.5 ms: -9.375 ms left
	onlyNormal(t, "a window asked for with the budget overdrawn")
	l()
	c.Advance(500 * time.Millisecond) // refills 25 ms: 15.625 ms left
	l = Raise()
	onlyFIFO(t, "after a refill")
	c.Advance(15625*time.Microsecond - time.Nanosecond)
	onlyFIFO(t, "just before the refilled budget runs out")
	c.Advance(time.Nanosecond)
	onlyNormal(t, "the refilled budget spent")
	l()
}

// TestDisabled: SetEnabled(false) turns Raise into nothing.
func TestDisabled(t *testing.T) {
	fresh(t)
	SetEnabled(false)
	defer SetEnabled(true)
	lower := Raise()
	onlyNormal(t, "disabled")
	lower()
}
