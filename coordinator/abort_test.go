package coordinator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"umbra/cow"
	"umbra/provider"
	"umbra/writer"
)

// holdLog is the COW provider with its transactions instrumented: each
// records when its volume's writes begin to wait and when they are let
// go, and one phase of one volume can be made to fail once.
type holdLog struct {
	*cow.Provider
	failVol, failIn string
	cancel          context.CancelFunc // for failIn "requester-gone"

	mu     sync.Mutex // guards the fields below
	held   map[string]bool
	events []string
	failed bool
}

func (p *holdLog) note(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.events = append(p.events, fmt.Sprintf(format, args...))
}

func (p *holdLog) setHeld(vol string, held bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.held[vol] != held {
		p.held[vol] = held
		ev := "release " + vol
		if held {
			ev = "hold " + vol
		}
		p.events = append(p.events, ev)
	}
}

// stillHeld names the volumes whose writes wait now.
func (p *holdLog) stillHeld() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for v, h := range p.held {
		if h {
			out = append(out, v)
		}
	}
	return out
}

// fail says whether phase of vol is the one to fail (once).
func (p *holdLog) fail(vol, phase string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failed || vol != p.failVol || phase != p.failIn {
		return false
	}
	p.failed = true
	return true
}

func (p *holdLog) Prepare(ctx context.Context, vol string, opts provider.SnapshotOptions) (provider.Txn, error) {
	txn, err := p.Provider.Prepare(ctx, vol, opts)
	if err != nil {
		return nil, err
	}
	return &holdLogTxn{Txn: txn, p: p, vol: vol}, nil
}

type holdLogTxn struct {
	provider.Txn
	p   *holdLog
	vol string
}

func (t *holdLogTxn) PreCommit(ctx context.Context, limit time.Duration) error {
	if t.p.fail(t.vol, "hold") {
		return errors.New("hold failed on purpose")
	}
	if t.p.fail(t.vol, "requester-gone") {
		t.p.cancel()
	}
	if err := t.Txn.PreCommit(ctx, limit); err != nil {
		return err
	}
	t.p.setHeld(t.vol, true)
	return nil
}

func (t *holdLogTxn) Commit(ctx context.Context) (provider.Snapshot, error) {
	if t.p.fail(t.vol, "commit") {
		return provider.Snapshot{}, errors.New("commit failed on purpose")
	}
	return t.Txn.Commit(ctx)
}

func (t *holdLogTxn) PostCommit(ctx context.Context) error {
	if t.p.fail(t.vol, "release") {
		return errors.New("release failed on purpose")
	}
	err := t.Txn.PostCommit(ctx)
	t.p.setHeld(t.vol, false)
	return err
}

func (t *holdLogTxn) Abort(ctx context.Context) error {
	err := t.Txn.Abort(ctx)
	t.p.setHeld(t.vol, false)
	return err
}

// thawWriter is a filesystem-level writer whose thaw writes to every
// volume of the set, as FITHAW writes a filesystem's superblock. A thaw
// that begins while a volume is still held is recorded as a failure
// (and skips its writes: they would wait for the hold's limit). With
// collide, its freeze makes snapshot collide on volume "b" directly, as a
// second requester racing the set would, so that the set's commit finds
// the id taken after its writes are held.
type thawWriter struct {
	writer.Base
	p       *holdLog
	vols    *cow.Provider
	collide string
	heldAt  []string // volumes held when a thaw began
	thaws   int
	wrote   int
}

func (w *thawWriter) Name() string             { return "fs" }
func (w *thawWriter) Level() writer.Level      { return writer.LevelFilesystem }
func (w *thawWriter) Involved(writer.Set) bool { return true }
func (w *thawWriter) Freeze(ctx context.Context, s writer.Set) error {
	w.p.note("freeze")
	if w.collide != "" {
		v, _ := w.vols.Volume("b")
		if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: w.collide}); err != nil {
			return fmt.Errorf("racing snapshot: %w", err)
		}
	}
	return nil
}
func (w *thawWriter) Thaw(ctx context.Context, s writer.Set) error {
	w.p.note("thaw")
	w.thaws++
	if w.heldAt = w.p.stillHeld(); len(w.heldAt) > 0 {
		return nil
	}
	for _, vs := range s.Volumes {
		v, err := w.vols.Volume(vs.Name)
		if err != nil {
			return err
		}
		if _, err := v.WriteAt([]byte("superblock"), 0); err != nil {
			return err
		}
		w.wrote++
	}
	return nil
}

