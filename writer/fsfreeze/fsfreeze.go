// Package fsfreeze is the built-in filesystem writer: it freezes every
// filesystem mounted from a volume of the snapshot set with the kernel's
// FIFREEZE ioctl and thaws it with FITHAW. A guard thaws by itself at a
// deadline, so a coordinator that hangs or dies inside the window never
// leaves a filesystem frozen (a frozen filesystem blocks every writer on
// the machine).
package fsfreeze

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
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

	mu     sync.Mutex // guards frozen
	frozen map[string]*time.Timer
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
		w.mu.Lock()
		w.frozen[m] = time.AfterFunc(guard, func() { w.thaw(m) })
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

// Thaw thaws what Freeze froze.
func (w *Writer) Thaw(ctx context.Context, s writer.Set) error {
	var errs []error
	for _, m := range s.Mounts() {
		errs = append(errs, w.thaw(m))
	}
	return errors.Join(errs...)
}

// Abort thaws.
func (w *Writer) Abort(ctx context.Context, s writer.Set) error { return w.Thaw(ctx, s) }
