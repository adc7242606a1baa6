package blake3pair

import (
	"math/rand/v2"
	"testing"

	"github.com/zeebo/blake3"
)

// TestSumMatchesBLAKE3: every count of messages from 0 to 11 (whole
// groups of four, pairs, a lone one), adjacent in memory and scattered,
// plain and keyed, hash as github.com/zeebo/blake3 hashes each alone.
func TestSumMatchesBLAKE3(t *testing.T) {
	if !Available() {
		t.Skip("no AVX2 kernels in this build or CPU: callers hash one message at a time")
	}
	r := rand.New(rand.NewPCG(1, 2))
	key := make([]byte, 32)
	for i := range key {
		key[i] = byte(r.Uint32())
	}
	for _, keyed := range []bool{false, true} {
		var k []byte
		want := func(m []byte) [32]byte { return blake3.Sum256(m) }
		if keyed {
			k = key
			want = func(m []byte) (out [32]byte) {
				h, _ := blake3.NewKeyed(key)
				h.Write(m)
				h.Sum(out[:0])
				return out
			}
		}
		h, err := New(k)
		if err != nil {
			t.Fatal(err)
		}
		for n := 0; n <= 11; n++ {
			for _, adjacent := range []bool{true, false} {
				all := make([]byte, (n+1)*Size)
				for i := range all {
					all[i] = byte(r.Uint32())
				}
				in := make([][]byte, n)
				for i := range in {
					if adjacent {
						in[i] = all[i*Size : (i+1)*Size]
					} else {
						in[i] = append([]byte(nil), all[i*Size:(i+1)*Size]...) // its own memory
					}
				}
				out := make([][32]byte, n)
				h.Sum(out, in)
				for i := range in {
					if w := want(in[i]); out[i] != w {
						t.Fatalf("keyed %v, %d messages, adjacent %v: message %d hashed to %x, BLAKE3 says %x", keyed, n, adjacent, i, out[i], w)
					}
				}
			}
		}
	}
}

func TestNewRefusesShortKey(t *testing.T) {
	if _, err := New(make([]byte, 16)); err == nil {
		t.Fatal("a 16-byte key was taken")
	}
}

// BenchmarkSum: 4 KiB messages in groups as a batch gives them, beside
// github.com/zeebo/blake3 one at a time.
func BenchmarkSum(b *testing.B) {
	data := make([]byte, 256*Size)
	for i := range data {
		data[i] = byte(i * 7)
	}
	in := make([][]byte, 256)
	for i := range in {
		in[i] = data[i*Size : (i+1)*Size]
	}
	out := make([][32]byte, len(in))
	b.Run("pairs", func(b *testing.B) {
		if !Available() {
			b.Skip("no AVX2")
		}
		h, _ := New(nil)
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			h.Sum(out, in)
		}
	})
	b.Run("one-at-a-time", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			for i, m := range in {
				out[i] = blake3.Sum256(m)
			}
		}
	})
}
