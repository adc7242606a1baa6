package backup

import (
	"fmt"

	"umbra/backup/internal/blake3pair"
)

// manyHasher hashes many chunks at once: where the repository's hash is
// BLAKE3 and the CPU has the kernels (blake3pair), 4 KiB chunks go four
// at a time through its AVX2 kernels, two chunks' pieces to a pass of
// eight lanes (one 4 KiB chunk alone fills half of them); other chunks,
// hashes and CPUs one at a time. Not safe for concurrent use: a
// goroutine has its own.
type manyHasher struct {
	one   func([]byte) Hash
	pair  *blake3pair.Hasher // nil: one at a time
	short bool               // 16-byte hashes: the last 16 bytes cleared
	in    [][]byte
	at    []int
	out   [][32]byte
}

func (r *Repo) manyHasher() *manyHasher {
	m := &manyHasher{one: r.hasher(), short: r.hashLen() == 16}
	if r.cfg.Hash == "blake3" && blake3pair.Available() {
		var key []byte
		if r.hashKey != nil {
			key = r.hashKey[:32]
		}
		if p, err := blake3pair.New(key); err == nil {
			m.pair = p
		}
	}
	return m
}

// sum sets hs[i] to the hash of data[i] for every i.
func (m *manyHasher) sum(hs []Hash, data [][]byte) {
	if m.pair == nil {
		for i, d := range data {
			hs[i] = m.one(d)
		}
		return
	}
	m.in, m.at = m.in[:0], m.at[:0]
	for i, d := range data {
		if len(d) == blake3pair.Size {
			m.in = append(m.in, d)
			m.at = append(m.at, i)
		} else {
			hs[i] = m.one(d)
		}
	}
	if len(m.in) == 0 {
		return
	}
	if cap(m.out) < len(m.in) {
		m.out = make([][32]byte, len(m.in))
	}
	out := m.out[:len(m.in)]
	m.pair.Sum(out, m.in)
	for k, i := range m.at {
		hs[i] = Hash(out[k])
		if m.short {
			clear(hs[i][16:])
		}
	}
	clear(m.in) // hold no chunk memory between calls
}

// chunksIn takes chunks refs out of an opened blob, checking every one
// against its hash: data[i] is refs[i]'s bytes, a slice of group.
func (m *manyHasher) chunksIn(refs []chunkRef, group []byte) ([][]byte, error) {
	data := make([][]byte, len(refs))
	for i, ref := range refs {
		if uint64(ref.l.rawOff)+uint64(ref.l.raw) > uint64(len(group)) {
			return nil, fmt.Errorf("chunk %s: %w: lies outside its blob", ref.h, ErrCorrupt)
		}
		data[i] = group[ref.l.rawOff : ref.l.rawOff+ref.l.raw]
	}
	got := make([]Hash, len(refs))
	m.sum(got, data)
	for i, ref := range refs {
		if got[i] != ref.h {
			return nil, fmt.Errorf("chunk %s: %w: content does not match its hash", ref.h, ErrCorrupt)
		}
	}
	return data, nil
}
