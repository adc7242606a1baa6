// Package notify tells someone outside the service that a job run went
// wrong: a JSON POST to a webhook, retried with backoff, and an exec
// hook that gets the same JSON on its standard input and the main
// fields as environment variables.
//
// Delivery never blocks the caller: Send queues a notification (at most
// Config.Queue; past that the oldest queued one is dropped, and the
// next one delivered says how many were) and one goroutine, owned by
// the Notifier and waited for by Close, delivers them in order. Close
// delivers what is queued within the time its context gives.
//
// The webhook's body is one Notification (its JSON is the documented
// schema, version 1). A 2xx answer is delivered; a network error, 408,
// 429 or 5xx is retried up to Config.Attempts times, the wait doubling
// from Config.Backoff up to MaxBackoff; any other answer is final. The
// exec hook runs once, bounded by Config.Timeout.
package notify

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"time"
)

// Version is the schema version of Notification.
const Version = 1

// Notification is one job run that needs attention: its JSON is what a
// webhook receives and what an exec hook reads on stdin.
type Notification struct {
	Version int       `json:"version"` // Version
	Event   string    `json:"event"`   // job_failed, job_missed or job_interrupted (job_succeeded with on_success)
	Time    time.Time `json:"time"`    // when the notification was made
	Host    string    `json:"host"`    // the service's host name
	Job     string    `json:"job"`     // the job's name
	Kind    string    `json:"kind"`    // snapshot, backup, verify, ...
	RunID   string    `json:"run_id"`  // the run's ID in `umbra jobs history`
	Trigger string    `json:"trigger"` // schedule, catch-up, manual
	Result  string    `json:"result"`  // success, failed, skipped, interrupted, missed
	Start   time.Time `json:"start"`
	End     time.Time `json:"end,omitzero"`
	Bytes   int64     `json:"bytes"`           // what the run moved (kind-specific)
	Error   string    `json:"error,omitempty"` // what went wrong
	// Dropped counts notifications dropped (queue full) before this one.
	Dropped int `json:"dropped,omitempty"`
}

// Config is where notifications go; the zero Config sends nothing.
type Config struct {
	// Webhook is an http:// or https:// URL that gets a POST of each
	// notification's JSON.
	Webhook string
	// Exec is a command (argv) run for each notification with its JSON
	// on stdin and UMBRA_* variables in its environment.
	Exec []string
	// Timeout bounds one webhook attempt and one exec run (default 10 s).
	Timeout time.Duration
	// Attempts bounds webhook attempts per notification (default 5).
	Attempts int
	// Backoff is the first wait before a retry (default 2 s); each
	// further one doubles, up to MaxBackoff.
	Backoff time.Duration
	// Queue bounds the notifications waiting to be sent (default 64).
	Queue int
}

// Defaults.
const (
	DefaultTimeout  = 10 * time.Second
	DefaultAttempts = 5
	DefaultBackoff  = 2 * time.Second
	DefaultQueue    = 64
	MaxBackoff      = 5 * time.Minute
)

// Notifier delivers notifications in the background.
type Notifier struct {
	cfg    Config
	log    *slog.Logger
	client *http.Client
	// sleep waits d or until ctx ends; tests make it return at once.
	sleep func(ctx context.Context, d time.Duration) error

	ctx     context.Context
	cancel  context.CancelFunc
	wake    chan struct{} // a notification was queued
	closing chan struct{} // closed by Close: return once the queue is empty
	done    chan struct{} // closed when the delivery goroutine returns

	mu      sync.Mutex     // guards the fields below
	queue   []Notification // oldest first, at most cfg.Queue
	dropped int            // dropped since the last one queued was taken
	closed  bool
}

// New starts a Notifier for cfg. A Config with neither Webhook nor Exec
// gives a Notifier whose Send does nothing.
func New(cfg Config, log *slog.Logger) *Notifier {
	n := newNotifier(cfg, log)
	go n.loop() // waited for by Close
	return n
}

// newNotifier is New without the delivery goroutine.
func newNotifier(cfg Config, log *slog.Logger) *Notifier {
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Attempts <= 0 {
		cfg.Attempts = DefaultAttempts
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = DefaultBackoff
	}
	if cfg.Queue <= 0 {
		cfg.Queue = DefaultQueue
	}
	if log == nil {
		log = slog.Default()
	}
	n := &Notifier{cfg: cfg, log: log, client: &http.Client{Timeout: cfg.Timeout},
		sleep: sleepCtx, wake: make(chan struct{}, 1), closing: make(chan struct{}), done: make(chan struct{})}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	return n
}

// Enabled says whether notifications go anywhere.
func (n *Notifier) Enabled() bool { return n != nil && (n.cfg.Webhook != "" || len(n.cfg.Exec) > 0) }

