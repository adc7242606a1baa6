// Command umbra is Umbra's one binary: the service (`umbra serve`) and the
// CLI verbs that drive it. Each verb lives in its own cmd_*.go file.
//
// Exit codes: 0 success; 1 an operation failed; 2 bad usage or input;
// 3 a required resource was not found; 4 the service is unreachable;
// 5 the caller is not authenticated or lacks the role.
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime/pprof"

	"umbra/backup"
)

func main() {
	// UMBRA_CPUPROFILE=FILE profiles the command (the service until it
	// stops, a restore until it ends): for finding where time goes.
	// Stopped before os.Exit, which runs no deferred calls.
	if path := os.Getenv("UMBRA_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil && pprof.StartCPUProfile(f) == nil {
			defer f.Close()
		}
	}
	err := newRootCmd().Execute()
	pprof.StopCPUProfile() // a no-op without a profile
	if err != nil {
		fmt.Fprintln(os.Stderr, "umbra:", err)
		os.Exit(exitCode(err))
	}
}

// usageError marks errors caused by bad flags or arguments (exit code 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func exitCode(err error) int {
	var ue usageError
	var nf notFoundError
	var ae accessError
	switch {
	case errors.As(err, &ae):
		return 5
	case errors.As(err, &ue):
		return 2
	case errors.As(err, &nf), errors.Is(err, backup.ErrNoImage):
		return 3
	case errors.Is(err, errUnreachable):
		return 4
	}
	return 1
}
