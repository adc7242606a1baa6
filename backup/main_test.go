package backup_test

import (
	"os"
	"testing"
)

// TestMain gives the index caches of S3 repositories (local ones keep
// theirs inside) a directory the tests remove.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "umbra-index-cache-")
	if err != nil {
		panic(err)
	}
	os.Setenv("UMBRA_CACHE_DIR", dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