// Send queues m for delivery and returns at once.
func (n *Notifier) Send(m Notification) {
	if !n.Enabled() {
		return
	}
	m.Version = Version
	if m.Time.IsZero() {
		m.Time = time.Now().UTC()
	}
	if m.Host == "" {
		m.Host, _ = os.Hostname()
	}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	if len(n.queue) >= n.cfg.Queue {
		n.queue = n.queue[1:]
		n.dropped++
		n.log.Warn("notification queue full: the oldest notification was dropped", "queue", n.cfg.Queue)
	}
	n.queue = append(n.queue, m)
	n.mu.Unlock()
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

// Close stops taking notifications and delivers the queued ones until
// ctx ends; then a delivery in progress is cancelled and what is left
// is given up (logged). It waits for the delivery goroutine.
func (n *Notifier) Close(ctx context.Context) {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	n.closed = true
	n.mu.Unlock()
	close(n.closing)
	select {
	case <-n.done:
	case <-ctx.Done():
	}
	n.cancel()
	<-n.done
	n.mu.Lock()
	left := len(n.queue)
	n.mu.Unlock()
	if left > 0 {
		n.log.Warn("notifications not sent: the service stopped", "count", left)
	}
}

func (n *Notifier) next() (Notification, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.queue) == 0 {
		return Notification{}, false
	}
	m := n.queue[0]
	n.queue = n.queue[1:]
	m.Dropped, n.dropped = n.dropped, 0
	return m, true
}

func (n *Notifier) loop() {
	defer close(n.done)
	for {
		for {
			if n.ctx.Err() != nil {
				return
			}
			m, ok := n.next()
			if !ok {
				break
			}
			n.deliver(n.ctx, m)
		}
		select {
		case <-n.ctx.Done():
			return
		case <-n.closing:
			return
		case <-n.wake:
		}
	}
}

// deliver sends m to the webhook and the exec hook; failures are logged
// (there is no one else to tell).
func (n *Notifier) deliver(ctx context.Context, m Notification) {
	body, err := json.Marshal(m)
	if err != nil {
		n.log.Error("notification", "job", m.Job, "err", err)
		return
	}
	if n.cfg.Webhook != "" {
		if err := n.post(ctx, body); err != nil {
			n.log.Error("webhook notification not delivered", "job", m.Job, "event", m.Event, "url", n.cfg.Webhook, "err", err)
		}
	}
	if len(n.cfg.Exec) > 0 {
		if err := n.exec(ctx, m, body); err != nil {
			n.log.Error("exec notification hook failed", "job", m.Job, "event", m.Event, "command", n.cfg.Exec[0], "err", err)
		}
	}
}

// post POSTs body to the webhook, retrying what may pass.
func (n *Notifier) post(ctx context.Context, body []byte) error {
	wait := n.cfg.Backoff
	var err error
	for attempt := 1; ; attempt++ {
		var retry bool
		if retry, err = n.postOnce(ctx, body); err == nil {
			return nil
		}
		if !retry || attempt >= n.cfg.Attempts {
			return fmt.Errorf("attempt %d of %d: %w", attempt, n.cfg.Attempts, err)
		}
		n.log.Warn("webhook notification failed; retrying", "url", n.cfg.Webhook, "attempt", attempt, "in", wait, "err", err)
		if serr := n.sleep(ctx, wait); serr != nil {
			return fmt.Errorf("given up after attempt %d: %w (last: %v)", attempt, serr, err)
		}
		wait = min(2*wait, MaxBackoff)
	}
}

// postOnce makes one attempt; retry says whether another may succeed.
func (n *Notifier) postOnce(ctx context.Context, body []byte) (retry bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, n.cfg.Webhook, bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "umbra-notify/1")
	resp, err := n.client.Do(req)
	if err != nil {
		return ctx.Err() == nil, err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	switch c := resp.StatusCode; {
	case c >= 200 && c < 300:
		return false, nil
	case c == http.StatusRequestTimeout, c == http.StatusTooManyRequests, c >= 500:
		return true, fmt.Errorf("HTTP %s", resp.Status)
	default:
		return false, fmt.Errorf("HTTP %s (not retried: fix the receiver or the URL)", resp.Status)
	}
}

// Env is the environment an exec hook gets for m, beside the service's.
func Env(m Notification) []string {
	return []string{
		"UMBRA_EVENT=" + m.Event,
		"UMBRA_JOB=" + m.Job,
		"UMBRA_JOB_KIND=" + m.Kind,
		"UMBRA_RUN_ID=" + m.RunID,
		"UMBRA_TRIGGER=" + m.Trigger,
		"UMBRA_RESULT=" + m.Result,
		"UMBRA_START=" + m.Start.UTC().Format(time.RFC3339),
		"UMBRA_BYTES=" + strconv.FormatInt(m.Bytes, 10),
		"UMBRA_ERROR=" + m.Error,
	}
}

// exec runs the hook with body on stdin.
func (n *Notifier) exec(ctx context.Context, m Notification, body []byte) error {
	ctx, cancel := context.WithTimeout(ctx, n.cfg.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, n.cfg.Exec[0], n.cfg.Exec[1:]...)
	cmd.Stdin = bytes.NewReader(body)
	cmd.Env = append(os.Environ(), Env(m)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	if err := cmd.Run(); err != nil {
		msg := bytes.TrimSpace(out.Bytes())
		if len(msg) > 512 {
			msg = msg[:512]
		}
		return fmt.Errorf("%w: %s", err, msg)
	}
	return nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
