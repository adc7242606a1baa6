//go:build !amd64 || purego

package blake3pair

const haveAsm = false

var hasAVX2 = false

func hashF8(input *[8192]byte, length, counter uint64, flags uint32, key *[8]uint32, out *[64]uint32, chain *[8]uint32) {
	panic("blake3pair: no AVX2 kernels in this build")
}

func hashP8(left, right *[64]uint32, flags uint32, key *[8]uint32, out *[64]uint32, n int) {
	panic("blake3pair: no AVX2 kernels in this build")
}
