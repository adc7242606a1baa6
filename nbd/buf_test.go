package nbd

import "testing"

// TestGetBufSizes: a buffer comes from the smallest class that holds it,
// so a 4 KiB request does not take (and, from a cold pool, allocate and
// zero) a 1 MiB buffer; larger ones are made to measure and not pooled.
func TestGetBufSizes(t *testing.T) {
	for _, tc := range []struct{ n, wantCap int }{
		{0, 4<<10 + bufSlack},
		{4 << 10, 4<<10 + bufSlack},
		{4<<10 + bufSlack, 4<<10 + bufSlack},
		{4<<10 + bufSlack + 1, 64<<10 + bufSlack},
		{64 << 10, 64<<10 + bufSlack},
		{1 << 20, 1<<20 + bufSlack},
		{1<<20 + bufSlack + 1, 1<<20 + bufSlack + 1},
		{32 << 20, 32 << 20},
	} {
		bp := getBuf(tc.n)
		if len(*bp) != tc.n || cap(*bp) != tc.wantCap {
			t.Errorf("getBuf(%d): len %d cap %d, want len %d cap %d", tc.n, len(*bp), cap(*bp), tc.n, tc.wantCap)
		}
		putBuf(bp)
	}
	// A pooled buffer handed back comes out again at the asked length.
	bp := getBuf(100)
	putBuf(bp)
	if bp = getBuf(200); len(*bp) != 200 || cap(*bp) != 4<<10+bufSlack {
		t.Errorf("getBuf(200) after a put: len %d cap %d", len(*bp), cap(*bp))
	}
}
