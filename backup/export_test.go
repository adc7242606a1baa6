package backup

import (
	"context"
	"os"
	"strconv"

	"github.com/klauspost/compress/zstd"
)

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

// BlobChunks lists the chunks compressed into the same blob as h.
func BlobChunks(r *Repo, h Hash) []Hash {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.chunks[h]
	var out []Hash
	for c, m := range r.chunks {
		if m.pack == l.pack && m.off == l.off {
			out = append(out, c)
		}
	}
	return out
}

func init() {
	if v := os.Getenv("UMBRA_GROUP_KIB"); v != "" {
		n, _ := strconv.Atoi(v)
		groupRaw = n << 10
	}
	if v := os.Getenv("UMBRA_ZSTD_LEVEL"); v != "" {
		n, _ := strconv.Atoi(v)
		encoderLevel = zstd.EncoderLevel(n)
	}
}