// TestAbortReleasesHoldsBeforeThaw: whatever phase of a set fails after
// writes were held (an id taken by a racing requester, a hold, commit or
// release that fails, the requester leaving), the abort lets every
// volume's writes go before any writer thaws, so a thaw that writes to
// the volume (FITHAW) goes through. The holds' limit is ten minutes: an
// abort that waited for it would hang the test.
func TestAbortReleasesHoldsBeforeThaw(t *testing.T) {
	for _, tc := range []struct{ name, failVol, failIn, collide string }{
		{name: "late-id-collision", collide: "r2"},
		{name: "hold-fails", failVol: "b", failIn: "hold"},
		{name: "requester-gone", failVol: "b", failIn: "requester-gone"},
		{name: "commit-fails", failVol: "b", failIn: "commit"},
		{name: "release-fails", failVol: "a", failIn: "release"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cp, _ := cowVolumes(t, "a", "b")
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			p := &holdLog{Provider: cp, failVol: tc.failVol, failIn: tc.failIn, cancel: cancel, held: map[string]bool{}}
			reg := &provider.Registry{}
			reg.Register(p)
			ws := writer.NewRegistry()
			w := &thawWriter{p: p, vols: cp, collide: tc.collide}
			ws.Add(w)
			c := New(reg, ws, nil, nil)
			_, err := c.CreateSet(ctx, Request{Volumes: []string{"a", "b"}, Writers: true, ID: "r2", HoldTimeout: 10 * time.Minute})
			if !errors.Is(err, ErrAborted) {
				t.Fatalf("set that fails in %s: %v, want ErrAborted", tc.name, err)
			}
			if tc.collide != "" && !errors.Is(err, provider.ErrExists) {
				t.Fatalf("late id collision: %v, want ErrExists", err)
			}
			if len(w.heldAt) > 0 {
				t.Fatalf("the thaw began while %v still held writes; events %v", w.heldAt, p.events)
			}
			if w.thaws == 0 || w.wrote != 2*w.thaws {
				t.Fatalf("%d thaws wrote to %d volumes, want 2 each; events %v", w.thaws, w.wrote, p.events)
			}
			if held := p.stillHeld(); len(held) > 0 {
				t.Fatalf("%v still held after the abort", held)
			}
			// The abort deleted what the set made and nothing else.
			for _, name := range []string{"a", "b"} {
				v, _ := cp.Volume(name)
				var ids []string
				for _, sn := range v.Snapshots() {
					ids = append(ids, sn.ID)
				}
				want := ""
				if tc.collide != "" && name == "b" {
					want = tc.collide // the racing requester's
				}
				if strings.Join(ids, ",") != want {
					t.Fatalf("volume %s keeps snapshots %v after the abort, want %q", name, ids, want)
				}
			}
		})
	}
}

// TestPrepareRefusesTakenID: an id already taken is refused before any
// writer freezes or any write is held.
func TestPrepareRefusesTakenID(t *testing.T) {
	cp, reg := cowVolumes(t, "a")
	v, _ := cp.Volume("a")
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "r2"}); err != nil {
		t.Fatal(err)
	}
	ws := writer.NewRegistry()
	w := &recWriter{name: "app"}
	ws.Add(w)
	c := New(reg, ws, nil, nil)
	_, err := c.CreateSet(context.Background(), Request{Volumes: []string{"a"}, Writers: true, ID: "r2"})
	if !errors.Is(err, provider.ErrExists) {
		t.Fatalf("set with a taken id: %v, want ErrExists", err)
	}
	if w.seen("freeze") {
		t.Fatalf("the writer froze for a set refused at prepare: %v", w.phases)
	}
}
