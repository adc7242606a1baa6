package backup

import "context"

// BlobLocation says where chunk h's blob is (for tests that damage it).
func BlobLocation(r *Repo, h Hash) (pack string, off, n int64) {
	l, pid, ok := r.lookup(h)
	if !ok {
		return "", 0, 0
	}
	return pid.name(), int64(l.off), int64(l.len)
}

// PackChunks lists the chunks pack (an object name) holds per the index.
func PackChunks(r *Repo, pack string) []Hash {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Hash
	for h, l := range r.chunks {
		if r.packs[l.pack].name() == pack {
			out = append(out, h)
		}
	}
	return out
}

// ObjectNames lists a repository's objects under prefix.
func ObjectNames(r *Repo, prefix string) []string {
	n, _ := r.be.List(context.Background(), prefix)
	return n
}

// SetScryptN makes key derivation cheap in tests.
func SetScryptN(n int) { scryptN = n }
