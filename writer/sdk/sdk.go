// Package sdk lets an application become an Umbra writer in a few lines:
// it connects to the service's writer socket, registers the application's
// components (paths or volume names) and calls its functions at each phase
// of a snapshot set. A function left nil succeeds at once.
//
//	err := sdk.Run(ctx, "/run/umbra/writers.sock", sdk.Writer{
//		Name:       "orders-db",
//		Components: []string{"/srv/orders"},
//		Freeze:     func(ctx context.Context, s writer.Set) error { return db.Pause(ctx) },
//		Thaw:       func(ctx context.Context, s writer.Set) error { return db.Resume() },
//	})
package sdk

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sync"

	"umbra/writer"
)

// Phase is the function an application runs at one phase.
type Phase func(ctx context.Context, set writer.Set) error

// Writer describes the application.
type Writer struct {
	Name       string
	Components []string
	Level      writer.Level

	PrepareForBackup   Phase
	PrepareForSnapshot Phase
	Freeze             Phase
	Thaw               Phase
	PostSnapshot       Phase
	// BackupComplete learns whether the backup succeeded.
	BackupComplete func(ctx context.Context, set writer.Set, ok bool) error
	Abort          Phase
}

// Run registers w with the service at socket and serves its phases until
// ctx ends or the service goes away. Phases run one at a time, in order.
func Run(ctx context.Context, socket string, w Writer) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return fmt.Errorf("connect to the Umbra writer socket %s (is `umbra serve` running?): %w", socket, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	var wmu sync.Mutex
	send := func(m writer.Message) error {
		b, err := json.Marshal(m)
		if err != nil {
			return err
		}
		wmu.Lock()
		defer wmu.Unlock()
		_, err = c.Write(append(b, '\n'))
		return err
	}
	if err := send(writer.Message{Type: "register", Version: writer.ProtocolVersion, Name: w.Name, Components: w.Components, Level: w.Level}); err != nil {
		return err
	}
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	if !sc.Scan() {
		return fmt.Errorf("register %s: the service closed the connection", w.Name)
	}
	m, err := writer.DecodeMessage(sc.Bytes())
	if err != nil {
		return err
	}
	if m.Type != "registered" {
		return fmt.Errorf("register %s: %s", w.Name, m.Error)
	}
	for sc.Scan() {
		m, err := writer.DecodeMessage(sc.Bytes())
		if err != nil || m.Type != "event" || m.Set == nil {
			continue
		}
		res := writer.Message{Type: "result", ID: m.ID}
		if err := w.dispatch(ctx, m); err != nil {
			res.Error = err.Error()
		}
		if err := send(res); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("writer %s: the service closed the connection", w.Name)
}

func (w Writer) dispatch(ctx context.Context, m writer.Message) error {
	set := *m.Set
	var f Phase
	switch m.Phase {
	case "prepare-for-backup":
		f = w.PrepareForBackup
	case "prepare-for-snapshot":
		f = w.PrepareForSnapshot
	case "freeze":
		f = w.Freeze
	case "thaw":
		f = w.Thaw
	case "post-snapshot":
		f = w.PostSnapshot
	case "abort":
		f = w.Abort
	case "backup-complete":
		if w.BackupComplete != nil {
			return w.BackupComplete(ctx, set, m.OK)
		}
		return nil
	default:
		return fmt.Errorf("unknown phase %q", m.Phase)
	}
	if f == nil {
		return nil
	}
	return f(ctx, set)
}
