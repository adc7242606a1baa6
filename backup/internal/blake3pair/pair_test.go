package blake3pair

import (
	"encoding/hex"
	"math/rand/v2"
	"testing"

	"github.com/zeebo/blake3"
)

// paths runs f on the AVX2 kernels (where this build and CPU have them)
// and on the pure-Go compression.
func paths(t *testing.T, f func(t *testing.T)) {
	t.Helper()
	for _, kernels := range []bool{true, false} {
		name := "generic"
		if kernels {
			name = "avx2"
		}
		t.Run(name, func(t *testing.T) {
			if kernels && !haveKernels {
				t.Skip("no AVX2 kernels in this build or CPU")
			}
			useKernels = kernels
			t.Cleanup(func() { useKernels = haveKernels })
			f(t)
		})
	}
}

// TestKnownAnswers: the 4096-byte case of BLAKE3's test vectors
// (test_vectors.json of the BLAKE3 reference implementation: input byte
// i is i % 251; the keyed hash's key is "whats the Elvish word for
// friend"), plain and keyed, on both paths: existing repositories name
// their chunks by these hashes.
func TestKnownAnswers(t *testing.T) {
	paths(t, func(t *testing.T) {
		in := make([]byte, Size)
		for i := range in {
			in[i] = byte(i % 251)
		}
		for _, c := range []struct {
			key  []byte
			want string
		}{
			{nil, "015094013f57a5277b59d8475c0501042c0b642e531b0a1c8f58d2163229e969"},
			{[]byte("whats the Elvish word for friend"), "befc660aea2f1718884cd8deb9902811d332f4fc4a38cf7c7300d597a081bfc0"},
		} {
			h, err := New(c.key)
			if err != nil {
				t.Fatal(err)
			}
			for n := 1; n <= 5; n++ { // the message in every lane of a group
				ins := make([][]byte, n)
				for i := range ins {
					ins[i] = in
				}
				out := make([][32]byte, n)
				h.Sum(out, ins)
				for i := range out {
					if got := hex.EncodeToString(out[i][:]); got != c.want {
						t.Fatalf("keyed %v, message %d of %d: %s, the test vectors say %s", c.key != nil, i, n, got, c.want)
					}
				}
			}
		}
	})
}

// TestSumMatchesBLAKE3: every count of messages from 0 to 11 (whole
// groups of four and the rest), adjacent in memory and scattered, plain
// and keyed, hash as github.com/zeebo/blake3 hashes each alone.
func TestSumMatchesBLAKE3(t *testing.T) {
	paths(t, func(t *testing.T) {
		r := rand.New(rand.NewPCG(1, 2))
		key := make([]byte, 32)
		for i := range key {
			key[i] = byte(r.Uint32())
		}
		for _, keyed := range []bool{false, true} {
			var k []byte
			if keyed {
				k = key
			}
			h, err := New(k)
			if err != nil {
				t.Fatal(err)
			}
			for n := 0; n <= 11; n++ {
				for _, adjacent := range []bool{true, false} {
					all := make([]byte, n*Size)
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
						if w := reference(k, in[i]); out[i] != w {
							t.Fatalf("keyed %v, %d messages, adjacent %v: message %d hashed to %x, BLAKE3 says %x", keyed, n, adjacent, i, out[i], w)
						}
					}
				}
			}
		}
	})
}

func reference(key, m []byte) (out [32]byte) {
	if key == nil {
		return blake3.Sum256(m)
	}
	h, _ := blake3.NewKeyed(key)
	h.Write(m)
	h.Sum(out[:0])
	return out
}

