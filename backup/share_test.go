package backup_test

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"umbra/backup"
)

// TestRestoreSharesBlobInFlight: two restore workers that need the same
// blob at the same moment decode it once; the second waits for the
// first's decode and takes its chunks (each checked against its hash)
// from it. The overlap is forced: the volume's second batch repeats its
// first, and the first worker's decode of its first blob is held until
// the other worker arrives at that blob (to decode it or to wait).
func TestRestoreSharesBlobInFlight(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2)) // two workers
	repo, _ := newRepo(t)
	r := rand.New(rand.NewPCG(28, 29))
	half := 4 << 20 // a batch
	src := make(memSource, 2*half)
	for i := range half {
		src[i] = byte(r.Uint32())
	}
	copy(src[half:], src[:half])
	x := backupAndRestore(t, repo, src, backup.Options{Volume: "v"})

	type key struct{ pack, off uint32 }
	var (
		mu      sync.Mutex // guards the fields below
		first   *key
		decodes = map[key]int{}
		stuck   bool
	)
	second := make(chan struct{})
	var once sync.Once
	arrive := func(k key, decode bool) {
		mu.Lock()
		if decode {
			decodes[k]++
		}
		if first == nil {
			first = &k
			mu.Unlock()
			select {
			case <-second:
			case <-time.After(time.Minute): // a failure only: no second worker came
				mu.Lock()
				stuck = true
				mu.Unlock()
			}
			return
		}
		if k == *first && (decodes[k] == 2 || !decode) {
			once.Do(func() { close(second) })
		}
		mu.Unlock()
	}
	defer backup.SetBlobHooks(func(p, o uint32) { arrive(key{p, o}, true) },
		func(p, o uint32) { arrive(key{p, o}, false) })()

	out := filepath.Join(t.TempDir(), "out.img")
	if err := repo.Restore(x.ID, out, nil); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); !bytes.Equal(b, src) {
		t.Fatal("the restore differs from the volume")
	}
	mu.Lock()
	defer mu.Unlock()
	if stuck {
		t.Fatal("the second worker never reached the first worker's blob")
	}
	if n := decodes[*first]; n != 1 {
		t.Fatalf("a blob two workers needed at once was decoded %d times, want once", n)
	}
}
