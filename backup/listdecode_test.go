package backup

import (
	"runtime"
	"testing"
)

// TestDecodeSegmentAllocatesOnce: decoding a chunk-list segment of
// mostly zero chunks (a volume's free space) allocates its list once, at
// its size: growing it run by run allocated about three times that
// (the doublings, and a slice of zeros for each run).
func TestDecodeSegmentAllocatesOnce(t *testing.T) {
	const n = 1 << 16
	seg := &Image{Size: 2 * n * 4096, ChunkSize: 4096, First: n, Chunks: make([]Hash, n), format: 3}
	for i := 0; i < n; i += 97 { // runs of 96 zero chunks, one of data
		seg.Chunks[i][0], seg.Chunks[i][31] = 1, byte(i)
	}
	plain := seg.EncodeChunkList()
	list := int64(n * len(Hash{}))
	var ms runtime.MemStats
	for range 2 { // the first warms whatever decoding allocates once
		runtime.ReadMemStats(&ms)
		before := ms.TotalAlloc
		x, err := DecodeChunkList(plain)
		runtime.ReadMemStats(&ms)
		if err != nil || len(x.Chunks) != n || x.Chunks[97][0] != 1 || x.Chunks[98] != (Hash{}) {
			t.Fatalf("decode: %v", err)
		}
		if got := int64(ms.TotalAlloc - before); got > list+list/8 {
			t.Fatalf("decoding a %d-chunk segment (%d bytes of list, %d stored) allocated %d bytes, want at most %d", n, list, len(plain), got, list+list/8)
		}
	}
}
