package blake3pair

import (
	"encoding/binary"
	"math/bits"
)

// The BLAKE3 compression function as its specification writes it
// (https://github.com/BLAKE3-team/BLAKE3-specs), one lane at a time:
// the kernels' fallback where the CPU has no AVX2, and what the tests
// hold them to.

// msgPermutation is the specification's MSG_PERMUTATION.
var msgPermutation = [16]int{2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8}

func g(a, b, c, d, mx, my uint32) (uint32, uint32, uint32, uint32) {
	a += b + mx
	d = bits.RotateLeft32(d^a, -16)
	c += d
	b = bits.RotateLeft32(b^c, -12)
	a += b + my
	d = bits.RotateLeft32(d^a, -8)
	c += d
	b = bits.RotateLeft32(b^c, -7)
	return a, b, c, d
}

// compress returns the first eight words of the compression of block m
// chained from cv: a chunk's or parent's chaining value, or with
// flagRoot a 32-byte hash.
func compress(cv *[8]uint32, m [16]uint32, counter uint64, blockLen, flags uint32) [8]uint32 {
	v0, v1, v2, v3, v4, v5, v6, v7 := cv[0], cv[1], cv[2], cv[3], cv[4], cv[5], cv[6], cv[7]
	v8, v9, v10, v11 := iv[0], iv[1], iv[2], iv[3]
	v12, v13, v14, v15 := uint32(counter), uint32(counter>>32), blockLen, flags
	for r := 0; r < 7; r++ {
		v0, v4, v8, v12 = g(v0, v4, v8, v12, m[0], m[1])
		v1, v5, v9, v13 = g(v1, v5, v9, v13, m[2], m[3])
		v2, v6, v10, v14 = g(v2, v6, v10, v14, m[4], m[5])
		v3, v7, v11, v15 = g(v3, v7, v11, v15, m[6], m[7])
		v0, v5, v10, v15 = g(v0, v5, v10, v15, m[8], m[9])
		v1, v6, v11, v12 = g(v1, v6, v11, v12, m[10], m[11])
		v2, v7, v8, v13 = g(v2, v7, v8, v13, m[12], m[13])
		v3, v4, v9, v14 = g(v3, v4, v9, v14, m[14], m[15])
		var p [16]uint32
		for i, j := range msgPermutation {
			p[i] = m[j]
		}
		m = p
	}
	return [8]uint32{v0 ^ v8, v1 ^ v9, v2 ^ v10, v3 ^ v11, v4 ^ v12, v5 ^ v13, v6 ^ v14, v7 ^ v15}
}

func chunks8Generic(lanes *[8]*[ChunkSize]byte, counters *[16]uint32, key *[8]uint32, flags uint32, out *[64]uint32) {
	for j, chunk := range lanes {
		cv := *key
		counter := uint64(counters[j]) | uint64(counters[8+j])<<32
		for blk := 0; blk < ChunkSize/64; blk++ {
			var m [16]uint32
			for i := range m {
				m[i] = binary.LittleEndian.Uint32(chunk[64*blk+4*i:])
			}
			f := flags
			if blk == 0 {
				f |= flagChunkStart
			}
			if blk == ChunkSize/64-1 {
				f |= flagChunkEnd
			}
			cv = compress(&cv, m, counter, 64, f)
		}
		for w := range cv {
			out[w*8+j] = cv[w]
		}
	}
}

func parents8Generic(left, right *[64]uint32, key *[8]uint32, flags uint32, out *[64]uint32) {
	for j := 0; j < 8; j++ {
		var m [16]uint32
		for w := 0; w < 8; w++ {
			m[w], m[8+w] = left[w*8+j], right[w*8+j]
		}
		cv := compress(key, m, 0, 64, flags)
		for w := range cv {
			out[w*8+j] = cv[w]
		}
	}
}
