//go:build cgo

package backup

/*
#include <stddef.h>

// The reference zstd's stable advanced API (zstd.h, since v1.4.0), as
// compiled into this binary by github.com/DataDog/zstd (v1.5.7): that
// binding has no call that sets single parameters, so these few
// prototypes are declared here and resolve to its C objects at link time.
typedef struct ZSTD_CCtx_s ZSTD_CCtx;
ZSTD_CCtx *ZSTD_createCCtx(void);
size_t ZSTD_freeCCtx(ZSTD_CCtx *cctx);
size_t ZSTD_CCtx_setParameter(ZSTD_CCtx *cctx, int param, int value);
size_t ZSTD_compress2(ZSTD_CCtx *cctx, void *dst, size_t dstCapacity, const void *src, size_t srcSize);
unsigned ZSTD_isError(size_t code);

enum {
	umbra_c_compressionLevel = 100,
	umbra_c_windowLog = 101,
	umbra_c_hashLog = 102,
	umbra_c_minMatch = 105,
};

// umbra_zstd_ctx makes a context with the level and, where not 0, the
// window log, hash log and minimum match; NULL if any is refused.
static ZSTD_CCtx *umbra_zstd_ctx(int level, int wlog, int hlog, int mml) {
	ZSTD_CCtx *c = ZSTD_createCCtx();
	if (c == NULL) {
		return NULL;
	}
	if (ZSTD_isError(ZSTD_CCtx_setParameter(c, umbra_c_compressionLevel, level)) ||
	    (wlog && ZSTD_isError(ZSTD_CCtx_setParameter(c, umbra_c_windowLog, wlog))) ||
	    (hlog && ZSTD_isError(ZSTD_CCtx_setParameter(c, umbra_c_hashLog, hlog))) ||
	    (mml && ZSTD_isError(ZSTD_CCtx_setParameter(c, umbra_c_minMatch, mml)))) {
		ZSTD_freeCCtx(c);
		return NULL;
	}
	return c;
}

// umbra_zstd_compress returns the frame's length, or 0 on an error.
static size_t umbra_zstd_compress(ZSTD_CCtx *c, void *dst, size_t cap, const void *src, size_t n) {
	size_t r = ZSTD_compress2(c, dst, cap, src, n);
	return ZSTD_isError(r) ? 0 : r;
}
*/
import "C"

import (
	"runtime"
	"sync"
	"unsafe"

	czstd "github.com/DataDog/zstd"
)

// cEncoder is the reference C zstd through cgo: one compression context
// per concurrent call, from a pool (a context is not safe for concurrent
// use, and setting one up costs more than a small object's compression).
type cEncoder struct {
	ctxs sync.Pool
	// fallback encodes when the C library fails (it can only fail to
	// allocate): made on first use.
	fallback func() *goEncoder
	once     sync.Once
	goEnc    *goEncoder
}

// cCtx owns one C context, freed when the pool drops it and the GC
// collects it.
type cCtx struct{ c *C.ZSTD_CCtx }

// cZstd says whether this binary has the C encoder (for the tests).
const cZstd = true

func newCEncoder(p cParams, fallback func() *goEncoder) encoder {
	e := &cEncoder{fallback: fallback}
	e.ctxs.New = func() any {
		c := C.umbra_zstd_ctx(C.int(p.level), C.int(p.windowLog), C.int(p.hashLog), C.int(p.minMatch))
		if c == nil {
			return (*cCtx)(nil)
		}
		x := &cCtx{c}
		runtime.AddCleanup(x, func(c *C.ZSTD_CCtx) { C.ZSTD_freeCCtx(c) }, c)
		return x
	}
	return e
}

func (e *cEncoder) bound(n int) int { return czstd.CompressBound(n) }

func (e *cEncoder) name() string { return "c" }

func (e *cEncoder) encode(dst, src []byte) []byte {
	n := len(dst)
	if need := n + e.bound(len(src)); cap(dst) < need {
		dst = append(dst[:cap(dst)], make([]byte, need-cap(dst))...)[:n]
	}
	var out C.size_t
	x := e.ctxs.Get().(*cCtx)
	if x != nil {
		room := dst[n:cap(dst)]
		var in unsafe.Pointer
		if len(src) > 0 {
			in = unsafe.Pointer(&src[0])
		}
		// With room for the bound, the frame always fits.
		out = C.umbra_zstd_compress(x.c, unsafe.Pointer(&room[0]), C.size_t(len(room)), in, C.size_t(len(src)))
		runtime.KeepAlive(src)
		runtime.KeepAlive(dst)
		e.ctxs.Put(x)
	}
	if out == 0 {
		e.once.Do(func() { e.goEnc = e.fallback() })
		return e.goEnc.encode(dst[:n], src)
	}
	return dst[:n+int(out)]
}

func (e *cEncoder) close() {
	if e.goEnc != nil {
		e.goEnc.close()
	}
}
