package main

import (
	"context"
	"errors"
	"log/slog"

	"umbra/cow"
)

func mountFUSE(ctx context.Context, dir string, p *cow.Provider, log *slog.Logger) (func(), error) {
	return nil, errors.New("--fuse-dir: not built yet")
}
