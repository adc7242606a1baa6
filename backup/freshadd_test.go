package backup

import (
	"bytes"
	"context"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"umbra/provider"
)

type bytesSource []byte

func (b bytesSource) ReadAt(p []byte, off int64) (int, error) { return copy(p, b[off:]), nil }
func (b bytesSource) Size() int64                             { return int64(len(b)) }

// TestIncrementalAddsItsChunksUnread: an incremental looks each changed
// chunk up in the index once; adding the entries of the chunks it stored
// reads no index page again (it found none of them: a lookup each
// again, a page read each from the local cache, was 10 Ki reads at 1 Mi
// chunks). The index finds them after, each once.
func TestIncrementalAddsItsChunksUnread(t *testing.T) {
	defer set(&directRunMin, 16)()
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "repo")
	r, err := Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	rnd := rand.New(rand.NewPCG(13, 14))
	const chunks = 4096
	src := make(bytesSource, chunks*4096)
	for i := range src {
		src[i] = byte(rnd.Uint32())
	}
	full, _, err := r.Backup(ctx, src, Options{Volume: "v"})
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	r, err = Open(dir) // the index from the local cache, a file
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.chunks.base == nil || len(r.chunks.runs) > 0 {
		t.Fatalf("the reopened index is not its cache alone (%s)", r.cacheNote)
	}
	cr := &countingReaderAt{r: r.chunks.base.r}
	r.chunks.base.r = cr
	next := bytes.Clone(src)
	bm := &provider.Bitmap{Granule: 4096, Size: int64(len(src)), Bits: make([]uint64, chunks/64)}
	changed := map[int]bool{}
	for len(changed) < 200 {
		c := rnd.IntN(chunks)
		changed[c] = true
		bm.Bits[c/64] |= 1 << (c % 64)
		for j := c * 4096; j < c*4096+4096; j++ {
			next[j] = byte(rnd.Uint32())
		}
	}
	x, st, err := r.Backup(ctx, bytesSource(next), Options{Volume: "v", Parent: full, Changed: bm})
	if err != nil || !st.Incremental {
		t.Fatalf("incremental %v: %v", st.Incremental, err)
	}
	if pages := cr.n.Load() / runPage; pages > int64(len(changed))+4 {
		t.Errorf("an incremental of %d new chunks read %d pages of the index, want one a chunk at most", len(changed), pages)
	}
	n := 0
	if err := r.chunks.each(func(Hash, loc) { n++ }); err != nil {
		t.Fatal(err)
	}
	if n != chunks+len(changed) {
		t.Errorf("the index holds %d chunks, want %d", n, chunks+len(changed))
	}
	ir, err := r.OpenImage(ctx, x.ID)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(next))
	if _, err := ir.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, next) {
		t.Fatal("the incremental does not read back as the volume")
	}
}
