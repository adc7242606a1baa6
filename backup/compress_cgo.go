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

typedef struct ZSTD_DCtx_s ZSTD_DCtx;
ZSTD_DCtx *ZSTD_createDCtx(void);
size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx);
size_t ZSTD_decompressDCtx(ZSTD_DCtx *dctx, void *dst, size_t cap, const void *src, size_t n);
unsigned long long ZSTD_getFrameContentSize(const void *src, size_t n);
size_t ZSTD_findFrameCompressedSize(const void *src, size_t n);

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

// umbra_zstd_size is the decoded size src records when it is exactly one
// frame whose header says its size, else -1.
static long long umbra_zstd_size(const void *src, size_t n) {
	unsigned long long s = ZSTD_getFrameContentSize(src, n);
	if (s >= (0ULL - 2) || s > (1ULL << 62)) {
		return -1; // unknown, or not a frame
	}
	size_t c = ZSTD_findFrameCompressedSize(src, n);
	if (ZSTD_isError(c) || c != n) {
		return -1; // damaged, or more than one frame
	}
	return (long long)s;
}

// umbra_zstd_decompress returns the decoded length, or -1 on an error.
static long long umbra_zstd_decompress(ZSTD_DCtx *d, void *dst, size_t cap, const void *src, size_t n) {
	size_t r = ZSTD_decompressDCtx(d, dst, cap, src, n);
	return ZSTD_isError(r) ? -1 : (long long)r;
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

// dctxs pools the C decompression contexts cDecode uses (one per
// concurrent call; each is freed when the pool drops it).
var dctxs = sync.Pool{New: func() any {
	c := C.ZSTD_createDCtx()
	if c == nil {
		return (*dCtx)(nil)
	}
	x := &dCtx{c}
	runtime.AddCleanup(x, func(c *C.ZSTD_DCtx) { C.ZSTD_freeDCtx(c) }, c)
	return x
}}

type dCtx struct{ c *C.ZSTD_DCtx }

// cDecode decodes z, one zstd frame that records its decoded size of at
// most max bytes, into dst's room with the reference C library: on the
// benchmark image's blobs ~20 % faster than the Go decoder
// (docs/benchmarks.md, measured 2026-12-03). ok is false for anything else —
// no size in the header, several frames, over max, or a frame the library
// refuses — and the caller then asks the Go decoder, whose verdict and
// error stand: this is a fast path, never the judge of a damaged blob.
func cDecode(dst, z []byte, max int) (out []byte, ok bool) {
	if forceGoDecoder || len(z) == 0 {
		return nil, false
	}
	n := int64(C.umbra_zstd_size(unsafe.Pointer(&z[0]), C.size_t(len(z))))
	if n <= 0 || n > int64(max) {
		return nil, false
	}
	if int64(cap(dst)) < n {
		dst = make([]byte, n)
	}
	dst = dst[:n]
	x := dctxs.Get().(*dCtx)
	if x == nil {
		return nil, false
	}
	got := int64(C.umbra_zstd_decompress(x.c, unsafe.Pointer(&dst[0]), C.size_t(n), unsafe.Pointer(&z[0]), C.size_t(len(z))))
	runtime.KeepAlive(dst)
	runtime.KeepAlive(z)
	dctxs.Put(x)
	if got != n {
		return nil, false
	}
	return dst, true
}
