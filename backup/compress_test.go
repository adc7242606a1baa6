package backup

import (
	"bytes"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
)

// encoders returns every encoder this build has, at every level.
func encoders(t testing.TB) map[string]encoder {
	t.Helper()
	es := map[string]encoder{}
	for name, l := range levels {
		es["go-"+name] = newGoEncoder(l.goSide, 2)
		// The C library fails only to allocate, or on a parameter it
		// refuses: either would hide behind the fallback.
		fallback := func() *goEncoder {
			t.Errorf("the C encoder at level %s fell back to Go", name)
			return newGoEncoder(l.goSide, 2)
		}
		if e := newCEncoder(l.c, fallback); e != nil {
			es["c-"+name] = e
		} else if cZstd {
			t.Fatal("a cgo build has no C encoder")
		}
	}
	t.Cleanup(func() {
		for _, e := range es {
			e.close()
		}
	})
	return es
}

// TestEncoders: each encoder appends one standard zstd frame (what the
// decoder every reader uses takes) after what dst held, within its bound,
// for empty, small, compressible and incompressible input, whatever room
// dst has; and compressible input shrinks.
func TestEncoders(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	noise := make([]byte, 4<<20+17)
	for i := range noise {
		noise[i] = byte(r.Uint32())
	}
	text := []byte(strings.Repeat("umbra shadow copy volume snapshot ", 130_000))
	inputs := map[string][]byte{"empty": nil, "one byte": {7}, "4 KiB text": text[:4096], "text": text, "noise": noise, "zeros": make([]byte, 1<<20)}
	dec, _ := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(maxDecoded))
	defer dec.Close()
	if !cZstd {
		t.Log("built without cgo: only the Go encoder is tested")
	}
	for name, e := range encoders(t) {
		for in, src := range inputs {
			for _, room := range []int{0, 100, e.bound(len(src)) + 64} {
				prefix := []byte("prefix")
				dst := append(make([]byte, 0, len(prefix)+room), prefix...)
				out := e.encode(dst, src)
				if !bytes.Equal(out[:len(prefix)], prefix) {
					t.Fatalf("%s, %s: the bytes before the frame changed", name, in)
				}
				frame := out[len(prefix):]
				if len(frame) > e.bound(len(src)) {
					t.Fatalf("%s, %s: %d-byte frame over the bound %d", name, in, len(frame), e.bound(len(src)))
				}
				got, err := dec.DecodeAll(frame, nil)
				if err != nil || !bytes.Equal(got, src) {
					t.Fatalf("%s, %s, room %d: does not decode to its input (%v)", name, in, room, err)
				}
				if in == "text" && len(frame) > len(src)/10 {
					t.Fatalf("%s: text compressed to %d of %d bytes", name, len(frame), len(src))
				}
			}
		}
	}
}

