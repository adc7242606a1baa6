//go:build amd64 && !purego

package blake3pair

import "golang.org/x/sys/cpu"

//go:generate go run gen_kernels.go -out kernels_amd64.s

var haveKernels = cpu.X86.HasAVX2

// chunks8 compresses eight whole 1 KiB chunks side by side, lane j
// being lanes[j] counted counters[j] | counters[8+j]<<32, and sets
// out[w*8+j] to word w of lane j's chaining value. It needs AVX2.
//
//go:noescape
func chunks8(lanes *[8]*[ChunkSize]byte, counters *[16]uint32, key *[8]uint32, flags uint32, out *[64]uint32)

// parents8 compresses eight parent nodes side by side: lane j's left
// child is left[w*8+j] for w in 0..7, its right child right[w*8+j];
// out is laid out alike. It needs AVX2.
//
//go:noescape
func parents8(left, right *[64]uint32, key *[8]uint32, flags uint32, out *[64]uint32)
