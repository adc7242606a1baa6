//go:build !amd64 || purego

package blake3pair

const haveKernels = false

func chunks8(lanes *[8]*[ChunkSize]byte, counters *[16]uint32, key *[8]uint32, flags uint32, out *[64]uint32) {
	chunks8Generic(lanes, counters, key, flags, out)
}

func parents8(left, right *[64]uint32, key *[8]uint32, flags uint32, out *[64]uint32) {
	parents8Generic(left, right, key, flags, out)
}