// BenchmarkEncoders compresses the distinct non-zero 4 KiB chunks of the
// image UMBRA_BENCH_IMAGE names, in 1 and 4 MiB groups as a backup does,
// on every core, with each encoder and level this build has: the
// size/throughput table behind the levels and the group size in
// docs/benchmarks.md (MB/s of input; MiB-out is what the blobs would
// hold).
func BenchmarkEncoders(b *testing.B) {
	path := os.Getenv("UMBRA_BENCH_IMAGE")
	if path == "" {
		b.Skip("set UMBRA_BENCH_IMAGE to an image file")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	seen := map[Hash]bool{}
	var chunks []byte
	zero := make([]byte, 4096)
	for off := 0; off+4096 <= len(data); off += 4096 {
		c := data[off : off+4096]
		if h := blake3.Sum256(c); !bytes.Equal(c, zero) && !seen[h] {
			seen[h] = true
			chunks = append(chunks, c...)
		}
	}
	data = nil
	es := encoders(b)
	// UMBRA_BENCH_ZSTD="LEVEL,WLOG,HLOG,MML ...": more C parameter sets
	// to compare (0: the level's own).
	for _, spec := range strings.Fields(os.Getenv("UMBRA_BENCH_ZSTD")) {
		var p cParams
		if _, err := fmt.Sscanf(spec, "%d,%d,%d,%d", &p.level, &p.windowLog, &p.hashLog, &p.minMatch); err != nil {
			b.Fatalf("UMBRA_BENCH_ZSTD: %q: %v", spec, err)
		}
		if e := newCEncoder(p, func() *goEncoder { return newGoEncoder(zstd.SpeedFastest, 2) }); e != nil {
			es["c-"+spec] = e
		}
	}
	names := slices.Sorted(maps.Keys(es))
	for _, group := range []int{1 << 20, 4 << 20} {
		for _, name := range names {
			e := es[name]
			b.Run(fmt.Sprintf("%s/group=%dM", name, group>>20), func(b *testing.B) {
				var out atomic.Int64
				for range b.N {
					out.Store(0)
					var next atomic.Int64
					var wg sync.WaitGroup
					for range runtime.GOMAXPROCS(0) {
						wg.Go(func() {
							dst := make([]byte, 0, e.bound(group))
							for {
								off := int(next.Add(int64(group))) - group
								if off >= len(chunks) {
									return
								}
								dst = e.encode(dst[:0], chunks[off:min(off+group, len(chunks))])
								out.Add(int64(len(dst)))
							}
						})
					}
					wg.Wait()
				}
				b.SetBytes(int64(len(chunks)))
				b.ReportMetric(float64(out.Load())/(1<<20), "MiB-out")
			})
		}
	}
}

// TestDecoders: the C fast path (cgo builds) decodes every encoder's
// frames of 4 KiB and more (any blob) to exactly what the Go decoder gives, into dst's room when it
// fits, and declines — leaving the verdict to the Go decoder — whatever
// is not one whole frame that records a size within the bound: empty
// input, garbage, a truncated frame, two frames, a frame over the bound,
// a frame without its size.
func TestDecoders(t *testing.T) {
	if !cZstd {
		t.Skip("built without cgo: blobs have only the Go decoder")
	}
	r := rand.New(rand.NewPCG(3, 4))
	noise := make([]byte, 1<<20)
	for i := range noise {
		noise[i] = byte(r.Uint32())
	}
	text := []byte(strings.Repeat("umbra shadow copy volume snapshot ", 30_000))
	dec, _ := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(maxDecoded))
	defer dec.Close()
	for name, e := range encoders(t) {
		for in, src := range map[string][]byte{"one byte": {7}, "4 KiB noise": noise[:4096], "text": text, "noise": noise, "zeros": make([]byte, 1<<20)} {
			frame := e.encode(nil, src)
			want, err := dec.DecodeAll(frame, nil)
			if err != nil || !bytes.Equal(want, src) {
				t.Fatalf("%s, %s: Go decoder: %v", name, in, err)
			}
			got, ok := cDecode(nil, frame, maxDecoded)
			if !ok && len(src) < 4096 {
				// The Go encoder leaves the size out of a tiny frame's
				// header; blobs hold 4 KiB or more.
				continue
			}
			if !ok || !bytes.Equal(got, src) {
				t.Fatalf("%s, %s: C decoder took it %v, equal %v", name, in, ok, bytes.Equal(got, src))
			}
			room := make([]byte, 0, len(src)+10)
			if got, ok := cDecode(room, frame, maxDecoded); !ok || &got[0] != &room[:1][0] {
				t.Fatalf("%s, %s: not decoded into dst's room", name, in)
			}
			if _, ok := cDecode(nil, frame, len(src)-1); ok {
				t.Fatalf("%s, %s: took a frame over the bound", name, in)
			}
			if _, ok := cDecode(nil, frame[:len(frame)-1], maxDecoded); ok {
				t.Fatalf("%s, %s: took a truncated frame", name, in)
			}
			if _, ok := cDecode(nil, append(slices.Clone(frame), frame...), maxDecoded); ok {
				t.Fatalf("%s, %s: took two frames", name, in)
			}
		}
	}
	for in, z := range map[string][]byte{"empty": nil, "garbage": noise[:4096], "zstd magic then garbage": append([]byte{0x28, 0xb5, 0x2f, 0xfd}, noise[:100]...)} {
		if _, ok := cDecode(nil, z, maxDecoded); ok {
			t.Fatalf("%s: the C decoder took it", in)
		}
	}
	// A streamed frame does not record its size.
	var sb bytes.Buffer
	w, _ := zstd.NewWriter(&sb)
	w.Write(text)
	w.Close()
	if _, ok := cDecode(nil, sb.Bytes(), maxDecoded); ok {
		t.Fatal("took a frame that does not record its size")
	}
	if got, err := dec.DecodeAll(sb.Bytes(), nil); err != nil || !bytes.Equal(got, text) {
		t.Fatalf("streamed frame: %v", err)
	}
}

// FuzzBlobDecode: whatever a blob holds, the C fast path does not crash,
// returns no more than the bound, and where the Go decoder (the judge of
// damaged blobs) also decodes the input, both give the same bytes. (A
// frame only C takes still meets the chunk hashes after decoding.)
func FuzzBlobDecode(f *testing.F) {
	text := []byte(strings.Repeat("umbra shadow copy ", 400))
	for _, e := range encoders(f) {
		f.Add(e.encode(nil, text))
		f.Add(e.encode(nil, text[:100]))
	}
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x05, 0x29, 0, 0, 'h', 'e', 'l', 'l', 'o'})
	dec, _ := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(1<<20))
	defer dec.Close()
	f.Fuzz(func(t *testing.T, z []byte) {
		got, ok := cDecode(nil, z, 1<<20)
		if !ok {
			return
		}
		if len(got) > 1<<20 {
			t.Fatalf("decoded %d bytes past the bound", len(got))
		}
		if want, err := dec.DecodeAll(z, nil); err == nil && !bytes.Equal(got, want) {
			t.Fatalf("C and Go decode the same frame to different bytes (%d and %d)", len(got), len(want))
		}
	})
}
