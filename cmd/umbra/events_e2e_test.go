package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"umbra/internal/testutil"
)

// TestEvents: `umbra events --json` follows snapshots created and
// deleted and storage changes as they happen.
func TestEvents(t *testing.T) {
	dir := t.TempDir()
	s := startService(t, dir, []string{"a"})
	cmd := exec.Command(umbraBin, "--api-socket", s.api, "events", "--json")
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Signal(syscall.SIGINT); cmd.Wait() }()
	lines := make(chan map[string]any, 64)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev map[string]any
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				lines <- ev
			}
		}
		close(lines)
	}()
	// The subscription is made once an event comes through: poke with a
	// resize that changes nothing until one does, then drain what the
	// pokes still have in flight (it is at most one event each).
	for first := time.After(testutil.HangGuard); ; {
		s.ok("storage", "resize", "a", "--max", "1G")
		select {
		case <-lines:
		case <-time.After(100 * time.Millisecond):
			continue
		case <-first:
			testutil.Hung(t, "an event from umbra events")
		}
		break
	}
	s.ok("snapshot", "create", "a", "--id", "e1")
	s.ok("snapshot", "delete", "a", "e1")
	s.ok("storage", "resize", "a", "--max", "1G")
	want := []string{"snapshot_created", "snapshot_deleted", "storage_changed"}
	deadline := time.After(testutil.HangGuard)
	for len(want) > 0 {
		select {
		case ev, ok := <-lines:
			if !ok {
				t.Fatalf("umbra events ended; still waiting for %v", want)
			}
			if ev["kind"] == want[0] && ev["volume"] == "a" {
				want = want[1:]
			}
		case <-deadline:
			testutil.Hung(t, fmt.Sprintf("the %v events", want))
		}
	}
}
