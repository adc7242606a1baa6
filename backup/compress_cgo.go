//go:build cgo

package backup

import (
	"sync"

	czstd "github.com/DataDog/zstd"
)

// cEncoder is the reference C zstd through cgo: one compression context
// per concurrent call, from a pool (a context is not safe for concurrent
// use, and setting one up costs more than a small object's compression).
type cEncoder struct {
	level int
	ctxs  sync.Pool
	// fallback encodes when the C library fails (it can only fail to
	// allocate): made on first use.
	fallback func() *goEncoder
	once     sync.Once
	goEnc    *goEncoder
}

// cZstd says whether this binary has the C encoder (for the tests).
const cZstd = true

func newCEncoder(level int, fallback func() *goEncoder) encoder {
	e := &cEncoder{level: level, fallback: fallback}
	e.ctxs.New = func() any { return czstd.NewCtx() }
	return e
}

func (e *cEncoder) bound(n int) int { return czstd.CompressBound(n) }

func (e *cEncoder) name() string { return "c" }

func (e *cEncoder) encode(dst, src []byte) []byte {
	n := len(dst)
	if need := n + e.bound(len(src)); cap(dst) < need {
		dst = append(dst[:cap(dst)], make([]byte, need-cap(dst))...)[:n]
	}
	ctx := e.ctxs.Get().(czstd.Ctx)
	// With room for the bound, the frame is written in place.
	out, err := ctx.CompressLevel(dst[n:cap(dst)], src, e.level)
	e.ctxs.Put(ctx)
	if err != nil || len(out) > 0 && &out[0] != &dst[n : n+1][0] {
		e.once.Do(func() { e.goEnc = e.fallback() })
		return e.goEnc.encode(dst[:n], src)
	}
	return dst[:n+len(out)]
}

func (e *cEncoder) close() {
	if e.goEnc != nil {
		e.goEnc.close()
	}
}
