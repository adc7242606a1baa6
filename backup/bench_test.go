package backup_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"

	"umbra/backup"
	"umbra/provider"
)

// benchImage is the image file UMBRA_BENCH_IMAGE names; the benchmark
// skips without one.
func benchImage(b *testing.B) string {
	path := os.Getenv("UMBRA_BENCH_IMAGE")
	if path == "" {
		b.Skip("set UMBRA_BENCH_IMAGE to an image file")
	}
	return path
}

// readBenchImage reads the whole image named by UMBRA_BENCH_IMAGE.
func readBenchImage(b *testing.B) []byte {
	data, err := os.ReadFile(benchImage(b))
	if err != nil {
		b.Fatal(err)
	}
	return data
}

// BenchmarkBackupFile backs up the file UMBRA_BENCH_IMAGE (e.g. the ext4
// image bench/backup.sh builds) into a fresh repository on tmpfs, then
// restores it: the in-process part of bench/backup.sh, for profiling.
func BenchmarkBackupFile(b *testing.B) {
	f, err := os.Open(benchImage(b))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	src := fileSource{f}
	for i := 0; i < b.N; i++ {
		dir, _ := os.MkdirTemp("/dev/shm", "umbra-bench-")
		defer os.RemoveAll(dir)
		repo, err := backup.InitWith(context.Background(), filepath.Join(dir, "repo"), backup.Settings{Password: os.Getenv("UMBRA_PASSWORD")})
		if err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		x, st, err := repo.Backup(context.Background(), src, backup.Options{Volume: "v", Allocated: backup.FileAllocation(f)})
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(st.Read)/st.Seconds/(1<<20), "MiB/s-read")
		b.ReportMetric(st.Seconds, "s-backup")
		b.ReportMetric(float64(st.Compressed)/(1<<20), "MiB-stored")
		b.ReportMetric(float64(st.Index)/(1<<20), "MiB-index")
		if os.Getenv("UMBRA_BENCH_RESTORE") != "" {
			t0 := time.Now()
			if err := repo.Restore(x.ID, filepath.Join(dir, "out.img"), nil); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(time.Since(t0).Seconds(), "s-restore")
		}
		repo.Close()
	}
}

// BenchmarkBackupIncremental: a full image of UMBRA_BENCH_IMAGE (read
// into memory), then 1 % of its 4 KiB blocks rewritten at scattered
// places and an incremental image from a change bitmap: the figure
// bench/backup.sh measures through the service, without the service.
func BenchmarkBackupIncremental(b *testing.B) {
	data := readBenchImage(b)
	ctx := context.Background()
	dir, _ := os.MkdirTemp("/dev/shm", "umbra-bench-")
	defer os.RemoveAll(dir)
	repo, err := backup.InitWith(ctx, filepath.Join(dir, "repo"), backup.Settings{Password: os.Getenv("UMBRA_PASSWORD")})
	if err != nil {
		b.Fatal(err)
	}
	defer repo.Close()
	full, _, err := repo.Backup(ctx, memSource(data), backup.Options{Volume: "v"})
	if err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	bm := &provider.Bitmap{Granule: 4096, Size: int64(len(data))}
	bm.Bits = make([]uint64, (len(data)/4096+63)/64)
	for i := 0; i < len(data)/4096/100; i++ {
		blk := r.IntN(len(data) / 4096)
		for j := blk * 4096; j < blk*4096+4096; j++ {
			data[j] = byte(r.Uint32())
		}
		bm.Bits[blk/64] |= 1 << (blk % 64)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		x, st, err := repo.Backup(ctx, memSource(data), backup.Options{Volume: "v", Parent: full, Changed: bm})
		if err != nil {
			b.Fatal(err)
		}
		if os.Getenv("UMBRA_BENCH_RESTORE") != "" {
			t0 := time.Now()
			if err := repo.Restore(x.ID, filepath.Join(dir, "out.img"), nil); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(time.Since(t0).Seconds(), "s-restore")
			os.Remove(filepath.Join(dir, "out.img"))
		}
		b.ReportMetric(st.Seconds, "s-incremental")
		if i == 0 { // later rounds add nothing: the same chunks again
			b.ReportMetric(float64(st.Compressed+st.Index)/(1<<20), "MiB-added")
		}
	}
}

// BenchmarkCompressors compresses the non-zero 4 KiB chunks of
// UMBRA_BENCH_IMAGE in 64 KiB (and 256 KiB) groups, as a backup does, on
// every core, with each codec Umbra could use: the table behind the
// --compression choices and the throughput/size trade-off in
// docs/benchmarks.md.
func BenchmarkCompressors(b *testing.B) {
	data := readBenchImage(b)
	var chunks []byte
	for off := 0; off+4096 <= len(data); off += 4096 {
		if !bytes.Equal(data[off:off+4096], make([]byte, 4096)) {
			chunks = append(chunks, data[off:off+4096]...)
		}
	}
	data = nil
	type codec struct {
		name string
		enc  func(dst, src []byte) []byte
	}
	var codecs []codec
	for _, lv := range []zstd.EncoderLevel{zstd.SpeedFastest, zstd.SpeedDefault, zstd.SpeedBetterCompression} {
		e, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(lv), zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)), zstd.WithLowerEncoderMem(true))
		codecs = append(codecs, codec{"zstd-" + lv.String(), func(d, s []byte) []byte { return e.EncodeAll(s, d) }})
	}
	codecs = append(codecs, codec{"s2", func(d, s []byte) []byte { return s2.Encode(d[:cap(d)], s) }},
		codec{"s2-better", func(d, s []byte) []byte { return s2.EncodeBetter(d[:cap(d)], s) }})
	for _, group := range []int{64 << 10, 256 << 10} {
		for _, c := range codecs {
			b.Run(fmt.Sprintf("%s/group=%dK", c.name, group>>10), func(b *testing.B) {
				var out atomic.Int64
				for range b.N {
					out.Store(0)
					next := atomic.Int64{}
					var wg sync.WaitGroup
					for range runtime.GOMAXPROCS(0) {
						wg.Add(1)
						go func() {
							defer wg.Done()
							dst := make([]byte, 0, s2.MaxEncodedLen(group))
							for {
								off := int(next.Add(int64(group))) - group
								if off >= len(chunks) {
									return
								}
								dst = c.enc(dst[:0], chunks[off:min(off+group, len(chunks))])
								out.Add(int64(len(dst)))
							}
						}()
					}
					wg.Wait()
				}
				b.SetBytes(int64(len(chunks)))
				b.ReportMetric(float64(out.Load())/(1<<20), "MiB-out")
			})
		}
	}
}
