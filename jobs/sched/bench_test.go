package sched

import (
	"context"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"
)

// benchClock is a fake clock for benchmarks: the scheduler's loop has
// one After outstanding at a time, and each call is announced, which
// tells the benchmark the loop has finished a step.
type benchClock struct {
	mu         sync.Mutex
	now        time.Time // guarded by mu
	at         time.Time // guarded by mu: when the outstanding After fires
	ch         chan time.Time
	registered chan struct{}
}

func (c *benchClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *benchClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	ch := make(chan time.Time, 1)
	c.at, c.ch = c.now.Add(d), ch
	c.mu.Unlock()
	c.registered <- struct{}{}
	return ch
}

// hour moves the clock an hour, waking the loop at every step it asked for.
func (c *benchClock) hour() {
	c.mu.Lock()
	end := c.now.Add(time.Hour)
	c.mu.Unlock()
	for {
		c.mu.Lock()
		if c.at.After(end) {
			c.now = end
			c.mu.Unlock()
			return
		}
		c.now = c.at
		c.ch <- c.now
		c.mu.Unlock()
		<-c.registered
	}
}

type nopState struct {
	mu   sync.Mutex
	last map[string]time.Time // guarded by mu
}

func (s *nopState) Last(name string) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.last[name]
	return t, ok
}

func (s *nopState) SetLast(name string, t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.last[name] = t
	return nil
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchHours runs a scheduler with 1 000 entries for b.N simulated
// hours and reports the process's CPU time per simulated hour.
func benchHours(b *testing.B, specs []string, delay time.Duration) {
	clock := &benchClock{now: time.Date(2026, 12, 7, 4, 0, 0, 0, time.UTC), registered: make(chan struct{})}
	var runs sync.WaitGroup
	s := New(clock, &nopState{last: map[string]time.Time{}}, Options{})
	var entries []Entry
	for i := 0; i < 1000; i++ {
		entries = append(entries, Entry{
			Name: fmt.Sprintf("job-%d", i), Spec: mustSpec(specs[i%len(specs)]), RandomDelay: delay,
			Run: func(context.Context, Trigger) error { return nil },
		})
	}
	if err := s.Set(entries); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runs.Add(1)
	go func() {
		defer runs.Done()
		if err := s.Run(ctx); err != nil {
			b.Error(err)
		}
	}()
	<-clock.registered
	b.ResetTimer()
	cpu0 := cpuTime()
	for i := 0; i < b.N; i++ {
		clock.hour()
	}
	cpu := cpuTime() - cpu0
	b.StopTimer()
	b.ReportMetric(float64(cpu.Microseconds())/1000/float64(b.N), "cpu-ms/sim-hour")
	cancel()
	go func() {
		for range clock.registered { // a last step may be under way
		}
	}()
	runs.Wait()
	close(clock.registered)
}

// BenchmarkIdleHour1000: 1 000 jobs, none due: the cost of waiting.
func BenchmarkIdleHour1000(b *testing.B) {
	benchHours(b, []string{"*-06-01 03:00", "*-07-01 03:00"}, 0)
}

// BenchmarkBusyHour1000: 1 000 jobs, a quarter every 15 minutes, a
// quarter hourly, a quarter daily, a quarter twice on weekdays, each
// with a random delay of up to 5 minutes; runs do nothing.
func BenchmarkBusyHour1000(b *testing.B) {
	benchHours(b, []string{"*:0/15", "hourly", "daily", "Mon..Fri 07,12:00"}, 5*time.Minute)
}
