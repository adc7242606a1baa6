package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"syscall"

	"umbra/cow"
	"umbra/frontend"
	"umbra/fusefile"
)

// mountFUSE mounts the volumes and snapshots of p as files under dir and
// returns the function that unmounts it.
func mountFUSE(ctx context.Context, dir string, p *cow.Provider, log *slog.Logger) (func(), error) {
	// A service killed with -9 leaves its FUSE mount behind, dead
	// (ENOTCONN): detach it so that this run can mount again.
	if _, err := os.Stat(dir); errors.Is(err, syscall.ENOTCONN) {
		log.Warn("FUSE directory left by a service that died: detaching it", "dir", dir)
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			return nil, fmt.Errorf("--fuse-dir %s is a dead FUSE mount and cannot be detached: %w (run umount -l %s)", dir, err, dir)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("--fuse-dir %s: %w", dir, err)
	}
	m, err := fusefile.Mount(dir, frontend.FUSESource(p), fusefile.Options{})
	if err != nil {
		return nil, fmt.Errorf("--fuse-dir: %w; is /dev/fuse there and are you root?", err)
	}
	log.Info("serving FUSE files", "dir", dir, "files", frontend.Names(p))
	return func() {
		if err := m.Unmount(); err != nil {
			log.Error("unmount FUSE", "dir", dir, "err", err)
		}
	}, nil
}
