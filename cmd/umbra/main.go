// Command umbra is Umbra's one binary: the service (`umbra serve`) and the
// CLI verbs that drive it. Each verb lives in its own cmd_*.go file.
//
// Exit codes: 0 success; 1 an operation failed; 2 bad usage or input;
// 3 a required resource was not found; 4 the service is unreachable;
// 5 the caller is not authenticated or lacks the role (a repository's
// wrong or missing password too). Under --json an error is one JSON
// object on stderr: {"error": "...", "code": N}, N the exit code.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
	// UMBRA_HEAPPROFILE=FILE writes a heap profile each time the
	// resident set reaches a new high (by 4 MiB): what memory grows
	// with, at the peak.
	stopHeap := func() {}
	if path := os.Getenv("UMBRA_HEAPPROFILE"); path != "" {
		stopHeap = startHeapProfile(path)
	}
	code := execute(os.Args[1:], os.Stderr)
	pprof.StopCPUProfile() // a no-op without a profile
	stopHeap()
	if code != 0 {
		os.Exit(code)
	}
}

// execute runs the command args name and returns its exit code, having
// written its error, if any, to stderr.
func execute(args []string, stderr io.Writer) int {
	root := newRootCmd()
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return 0
	}
	code := exitCode(err)
	printError(stderr, err, code, jsonWanted(args))
	return code
}

// printError writes a failed command's error: a line of text, or under
// --json one JSON object, {"error": "...", "code": N} with N the exit
// code, on one line.
func printError(w io.Writer, err error, code int, asJSON bool) {
	if !asJSON {
		fmt.Fprintln(w, "umbra:", err)
		return
	}
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.Encode(struct {
		Error string `json:"error"`
		Code  int    `json:"code"`
	}{err.Error(), code})
}

// jsonWanted reports whether --json was given: the parsed flag, or when
// parsing failed before reaching it, the arguments themselves.
func jsonWanted(args []string) bool {
	if gflags.json {
		return true
	}
	for _, a := range args {
		if a == "--" {
			break
		}
		if a == "--json" || a == "--json=true" || a == "--json=1" {
			return true
		}
	}
	return false
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
	case errors.As(err, &ae), errors.Is(err, backup.ErrWrongPassword), errors.Is(err, backup.ErrNeedPassword):
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
