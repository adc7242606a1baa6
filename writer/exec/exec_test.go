package exec

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"umbra/internal/testutil"
	"umbra/writer"
)

// hook writes an executable shell script name in dir.
func hook(t *testing.T, dir, name, body string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
}

var set = writer.Set{ID: "set-1", Volumes: []writer.Volume{{Name: "v", Mounts: []string{"/srv/a", "/srv/b"}}}}

// TestHooksRunInOrder: freeze runs the directory's executables in name
// order, thaw in reverse, each with the phase as argument and the set in
// its environment; what is not an executable file is left alone.
func TestHooksRunInOrder(t *testing.T) {
	dir, logf := t.TempDir(), filepath.Join(t.TempDir(), "log")
	for _, n := range []string{"20-db", "10-app"} {
		hook(t, dir, n, fmt.Sprintf(`echo "%s $1 $UMBRA_SET $UMBRA_MOUNTS" >> %s`, n, logf))
	}
	os.WriteFile(filepath.Join(dir, "README"), []byte("not a hook"), 0o644)
	os.Mkdir(filepath.Join(dir, "30-dir"), 0o755)
	w := New(dir, 0)
	if w.Name() != "exec:"+dir || w.Level() != writer.LevelApplication || !w.Involved(set) {
		t.Fatalf("writer %s level %v", w.Name(), w.Level())
	}
	if err := w.Freeze(context.Background(), set); err != nil {
		t.Fatal(err)
	}
	if err := w.Thaw(context.Background(), set); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(logf)
	want := "10-app freeze set-1 /srv/a:/srv/b\n20-db freeze set-1 /srv/a:/srv/b\n20-db thaw set-1 /srv/a:/srv/b\n10-app thaw set-1 /srv/a:/srv/b\n"
	if string(b) != want {
		t.Fatalf("hooks ran:\n%s\nwant:\n%s", b, want)
	}
}

// TestFailingHook: freeze stops at the first hook that fails and says
// which and what it printed; thaw (and abort) runs every hook and names
// each that failed.
func TestFailingHook(t *testing.T) {
	dir, logf := t.TempDir(), filepath.Join(t.TempDir(), "log")
	hook(t, dir, "10-a", `echo "a $1" >> `+logf+`; [ "$1" = freeze ] && { echo "disk busy"; exit 3; }; exit 4`)
	hook(t, dir, "20-b", `echo "b $1" >> `+logf+`; exit 5`)
	w := New(dir, 0)
	err := w.Freeze(context.Background(), set)
	if err == nil || !strings.Contains(err.Error(), "10-a freeze") || !strings.Contains(err.Error(), "disk busy") || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("freeze with a failing hook: %v", err)
	}
	err = w.Abort(context.Background(), set)
	if err == nil || !strings.Contains(err.Error(), "20-b thaw") || !strings.Contains(err.Error(), "10-a thaw") {
		t.Fatalf("abort with failing hooks: %v, want both named", err)
	}
	if b, _ := os.ReadFile(logf); string(b) != "a freeze\nb thaw\na thaw\n" {
		t.Fatalf("hooks ran:\n%s", b)
	}
}

// TestMissingHooksDir: a hooks directory that is not there fails the
// phase, naming it.
func TestMissingHooksDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "nosuch")
	if err := New(dir, 0).Freeze(context.Background(), set); err == nil || !strings.Contains(err.Error(), dir) {
		t.Fatalf("freeze with no hooks directory: %v", err)
	}
}

// TestHookTimeoutKillsItsChildren: a hook that outlives its timeout
// fails the phase as timed out, and what it started goes with it: a
// shell script's `sleep` kept its output open, and the phase waited for
// the sleep (600 s here) however short the timeout.
func TestHookTimeoutKillsItsChildren(t *testing.T) {
	dir, pidf := t.TempDir(), filepath.Join(t.TempDir(), "pid")
	hook(t, dir, "10-slow", "sleep 600 & echo $! > "+pidf+"; wait")
	w := New(dir, 500*time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- w.Freeze(context.Background(), set) }()
	err := testutil.Receive(t, done, "freeze returns once its hook timed out")
	if err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("freeze with a hook past its timeout: %v", err)
	}
	b, rerr := os.ReadFile(pidf)
	if rerr != nil {
		return // killed before it started its child
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	testutil.WaitFor(t, fmt.Sprintf("the hook's child %d is gone", pid), func() bool {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return true
		}
		s := string(st)
		i := strings.LastIndexByte(s, ')')
		return i > 0 && i+2 < len(s) && s[i+2] == 'Z'
	})
	syscall.Kill(pid, syscall.SIGKILL) // should the test fail: leave nothing behind
}
