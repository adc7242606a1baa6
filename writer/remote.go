package writer

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"
)

// The out-of-process writer protocol, version 1: JSON messages, one per
// line, over a unix socket. The application (package writer/sdk) sends
// "register"; the service answers "registered" (or "error") and then sends
// one "event" per phase, which the application answers with a "result"
// carrying the same id and an empty error on success. A writer whose
// connection ends is unregistered, and a phase in flight fails at once.

// ProtocolVersion is the writer protocol's version.
const ProtocolVersion = 1

// Message is every message of the protocol; fields unused by a type are
// empty.
type Message struct {
	Type       string   `json:"type"` // register, registered, event, result, error
	Version    int      `json:"version,omitempty"`
	Name       string   `json:"name,omitempty"`
	Components []string `json:"components,omitempty"`
	Level      Level    `json:"level,omitempty"`
	ID         uint64   `json:"id,omitempty"`
	Phase      string   `json:"phase,omitempty"`
	Set        *Set     `json:"set,omitempty"`
	OK         bool     `json:"ok,omitempty"` // backup-complete outcome
	Error      string   `json:"error,omitempty"`
}

// maxMessage bounds one line.
const maxMessage = 1 << 20

// ErrDisconnected reports a writer process that went away.
var ErrDisconnected = errors.New("writer process disconnected")

// DecodeMessage decodes and validates one protocol line.
func DecodeMessage(b []byte) (Message, error) {
	var m Message
	if len(b) > maxMessage {
		return m, fmt.Errorf("writer message of %d bytes: over the %d limit", len(b), maxMessage)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("writer message: %w", err)
	}
	switch m.Type {
	case "register":
		if m.Version != ProtocolVersion {
			return m, fmt.Errorf("writer protocol version %d, the service speaks %d", m.Version, ProtocolVersion)
		}
		if m.Name == "" || len(m.Name) > 256 {
			return m, fmt.Errorf("writer name %q: give 1 to 256 bytes", m.Name)
		}
		if m.Level != LevelApplication && m.Level != LevelFilesystem {
			return m, fmt.Errorf("writer level %d: want 0 (application) or 1 (filesystem)", m.Level)
		}
	case "result":
		if m.ID == 0 {
			return m, errors.New("writer result without an id")
		}
	case "registered", "event", "error":
	default:
		return m, fmt.Errorf("writer message type %q is unknown", m.Type)
	}
	return m, nil
}

// remote is a writer living in another process.
type remote struct {
	name       string
	components []string
	level      Level
	conn       net.Conn

	wmu    sync.Mutex // serializes writes to conn
	mu     sync.Mutex // guards next, wait, closed
	next   uint64
	wait   map[uint64]chan Message
	closed bool
}

func (r *remote) Name() string { return r.name }
func (r *remote) Level() Level { return r.level }

// Involved: a component is a volume name, or a path on a mount of the set.
func (r *remote) Involved(s Set) bool {
	for _, c := range r.components {
		for _, v := range s.Volumes {
			if c == v.Name {
				return true
			}
			for _, m := range v.Mounts {
				if Under(c, m) {
					return true
				}
			}
		}
	}
	return false
}

func (r *remote) send(m Message) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	r.wmu.Lock()
	defer r.wmu.Unlock()
	r.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err = r.conn.Write(append(b, '\n'))
	return err
}

// call sends a phase event and waits for its result, the context, or the
// connection's end.
func (r *remote) call(ctx context.Context, phase string, s Set, ok bool) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return ErrDisconnected
	}
	r.next++
	id := r.next
	ch := make(chan Message, 1)
	r.wait[id] = ch
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.wait, id)
		r.mu.Unlock()
	}()
	if err := r.send(Message{Type: "event", ID: id, Phase: phase, Set: &s, OK: ok}); err != nil {
		return fmt.Errorf("%w: %v", ErrDisconnected, err)
	}
	select {
	case m, live := <-ch:
		if !live {
			return ErrDisconnected
		}
		if m.Error != "" {
			return errors.New(m.Error)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (r *remote) PrepareForBackup(ctx context.Context, s Set) error {
	return r.call(ctx, "prepare-for-backup", s, false)
}
func (r *remote) PrepareForSnapshot(ctx context.Context, s Set) error {
	return r.call(ctx, "prepare-for-snapshot", s, false)
}
func (r *remote) Freeze(ctx context.Context, s Set) error { return r.call(ctx, "freeze", s, false) }
func (r *remote) Thaw(ctx context.Context, s Set) error   { return r.callGone(ctx, "thaw", s) }
func (r *remote) PostSnapshot(ctx context.Context, s Set) error {
	return r.call(ctx, "post-snapshot", s, false)
}
func (r *remote) BackupComplete(ctx context.Context, s Set, ok bool) error {
	return r.call(ctx, "backup-complete", s, ok)
}
func (r *remote) Abort(ctx context.Context, s Set) error { return r.callGone(ctx, "abort", s) }

// callGone is call for thaw and abort: a process that is gone has nothing
// left frozen.
func (r *remote) callGone(ctx context.Context, phase string, s Set) error {
	if err := r.call(ctx, phase, s, false); err != nil && !errors.Is(err, ErrDisconnected) {
		return err
	}
	return nil
}

// read dispatches results until the connection ends.
func (r *remote) read(sc *bufio.Scanner) {
	for sc.Scan() {
		m, err := DecodeMessage(sc.Bytes())
		if err != nil || m.Type != "result" {
			continue
		}
		r.mu.Lock()
		ch := r.wait[m.ID]
		r.mu.Unlock()
		if ch != nil {
			ch <- m
		}
	}
	r.mu.Lock()
	r.closed = true
	for id, ch := range r.wait {
		close(ch)
		delete(r.wait, id)
	}
	r.mu.Unlock()
}

// Serve accepts out-of-process writers on the unix socket at path and
// keeps them in reg until their connection ends or ctx ends.
func Serve(ctx context.Context, path string, reg *Registry, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("writer socket %s: %w", path, err)
	}
	os.Chmod(path, 0o660)
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("writer socket %s: %w", path, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveRemote(ctx, c, reg, log)
		}()
	}
}

func serveRemote(ctx context.Context, c net.Conn, reg *Registry, log *slog.Logger) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 64<<10), maxMessage)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if !sc.Scan() {
		return
	}
	c.SetReadDeadline(time.Time{})
	r := &remote{conn: c, wait: map[uint64]chan Message{}}
	m, err := DecodeMessage(sc.Bytes())
	if err == nil && m.Type != "register" {
		err = fmt.Errorf("first message is %q, want register", m.Type)
	}
	if err == nil {
		r.name, r.components, r.level = m.Name, m.Components, m.Level
		err = reg.Add(r)
	}
	if err != nil {
		r.send(Message{Type: "error", Error: err.Error()})
		return
	}
	defer reg.Remove(r.name)
	if err := r.send(Message{Type: "registered", Name: r.name}); err != nil {
		return
	}
	log.Info("writer registered", "writer", r.name, "components", r.components)
	r.read(sc)
	log.Info("writer disconnected", "writer", r.name)
}
