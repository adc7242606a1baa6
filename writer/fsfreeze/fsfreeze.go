// Package fsfreeze is the built-in filesystem writer: it freezes every
// filesystem mounted from a volume of the snapshot set with the kernel's
// FIFREEZE ioctl and thaws it with FITHAW. Guards thaw by themselves at a
// deadline, so a coordinator that hangs or dies inside the window never
// leaves a filesystem frozen (a frozen filesystem blocks every writer on
// the machine): a timer in the process, and, when GuardCommand is set, a
// separate guard process that outlives a crash of the service.
package fsfreeze

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"umbra/writer"
)

// The ioctls of linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int)
// (x/sys/unix does not define them).
const (
	fiFreeze = 0xc0045877
	fiThaw   = 0xc0045878
)

// DefaultGuard is how long a filesystem may stay frozen before the guard
// thaws it (VSS bounds freeze to 60 s).
const DefaultGuard = 60 * time.Second

// Writer freezes the filesystems of a set.
type Writer struct {
	writer.Base
	// Guard bounds a freeze (0: DefaultGuard).
	Guard time.Duration
	// GuardCommand, when set, is the command line of a guard process
	// (e.g. `umbra thaw-guard`) started at freeze with "--after DURATION"
	// and the mount points appended; it thaws them at the deadline unless
	// thaw kills it first, even if this process died meanwhile.
	GuardCommand []string

	// afterFunc starts the in-process guard's timer (nil: time.AfterFunc;
	// the tests fire it themselves).
	afterFunc func(time.Duration, func()) *time.Timer

	mu     sync.Mutex // guards frozen and guard
	frozen map[string]*time.Timer
	guard  *exec.Cmd
}

// New returns the fsfreeze writer.
func New() *Writer { return &Writer{frozen: map[string]*time.Timer{}} }

func (w *Writer) Name() string               { return "fsfreeze" }
func (w *Writer) Level() writer.Level        { return writer.LevelFilesystem }
func (w *Writer) Involved(s writer.Set) bool { return len(s.Mounts()) > 0 }

func ioctl(point string, req uint) error {
	f, err := os.Open(point)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.IoctlSetInt(int(f.Fd()), req, 0)
}

// Freeze freezes every mount of the set; on failure it thaws those it
// froze.
func (w *Writer) Freeze(ctx context.Context, s writer.Set) error {
	guard := w.Guard
	if guard <= 0 {
		guard = DefaultGuard
	}
	if len(w.GuardCommand) > 0 && len(s.Mounts()) > 0 {
		args := append(append(append([]string(nil), w.GuardCommand[1:]...), "--after", guard.String()), s.Mounts()...)
		cmd := exec.Command(w.GuardCommand[0], args...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("start the thaw guard %s: %w", w.GuardCommand[0], err)
		}
		w.mu.Lock()
		w.guard = cmd
		w.mu.Unlock()
	}
	for _, m := range s.Mounts() {
		done := make(chan error, 1)
		go func() { done <- ioctl(m, fiFreeze) }()
		var err error
		select {
		case err = <-done:
		case <-ctx.Done():
			// The ioctl still runs; thaw once it returns.
			go func() {
				if <-done == nil {
					ioctl(m, fiThaw)
				}
			}()
			err = ctx.Err()
		}
		if err != nil {
			w.Thaw(context.Background(), s)
			return fmt.Errorf("freeze %s: %w", m, err)
		}
		after := w.afterFunc
		if after == nil {
			after = time.AfterFunc
		}
		w.mu.Lock()
		w.frozen[m] = after(guard, func() { w.thaw(m) })
		w.mu.Unlock()
	}
	return nil
}

func (w *Writer) thaw(m string) error {
	w.mu.Lock()
	t, ok := w.frozen[m]
	delete(w.frozen, m)
	w.mu.Unlock()
	if !ok {
		return nil
	}
	t.Stop()
	if err := ioctl(m, fiThaw); err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: not frozen
		return fmt.Errorf("thaw %s: %w", m, err)
	}
	return nil
}

// Thaw thaws what Freeze froze and stops the guard process.
func (w *Writer) Thaw(ctx context.Context, s writer.Set) error {
	var errs []error
	for _, m := range s.Mounts() {
		errs = append(errs, w.thaw(m))
	}
	w.mu.Lock()
	g := w.guard
	w.guard = nil
	w.mu.Unlock()
	if g != nil {
		g.Process.Kill()
		g.Wait()
	}
	return errors.Join(errs...)
}

// RunGuard is the guard process: it waits, then thaws mounts (a mount
// that is not frozen is left alone).
func RunGuard(after time.Duration, mounts []string) error {
	time.Sleep(after)
	var errs []error
	for _, m := range mounts {
		if err := ioctl(m, fiThaw); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("thaw %s: %w", m, err))
		}
	}
	return errors.Join(errs...)
}

// Abort thaws.
func (w *Writer) Abort(ctx context.Context, s writer.Set) error { return w.Thaw(ctx, s) }
