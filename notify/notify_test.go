package notify

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// receiver is a webhook receiver on 127.0.0.1 that answers the statuses
// of codes in turn (then 200) and hands each body it got to got.
type receiver struct {
	*httptest.Server
	mu    sync.Mutex // guards codes
	codes []int
	got   chan Notification
}

func newReceiver(t *testing.T, codes ...int) *receiver {
	r := &receiver{codes: codes, got: make(chan Notification, 16)}
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method != http.MethodPost || req.Header.Get("Content-Type") != "application/json" {
			t.Errorf("webhook got %s with Content-Type %q", req.Method, req.Header.Get("Content-Type"))
		}
		b, _ := io.ReadAll(req.Body)
		var m Notification
		if err := json.Unmarshal(b, &m); err != nil {
			t.Errorf("webhook body %q: %v", b, err)
		}
		r.mu.Lock()
		code := http.StatusOK
		if len(r.codes) > 0 {
			code, r.codes = r.codes[0], r.codes[1:]
		}
		r.mu.Unlock()
		w.WriteHeader(code)
		r.got <- m
	}))
	t.Cleanup(r.Close)
	return r
}

func (r *receiver) next(t *testing.T) Notification {
	t.Helper()
	select {
	case m := <-r.got:
		return m
	case <-time.After(time.Minute):
		t.Fatal("the webhook got nothing")
	}
	return Notification{}
}

// waits records the backoff waits instead of sleeping.
type waits struct {
	mu sync.Mutex // guards d
	d  []time.Duration
}

func (w *waits) sleep(ctx context.Context, d time.Duration) error {
	w.mu.Lock()
	w.d = append(w.d, d)
	w.mu.Unlock()
	return ctx.Err()
}

func start(n *Notifier) *Notifier {
	go n.loop()
	return n
}

func TestWebhookRetriesWithBackoff(t *testing.T) {
	r := newReceiver(t, 500, 503, 429)
	var w waits
	n := newNotifier(Config{Webhook: r.URL, Backoff: time.Second, Attempts: 5}, nil)
	n.sleep = w.sleep
	start(n)
	defer n.Close(context.Background())
	n.Send(Notification{Event: "job_failed", Job: "nightly", Kind: "backup", Result: "failed", Error: "disk full"})
	for i := 0; i < 4; i++ {
		m := r.next(t)
		if m.Version != Version || m.Job != "nightly" || m.Error != "disk full" || m.Host == "" || m.Time.IsZero() {
			t.Fatalf("attempt %d: got %+v", i+1, m)
		}
	}
	n.Close(context.Background())
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second}
	if len(w.d) != len(want) {
		t.Fatalf("waits %v, want %v", w.d, want)
	}
	for i := range want {
		if w.d[i] != want[i] {
			t.Fatalf("waits %v, want %v", w.d, want)
		}
	}
}

func TestWebhookGivesUp(t *testing.T) {
	// Bounded: after Attempts failures the notification is dropped and
	// the next one goes out.
	r := newReceiver(t, 500, 500, 500)
	var w waits
	n := newNotifier(Config{Webhook: r.URL, Attempts: 3}, nil)
	n.sleep = w.sleep
	start(n)
	defer n.Close(context.Background())
	n.Send(Notification{Job: "a"})
	n.Send(Notification{Job: "b"})
	for _, want := range []string{"a", "a", "a", "b"} {
		if m := r.next(t); m.Job != want {
			t.Fatalf("got job %q, want %q", m.Job, want)
		}
	}
	// A 4xx answer is final: no retry.
	r.mu.Lock()
	r.codes = []int{404}
	r.mu.Unlock()
	n.Send(Notification{Job: "c"})
	n.Send(Notification{Job: "d"})
	for _, want := range []string{"c", "d"} {
		if m := r.next(t); m.Job != want {
			t.Fatalf("after a 404: got job %q, want %q", m.Job, want)
		}
	}
}

func TestQueueBounded(t *testing.T) {
	r := newReceiver(t)
	n := newNotifier(Config{Webhook: r.URL, Queue: 2}, nil)
	for _, j := range []string{"a", "b", "c", "d"} {
		n.Send(Notification{Job: j})
	}
	if len(n.queue) != 2 {
		t.Fatalf("queue holds %d, want 2", len(n.queue))
	}
	start(n)
	defer n.Close(context.Background())
	if m := r.next(t); m.Job != "c" || m.Dropped != 2 {
		t.Fatalf("first delivered: %+v, want job c with 2 dropped", m)
	}
	if m := r.next(t); m.Job != "d" || m.Dropped != 0 {
		t.Fatalf("second delivered: %+v", m)
	}
}

func TestExecHook(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	script := filepath.Join(dir, "hook.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\n{ echo \"$UMBRA_EVENT $UMBRA_JOB $UMBRA_RESULT $UMBRA_BYTES\"; cat; } > "+out+".tmp && mv "+out+".tmp "+out+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r := newReceiver(t)
	n := New(Config{Exec: []string{script}, Webhook: r.URL}, nil)
	defer n.Close(context.Background())
	n.Send(Notification{Event: "job_missed", Job: "verify-weekly", Result: "missed", Bytes: 42})
	r.next(t)                     // the webhook goes first, then the hook
	n.Close(context.Background()) // waits for the hook
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	line, body, _ := strings.Cut(string(b), "\n")
	if line != "job_missed verify-weekly missed 42" {
		t.Fatalf("env line %q", line)
	}
	var m Notification
	if err := json.Unmarshal([]byte(body), &m); err != nil || m.Job != "verify-weekly" || m.Version != Version {
		t.Fatalf("stdin %q: %v %+v", body, err, m)
	}
}

func TestDisabledSendsNothing(t *testing.T) {
	n := New(Config{}, nil)
	n.Send(Notification{Job: "x"})
	if n.Enabled() || len(n.queue) != 0 {
		t.Fatal("a notifier with no webhook or hook queued a notification")
	}
	n.Close(context.Background())
	n.Close(context.Background())
}

func TestCloseGivesUpRetries(t *testing.T) {
	// A webhook that keeps failing, with an hour between attempts: Close
	// with an ended context returns without waiting for the retries.
	r := newReceiver(t, 500, 500, 500, 500)
	n := New(Config{Webhook: r.URL, Backoff: time.Hour}, nil)
	n.Send(Notification{Job: "a"})
	r.next(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	n.Close(ctx)
}
