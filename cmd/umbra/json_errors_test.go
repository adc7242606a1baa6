package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// TestEveryCommandJSONErrors runs every command of the CLI with --json and
// bad input — an unknown flag; for a group of commands an unknown
// command and no command at all; for the others arguments they cannot
// take — and checks that each fails with one JSON error object and
// prints nothing else, a bad use with exit code 2. No service runs: what
// passes the checks meets an API socket that is not there. The commands
// run in this process (as main runs them, through execute), with their
// standard output sent to a file.
func TestEveryCommandJSONErrors(t *testing.T) {
	dir := t.TempDir()
	for _, env := range []string{"HOME", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "XDG_CONFIG_HOME"} {
		t.Setenv(env, dir)
	}
	t.Setenv("UMBRA_TOKEN", "")
	out, err := os.Create(filepath.Join(dir, "stdout"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	stdout := os.Stdout
	os.Stdout = out
	defer func() { os.Stdout = stdout }()
	// The commands run in this process set the global flags (--json,
	// --api-socket); tests after this one must see them as they were.
	saved := gflags
	defer func() { gflags = saved }()

	var cmds [][]string
	groups, hidden := map[string]bool{}, map[string]bool{}
	var walk func(c *cobra.Command, path []string)
	walk = func(c *cobra.Command, path []string) {
		cmds = append(cmds, path)
		if c.HasSubCommands() {
			groups[strings.Join(path, " ")] = true
		}
		if c.Hidden {
			hidden[strings.Join(path, " ")] = true
		}
		for _, sub := range c.Commands() {
			walk(sub, append(append([]string(nil), path...), sub.Name()))
		}
	}
	walk(newRootCmd(), nil)
	if len(cmds) < 40 || len(groups) < 10 {
		t.Fatalf("found %d commands, %d groups: the walk is wrong", len(cmds), len(groups))
	}
	run := func(want int, args ...string) {
		t.Helper()
		args = append(args, "--json", "--api-socket", filepath.Join(dir, "no.sock"))
		var stderr strings.Builder
		code := execute(args, &stderr)
		printed, _ := os.ReadFile(out.Name())
		out.Truncate(0)
		out.Seek(0, 0)
		var e struct {
			Error string `json:"error"`
			Code  int    `json:"code"`
		}
		if jerr := json.Unmarshal([]byte(stderr.String()), &e); jerr != nil || e.Error == "" || e.Code != code || code == 0 ||
			len(printed) != 0 || (want != 0 && code != want) {
			t.Errorf("umbra %s: exit %d (want %v), stdout %q, stderr %q: want one JSON error object on stderr (%v)",
				strings.Join(args, " "), code, want, printed, stderr.String(), jerr)
		}
	}
	for _, path := range cmds {
		run(2, append(path, "--no-such-flag")...)
		switch name := strings.Join(path, " "); {
		case groups[name]:
			run(2, append(path, "no-such-command")...)
			run(2, path...)
		case hidden[name]:
			// Started by the service itself (thaw-guard: by the
			// fsfreeze writer, with the mounts it froze).
		case name == "serve" || name == "demo" || name == "events":
			// They take no arguments; without them they would run.
			run(2, append(path, "extra")...)
		default:
			// Too many arguments for most; the others are refused by
			// their checks or on the way to the service.
			run(0, append(path, "bad/..//arg", "x", "y", "z", "w", "v")...)
		}
	}
}
