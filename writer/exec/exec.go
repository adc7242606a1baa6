// Package exec is the exec-hook writer: the executables in a directory
// run with the argument "freeze" before the snapshot and "thaw" after it
// (the convention of qemu-guest-agent's fsfreeze hooks), each bounded by a
// timeout; a non-zero exit fails the phase and its output is reported.
package exec

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"umbra/writer"
)

// Writer runs the hooks of one directory.
type Writer struct {
	writer.Base
	dir     string
	timeout time.Duration
}

// New returns the writer of the hooks in dir, each bounded by timeout
// (0: 30 s).
func New(dir string, timeout time.Duration) *Writer {
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	return &Writer{dir: dir, timeout: timeout}
}

func (w *Writer) Name() string             { return "exec:" + w.dir }
func (w *Writer) Level() writer.Level      { return writer.LevelApplication }
func (w *Writer) Involved(writer.Set) bool { return true }

func (w *Writer) hooks() ([]string, error) {
	ents, err := os.ReadDir(w.dir)
	if err != nil {
		return nil, fmt.Errorf("hooks directory %s: %w", w.dir, err)
	}
	var out []string
	for _, e := range ents {
		info, err := e.Info()
		if err != nil || !info.Mode().IsRegular() || info.Mode()&0o111 == 0 {
			continue
		}
		out = append(out, filepath.Join(w.dir, e.Name()))
	}
	sort.Strings(out)
	return out, nil
}

func (w *Writer) run(ctx context.Context, s writer.Set, phase string, reverse bool) error {
	hooks, err := w.hooks()
	if err != nil {
		return err
	}
	if reverse {
		for i, j := 0, len(hooks)-1; i < j; i, j = i+1, j-1 {
			hooks[i], hooks[j] = hooks[j], hooks[i]
		}
	}
	var failed []string
	for _, h := range hooks {
		hctx, cancel := context.WithTimeout(ctx, w.timeout)
		cmd := exec.CommandContext(hctx, h, phase)
		// A hook past its timeout goes with what it started (a shell
		// script's commands hold its output open: waiting for them would
		// not bound the hook at all); one that leaves a process holding
		// its output once it exited is waited for a second at most.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
		cmd.WaitDelay = time.Second
		cmd.Env = append(os.Environ(), "UMBRA_SET="+s.ID, "UMBRA_MOUNTS="+strings.Join(s.Mounts(), ":"))
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		cancel()
		if hctx.Err() == context.DeadlineExceeded {
			err = fmt.Errorf("timed out after %v", w.timeout)
		}
		if err != nil {
			failed = append(failed, fmt.Sprintf("%s %s: %v: %s", h, phase, err, strings.TrimSpace(out.String())))
			if !reverse {
				break // freeze stops at the first failing hook
			}
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%s", strings.Join(failed, "; "))
	}
	return nil
}

// Freeze runs every hook with "freeze", in name order.
func (w *Writer) Freeze(ctx context.Context, s writer.Set) error {
	return w.run(ctx, s, "freeze", false)
}

// Thaw runs every hook with "thaw", in reverse name order.
func (w *Writer) Thaw(ctx context.Context, s writer.Set) error { return w.run(ctx, s, "thaw", true) }

// Abort thaws.
func (w *Writer) Abort(ctx context.Context, s writer.Set) error { return w.Thaw(ctx, s) }
