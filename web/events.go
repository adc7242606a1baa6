package web

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"
)

type eventsData struct{}

func (eventsData) title() string { return "Live events" }

func (s *Server) eventsPage(w http.ResponseWriter, r *http.Request, sess *session) {
	s.render(w, r, http.StatusOK, "events", sess, eventsData{})
}

// eventJSON is one event as the page's script gets it.
type eventJSON struct {
	Time     time.Time `json:"time"`
	Kind     string    `json:"kind"`
	Volume   string    `json:"volume,omitempty"`
	Snapshot string    `json:"snapshot,omitempty"`
	SetID    string    `json:"set_id,omitempty"`
	State    string    `json:"state,omitempty"`
	Job      string    `json:"job,omitempty"`
	Message  string    `json:"message,omitempty"`
	Dropped  int64     `json:"dropped,omitempty"`
}

// heartbeat keeps an idle event stream open through proxies.
const heartbeat = 25 * time.Second

// eventStream sends the API's event stream as Server-Sent Events until
// the browser goes, the service stops or the session reaches its
// maximum age.
func (s *Server) eventStream(w http.ResponseWriter, r *http.Request, sess *session) {
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming is not supported here", http.StatusInternalServerError)
		return
	}
	ch, unsub, err := s.cfg.API.Subscribe(sess.caller, nil)
	if err != nil {
		http.Error(w, explain(err), http.StatusForbidden)
		return
	}
	defer unsub()
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.MaxAge-s.now().Sub(sess.created))
	defer cancel()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	fmt.Fprint(w, ": connected\n\n")
	fl.Flush()
	tick := time.NewTicker(heartbeat)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			fmt.Fprint(w, ": heartbeat\n\n")
		case ev := <-ch:
			b, _ := json.Marshal(eventJSON{Time: ev.GetTime().AsTime(), Kind: ev.GetKind(), Volume: ev.GetVolume(), Snapshot: ev.GetSnapshot(),
				SetID: ev.GetSetId(), State: ev.GetState(), Job: ev.GetJob(), Message: ev.GetMessage(), Dropped: ev.GetDropped()})
			fmt.Fprintf(w, "data: %s\n\n", b)
		}
		fl.Flush()
	}
}
