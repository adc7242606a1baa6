package zero

import "testing"

func TestAll(t *testing.T) {
	if !All(nil) || !All([]byte{}) {
		t.Fatal("an empty buffer holds no non-zero byte")
	}
	for _, n := range []int{1, 7, 8, 9, 15, 16, 17, 4096, 4099} {
		b := make([]byte, n)
		if !All(b) {
			t.Fatalf("%d zero bytes: All says not all zero", n)
		}
		// A single set bit anywhere, in the 8-byte body or the tail.
		for i := range n {
			b[i] = 0x80
			if All(b) {
				t.Fatalf("%d bytes with byte %d set: All says all zero", n, i)
			}
			b[i] = 0
		}
	}
}

func FuzzAll(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		want := true
		for _, x := range b {
			if x != 0 {
				want = false
			}
		}
		if All(b) != want {
			t.Fatalf("All(%x) = %v, want %v", b, !want, want)
		}
	})
}
