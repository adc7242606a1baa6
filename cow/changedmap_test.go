package cow

import (
	"context"
	"runtime"
	"testing"

	"umbra/provider"
)

// TestChangedMapFollowsChanges: the map of a large volume's changes
// costs memory by what changed, not by the volume: a bit a chunk was 8
// MiB for 256 GiB (32 MiB a TiB) for three changed chunks. It marks
// exactly the chunks written.
func TestChangedMapFollowsChanges(t *testing.T) {
	ctx := context.Background()
	const size = 256 << 30
	v, _ := newTestVolume(t, size, Options{})
	if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "s1"}); err != nil {
		t.Fatal(err)
	}
	wrote := []int64{0, 12345, size/4096 - 1}
	for _, c := range wrote {
		mustWrite(t, v, []byte("changed"), c*4096)
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	before := ms.TotalAlloc
	bm, reliable, err := v.Changed("s1", "")
	runtime.ReadMemStats(&ms)
	if err != nil || !reliable {
		t.Fatalf("changed: reliable %v, %v", reliable, err)
	}
	if got := ms.TotalAlloc - before; got > 64<<10 {
		t.Fatalf("the map of 3 changed chunks of a %d GiB volume took %d bytes, want at most 64 KiB", size>>30, got)
	}
	var marked []int64
	bm.Each(0, size/4096, func(i int64) bool { marked = append(marked, i); return true })
	if len(marked) != len(wrote) || marked[0] != wrote[0] || marked[1] != wrote[1] || marked[2] != wrote[2] {
		t.Fatalf("marked %v, wrote %v", marked, wrote)
	}
	if !bm.Set(12345) || bm.Set(12346) || bm.Set(size/4096) {
		t.Fatal("Set disagrees with Each")
	}
}