// TestKernelsEveryLane: the AVX2 kernels give every lane what the
// pure-Go compression gives it, each lane with its own chunk, counter
// (high words too) and children, plain and keyed, with and without the
// root flag, and a lane's input changed alone changes that lane alone.
func TestKernelsEveryLane(t *testing.T) {
	if !haveKernels {
		t.Skip("no AVX2 kernels in this build or CPU: the pure-Go path is tested against BLAKE3 above")
	}
	r := rand.New(rand.NewPCG(3, 4))
	var key [8]uint32
	for i := range key {
		key[i] = r.Uint32()
	}
	for round := 0; round < 20; round++ {
		flags := []uint32{0, flagKeyed}[round%2]
		k := &iv
		if flags == flagKeyed {
			k = &key
		}
		var (
			lanes      [8]*[ChunkSize]byte
			cnt        [16]uint32
			got, want  [64]uint32
			left, rght [64]uint32
		)
		for j := range lanes {
			lanes[j] = new([ChunkSize]byte)
			for i := range lanes[j] {
				lanes[j][i] = byte(r.Uint32())
			}
		}
		for i := range cnt {
			cnt[i] = r.Uint32()
			if round < 4 {
				cnt[i] %= 8 // small counters, as Sum gives them
			}
		}
		chunks8(&lanes, &cnt, k, flags, &got)
		chunks8Generic(&lanes, &cnt, k, flags, &want)
		if got != want {
			t.Fatalf("round %d: chunks8 %x, the compression one lane at a time %x", round, got, want)
		}
		// One lane's chunk changed: that lane's value changes, no other.
		j := round % 8
		lanes[j][r.IntN(ChunkSize)] ^= 1 << r.IntN(8)
		before := got
		chunks8(&lanes, &cnt, k, flags, &got)
		chunks8Generic(&lanes, &cnt, k, flags, &want)
		if got != want {
			t.Fatalf("round %d, lane %d changed: chunks8 %x, one lane at a time %x", round, j, got, want)
		}
		for w := 0; w < 8; w++ {
			for l := 0; l < 8; l++ {
				if changed := got[w*8+l] != before[w*8+l]; changed && l != j {
					t.Fatalf("round %d: lane %d changed, lane %d's word %d changed too", round, j, l, w)
				}
			}
		}
		for i := range left {
			left[i], rght[i] = r.Uint32(), r.Uint32()
		}
		for _, f := range []uint32{flagParent, flagParent | flagRoot} {
			parents8(&left, &rght, k, flags|f, &got)
			parents8Generic(&left, &rght, k, flags|f, &want)
			if got != want {
				t.Fatalf("round %d, flags %#x: parents8 %x, one lane at a time %x", round, flags|f, got, want)
			}
		}
	}
}

// FuzzSum: any 4 KiB messages, one to nine of them, plain or keyed,
// hash as github.com/zeebo/blake3 hashes each alone, on both paths.
func FuzzSum(f *testing.F) {
	f.Add([]byte("seed"), uint8(1), false)
	f.Add(make([]byte, 100), uint8(5), true)
	f.Add([]byte{0xff, 0, 0xff}, uint8(9), false)
	key := []byte("a key of thirty-two bytes, fixed")
	f.Fuzz(func(t *testing.T, seed []byte, count uint8, keyed bool) {
		n := 1 + int(count)%9
		in := make([][]byte, n)
		for i := range in {
			in[i] = make([]byte, Size)
			for b := range in[i] {
				if len(seed) > 0 {
					in[i][b] = seed[(b+i)%len(seed)] ^ byte(b>>8)
				}
			}
		}
		var k []byte
		if keyed {
			k = key
		}
		h, err := New(k)
		if err != nil {
			t.Fatal(err)
		}
		for _, kernels := range []bool{true, false} {
			if kernels && !haveKernels {
				continue
			}
			useKernels = kernels
			out := make([][32]byte, n)
			h.Sum(out, in)
			useKernels = haveKernels
			for i := range in {
				if w := reference(k, in[i]); out[i] != w {
					t.Fatalf("kernels %v, keyed %v, message %d of %d: %x, BLAKE3 says %x", kernels, keyed, i, n, out[i], w)
				}
			}
		}
	})
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
	b.Run("kernels", func(b *testing.B) {
		if !haveKernels {
			b.Skip("no AVX2")
		}
		h, _ := New(nil)
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			h.Sum(out, in)
		}
	})
	b.Run("generic", func(b *testing.B) {
		useKernels = false
		defer func() { useKernels = haveKernels }()
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
