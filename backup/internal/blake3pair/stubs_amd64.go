//go:build amd64 && !purego

package blake3pair

import "golang.org/x/sys/cpu"

const haveAsm = true

var hasAVX2 = cpu.X86.HasAVX2

//go:noescape
func hashF8(input *[8192]byte, length, counter uint64, flags uint32, key *[8]uint32, out *[64]uint32, chain *[8]uint32)

//go:noescape
func hashP8(left, right *[64]uint32, flags uint32, key *[8]uint32, out *[64]uint32, n int)
