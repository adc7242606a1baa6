package testutil

import (
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
)

// Seeds is how randomized tests choose their seeds: n seeds from a random
// base, or the one UMBRA_SEED names (to replay a failure the test
// reported with it).
func Seeds(t testing.TB, n int) (base uint64, count int) {
	t.Helper()
	if s := os.Getenv("UMBRA_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("UMBRA_SEED=%q: %v", s, err)
		}
		return v, 1
	}
	return uint64(rand.Int64()), n
}
