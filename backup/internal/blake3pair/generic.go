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

func g(v *[16]uint32, a, b, c, d int, mx, my uint32) {
	v[a] += v[b] + mx
	v[d] = bits.RotateLeft32(v[d]^v[a], -16)
	v[c] += v[d]
	v[b] = bits.RotateLeft32(v[b]^v[c], -12)
	v[a] += v[b] + my
	v[d] = bits.RotateLeft32(v[d]^v[a], -8)
	v[c] += v[d]
	v[b] = bits.RotateLeft32(v[b]^v[c], -7)
}

// compress returns the first eight words of the compression of block m
// chained from cv: a chunk's or parent's chaining value, or with
// flagRoot a 32-byte hash.
func compress(cv *[8]uint32, m [16]uint32, counter uint64, blockLen, flags uint32) (out [8]uint32) {
	v := [16]uint32{
		cv[0], cv[1], cv[2], cv[3], cv[4], cv[5], cv[6], cv[7],
		iv[0], iv[1], iv[2], iv[3],
		uint32(counter), uint32(counter >> 32), blockLen, flags,
	}
	for r := 0; r < 7; r++ {
		g(&v, 0, 4, 8, 12, m[0], m[1])
		g(&v, 1, 5, 9, 13, m[2], m[3])
		g(&v, 2, 6, 10, 14, m[4], m[5])
		g(&v, 3, 7, 11, 15, m[6], m[7])
		g(&v, 0, 5, 10, 15, m[8], m[9])
		g(&v, 1, 6, 11, 12, m[10], m[11])
		g(&v, 2, 7, 8, 13, m[12], m[13])
		g(&v, 3, 4, 9, 14, m[14], m[15])
		var p [16]uint32
		for i, j := range msgPermutation {
			p[i] = m[j]
		}
		m = p
	}
	for i := range out {
		out[i] = v[i] ^ v[i+8]
	}
	return out
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
