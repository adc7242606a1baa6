// Package blake3pair computes BLAKE3 hashes of many 4 KiB messages
// (a backup's chunks) at once: two messages in one pass of the AVX2
// kernel, whose eight lanes take their eight 1 KiB chunks side by side,
// then their parent nodes eight at a time. Hashing one 4 KiB message
// alone fills only four of the kernel's eight lanes (it costs what 8 KiB
// would) and finishes its tree with three compressions one at a time.
// The hashes are BLAKE3's, plain or keyed, 32 bytes; the tests compare
// them with github.com/zeebo/blake3.
package blake3pair

import (
	"encoding/binary"
	"errors"
)

// Size is the length of every message Sum takes.
const Size = 4096

// Available reports whether this build and CPU have the kernels (amd64
// with AVX2); without them callers hash one message at a time.
func Available() bool { return haveAsm && hasAVX2 }

const (
	flagParent = 1 << 2
	flagRoot   = 1 << 3
	flagKeyed  = 1 << 4
)

var iv = [8]uint32{0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19}

// Hasher hashes with one key; it is not safe for concurrent use (it
// keeps a scratch buffer).
type Hasher struct {
	key   [8]uint32
	flags uint32
	pair  [2 * Size]byte // two messages that are not adjacent in memory
}

// New returns a Hasher for plain BLAKE3 (key nil) or keyed BLAKE3 (a
// 32-byte key).
func New(key []byte) (*Hasher, error) {
	h := &Hasher{key: iv}
	if key != nil {
		if len(key) != 32 {
			return nil, errors.New("blake3pair: a key has 32 bytes")
		}
		for i := range h.key {
			h.key[i] = binary.LittleEndian.Uint32(key[4*i:])
		}
		h.flags = flagKeyed
	}
	return h, nil
}

// Sum sets out[i] to the hash of in[i] for every i; each in[i] holds
// exactly Size bytes, and out is at least as long as in. It panics
// without the kernels (Available).
func (h *Hasher) Sum(out [][32]byte, in [][]byte) {
	if len(out) < len(in) {
		panic("blake3pair: out is shorter than in")
	}
	for _, m := range in {
		if len(m) != Size {
			panic("blake3pair: a message is not 4 KiB")
		}
	}
	var (
		cv          [2][64]uint32 // chunk chaining values, two messages each, transposed
		left, right [64]uint32
		par, root   [64]uint32
		chain       [8]uint32
	)
	for g := 0; g < len(in); g += 4 {
		n := min(4, len(in)-g)
		for p := 0; 2*p < n; p++ {
			var b []byte
			if 2*p+1 < n {
				b = in[g+2*p+1]
			}
			hashF8(h.input(in[g+2*p], b), 2*Size, 0, h.flags, &h.key, &cv[p], &chain)
		}
		// Parent j joins chunks 2(j%2) and 2(j%2)+1 of message j/2: the
		// lanes (j%4)*2 and the next of its pair's pass.
		for j := 0; j < 8; j++ {
			src, lane := &cv[j/4], (j%4)*2
			for w := 0; w < 8; w++ {
				left[w*8+j] = src[w*8+lane]
				right[w*8+j] = src[w*8+lane+1]
			}
		}
		hashP8(&left, &right, h.flags|flagParent, &h.key, &par, 8)
		// Message k's root joins its parents 2k and 2k+1; its hash is
		// the root's chaining value.
		for k := 0; k < 4; k++ {
			for w := 0; w < 8; w++ {
				left[w*8+k] = par[w*8+2*k]
				right[w*8+k] = par[w*8+2*k+1]
			}
		}
		hashP8(&left, &right, h.flags|flagParent|flagRoot, &h.key, &root, 4)
		for k := 0; k < n; k++ {
			for w := 0; w < 8; w++ {
				binary.LittleEndian.PutUint32(out[g+k][4*w:], root[w*8+k])
			}
		}
	}
}

// input is a and b back to back: where they lie so in memory (a run of
// chunks read together) as they are, else copied; b nil leaves the
// second half as it is (its lanes' results are not used).
func (h *Hasher) input(a, b []byte) *[2 * Size]byte {
	if cap(a) >= 2*Size {
		w := a[:2*Size]
		if b == nil || &w[Size] == &b[0] {
			return (*[2 * Size]byte)(w)
		}
	}
	copy(h.pair[:Size], a)
	if b != nil {
		copy(h.pair[Size:], b)
	}
	return &h.pair
}
