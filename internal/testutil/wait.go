package testutil

import (
	"net"
	"runtime"
	"testing"
	"time"
)

// HangGuard is how long a test waits for something that must happen
// before it calls it a hang. It is no measure of speed: on a loaded
// 2-core machine anything short is a guess about the scheduler, so it is
// long, and a test that reaches it fails with every goroutine's stack.
const HangGuard = 2 * time.Minute

// WaitFor waits until cond holds, looking every 10 ms; after HangGuard
// it fails the test, naming what it waited for.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(HangGuard); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			Hung(t, what)
		}
	}
}

// Receive waits for a value from ch; after HangGuard it fails the test,
// naming what it waited for.
func Receive[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	timer := time.NewTimer(HangGuard)
	defer timer.Stop()
	select {
	case v := <-ch:
		return v
	case <-timer.C:
		Hung(t, what)
		panic("unreachable")
	}
}

// Hung fails the test: what it waited for did not happen within
// HangGuard. The goroutines' stacks say where it is stuck.
func Hung(t testing.TB, what string) {
	t.Helper()
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	t.Fatalf("%s: not within %v (a hang); goroutines:\n%s", what, HangGuard, buf)
}

// WaitListening waits until a unix socket at path accepts connections.
// The socket's file appears at bind, before listen: a client that only
// sees the file can still be refused.
func WaitListening(t testing.TB, path string) {
	t.Helper()
	WaitFor(t, "a server listening on "+path, func() bool {
		c, err := net.Dial("unix", path)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}
