package main

import (
	"fmt"
	"time"

	"umbra/api"
	"umbra/cow"
)

// checkServeConfig checks every value of the configuration that can be
// checked without opening anything, so that a bad one is refused before
// a volume, socket or catalog is opened. It returns the set timeout.
func checkServeConfig(cfg serveConfig) (setTimeout time.Duration, err error) {
	for _, vc := range cfg.Volumes {
		if _, err := parseSizeFlag("volume "+vc.Name+": max storage", vc.MaxStorage, vc.MaxStorage != ""); err != nil {
			return 0, err
		}
		if vc.ChunkSize != "" {
			n, err := parseSizeFlag("volume "+vc.Name+": chunk size", vc.ChunkSize, true)
			if err != nil {
				return 0, err
			}
			if err := checkChunkSize("volume "+vc.Name+": chunk size", n, cow.MinChunkSize, cow.MaxChunkSize); err != nil {
				return 0, err
			}
		}
		switch cow.Policy(vc.Policy) {
		case "", cow.PolicyDeleteOldest, cow.PolicyInvalidate:
		default:
			return 0, usageError{fmt.Errorf("volume %s: policy %q: want delete-oldest or invalidate", vc.Name, vc.Policy)}
		}
	}
	switch cfg.HoldPrio {
	case "", "normal", "realtime":
	default:
		return 0, usageError{fmt.Errorf("--hold-priority %q: want realtime or normal", cfg.HoldPrio)}
	}
	setTimeout = api.DefaultSetTimeout
	if cfg.SetTimeout != "" {
		if setTimeout, err = time.ParseDuration(cfg.SetTimeout); err != nil || setTimeout <= 0 {
			return 0, usageError{fmt.Errorf("--set-timeout %q: want a positive duration like 180s or 5m", cfg.SetTimeout)}
		}
	}
	return setTimeout, nil
}
