package testutil

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// PGBin finds a PostgreSQL server binary (Debian keeps them off PATH);
// "" when there is none.
func PGBin(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	m, _ := filepath.Glob("/usr/lib/postgresql/*/bin/" + name)
	if len(m) > 0 {
		return m[len(m)-1]
	}
	return ""
}

// AsPostgres runs a command as the postgres user and returns its output;
// it fails the test with that output on error.
func AsPostgres(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("runuser", append([]string{"-u", "postgres", "--"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}
