package backup

import (
	"github.com/klauspost/compress/zstd"
)

// Compression: every blob and metadata object is one standard zstd frame
// without a content checksum, whichever encoder wrote it, and is read back
// with klauspost/compress's decoder; in cgo builds blobs, the bulk of a
// restore, go to the C library first (cDecode) and to the Go decoder only
// when C does not take them. Two encoders write those frames:
//
//   - the reference C zstd (DataDog/zstd, cgo; compress_cgo.go), used
//     whenever the binary is built with cgo — the default where a C
//     compiler is installed. At the fastest level it compresses this
//     project's benchmark image 1.7x faster than the pure-Go encoder
//     (1.7x at the default level, 1.2x at better), which is what brings
//     a full backup to zstd -1 -T0's throughput (docs/benchmarks.md,
//     measured 2026-11-24);
//   - klauspost/compress, pure Go, in builds without cgo
//     (CGO_ENABLED=0, or no C compiler): the same frames, more CPU.
//
// Nothing in a repository records which encoder wrote it.

// levels are the compression levels a repository may name for new
// blobs, as zstd parameters for the C encoder and klauspost's nearest
// equivalents for the Go one. "fastest" is zstd 1 (the fast strategy)
// with a 4 MiB window (a whole blob), a 32 Ki-entry hash table instead of
// level 1's 16 Ki and matches from 6 bytes. Compression is most of a
// full backup's CPU (59 %), and the table's size is where its time goes:
// on the benchmark image's distinct 4 KiB chunks in 4 MiB blobs, 2^15
// entries take ~9 % less encoder CPU than the 2^16 used until 2026-12-07
// (medians of 5 and 3 rounds, one thread) for 2 % more bytes (476.8
// against 467.4 MiB; 2^14: 486.9 MiB, ~20 % less CPU), and the
// repository stays under restic's (docs/benchmarks.md). A window of 1 or
// 2 MiB saved no CPU. Blobs written with the old table read the same:
// a decoder never sees the table.
var levels = map[string]struct {
	c      cParams
	goSide zstd.EncoderLevel
}{
	"fastest": {cParams{level: 1, windowLog: 22, hashLog: 15, minMatch: 6}, zstd.SpeedFastest},
	"default": {cParams{level: 3}, zstd.SpeedDefault},
	"better":  {cParams{level: 7}, zstd.SpeedBetterCompression},
}

// cParams are the C encoder's parameters: a zstd level and, where not 0,
// the window log, hash log and minimum match that replace the level's.
type cParams struct{ level, windowLog, hashLog, minMatch int }

// defaultLevel is the level Init gives a repository when none is asked
// for: the fastest, near zstd -1's throughput; "default" stores ~10 %
// less (below restic's repository) for ~40 % more time.
const defaultLevel = "fastest"

// encoder compresses: safe for concurrent use.
type encoder interface {
	// encode appends the zstd frame of src to dst.
	encode(dst, src []byte) []byte
	// bound is the most bytes encode appends for n bytes of input.
	bound(n int) int
	// name says which implementation it is: "c" or "go".
	name() string
	close()
}

// goEncoder is klauspost/compress's encoder.
type goEncoder struct{ e *zstd.Encoder }

func newGoEncoder(level zstd.EncoderLevel, concurrency int) *goEncoder {
	e, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(concurrency), zstd.WithLowerEncoderMem(true), zstd.WithEncoderCRC(false))
	return &goEncoder{e}
}

func (g *goEncoder) encode(dst, src []byte) []byte { return g.e.EncodeAll(src, dst) }

// bound: a frame header, and per 128 KiB block a 3-byte header when the
// block is stored raw.
func (g *goEncoder) bound(n int) int { return n + n>>10 + 64 }

func (g *goEncoder) close() { g.e.Close() }

func (g *goEncoder) name() string { return "go" }

// forceGoDecoder makes cDecode decline every frame, so that blobs go to
// the Go decoder in cgo builds too (tests exercise both).
var forceGoDecoder bool

// forceGoEncoder makes newEncoder return the Go encoder in cgo builds too
// (tests exercise both).
var forceGoEncoder bool

// newEncoder returns the encoder for a repository's level: C zstd when
// the binary has it, else the Go one.
func newEncoder(level string, concurrency int) encoder {
	l := levels[level]
	if !forceGoEncoder {
		if e := newCEncoder(l.c, func() *goEncoder { return newGoEncoder(l.goSide, concurrency) }); e != nil {
			return e
		}
	}
	return newGoEncoder(l.goSide, concurrency)
}

func knownLevel(name string) bool {
	_, ok := levels[name]
	return ok
}
