package api

import (
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"umbra/api/umbrav1"
)

// events fans events out to subscribers. Sending never blocks the
// service: a subscriber whose buffer is full misses the event, and the
// next one it gets says how many it missed.
type events struct {
	mu   sync.Mutex // guards subs
	subs map[*subscriber]struct{}
}

type subscriber struct {
	ch      chan *umbrav1.Event
	kinds   map[string]bool // nil: all
	dropped int64           // guarded by events.mu
}

func (e *events) subscribe(kinds []string) *subscriber {
	s := &subscriber{ch: make(chan *umbrav1.Event, 256)}
	if len(kinds) > 0 {
		s.kinds = map[string]bool{}
		for _, k := range kinds {
			s.kinds[k] = true
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.subs == nil {
		e.subs = map[*subscriber]struct{}{}
	}
	e.subs[s] = struct{}{}
	return s
}

func (e *events) unsubscribe(s *subscriber) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.subs, s)
}

func (e *events) publish(ev *umbrav1.Event) {
	ev.Time = timestamppb.New(time.Now())
	e.mu.Lock()
	defer e.mu.Unlock()
	for s := range e.subs {
		if s.kinds != nil && !s.kinds[ev.Kind] {
			continue
		}
		out := ev
		if s.dropped > 0 {
			c := proto.Clone(ev).(*umbrav1.Event)
			c.Dropped = s.dropped
			out = c
		}
		select {
		case s.ch <- out:
			s.dropped = 0
		default:
			s.dropped++
		}
	}
}

// emit publishes an event of kind.
func (s *Server) emit(kind string, ev *umbrav1.Event) {
	ev.Kind = kind
	s.events.publish(ev)
}

// WriterFailed is the writer registry's OnFailure hook for events.
func (s *Server) WriterFailed(writer, phase string) {
	s.emit("writer_failed", &umbrav1.Event{Message: writer + " failed in " + phase})
}

// Events streams events until the client goes away.
func (s *Server) Events(req *umbrav1.EventsRequest, stream umbrav1.Umbra_EventsServer) error {
	sub := s.events.subscribe(req.GetKinds())
	defer s.events.unsubscribe(sub)
	for {
		select {
		case <-stream.Context().Done():
			return nil
		case ev := <-sub.ch:
			if err := stream.Send(ev); err != nil {
				return err
			}
		}
	}
}
