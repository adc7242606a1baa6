package backup_test

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"syscall"
	"testing"
	"time"

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
		repo, err := backup.InitWith(context.Background(), filepath.Join(dir, "repo"), backup.Settings{Password: os.Getenv("UMBRA_PASSWORD"), ChunkSize: benchChunk(), Level: os.Getenv("UMBRA_BENCH_LEVEL")})
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
// into memory), then b.N rounds of 1 % of its 4 KiB blocks rewritten at
// scattered places and an incremental image of the previous one from a
// change bitmap, as the service takes them: the figure bench/backup.sh
// measures through the service, without the service. It reports each
// incremental's time and CPU (user and system); UMBRA_BENCH_CPUPROFILE
// names a file for a CPU profile of the incrementals alone.
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
	parent, _, err := repo.Backup(ctx, memSource(data), backup.Options{Volume: "v"})
	if err != nil {
		b.Fatal(err)
	}
	if path := os.Getenv("UMBRA_BENCH_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	r := rand.New(rand.NewPCG(1, 2))
	var wall, cpu, added float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		bm := &provider.Bitmap{Granule: 4096, Size: int64(len(data))}
		bm.Bits = make([]uint64, (len(data)/4096+63)/64)
		for range len(data) / 4096 / 100 {
			blk := r.IntN(len(data) / 4096)
			for j := blk * 4096; j < blk*4096+4096; j++ {
				data[j] = byte(r.Uint32())
			}
			bm.Bits[blk/64] |= 1 << (blk % 64)
		}
		b.StartTimer()
		u0, s0 := cpuSeconds()
		t0 := time.Now()
		x, st, err := repo.Backup(ctx, memSource(data), backup.Options{Volume: "v", Parent: parent, Changed: bm})
		if err != nil {
			b.Fatal(err)
		}
		wall += time.Since(t0).Seconds()
		u1, s1 := cpuSeconds()
		cpu += u1 - u0 + s1 - s0
		added += float64(st.Compressed+st.Index) / (1 << 20)
		if !st.Incremental {
			b.Fatalf("not incremental: %s", st.WhyFull)
		}
		parent = x
		if os.Getenv("UMBRA_BENCH_RESTORE") != "" {
			t0 := time.Now()
			if err := repo.Restore(x.ID, filepath.Join(dir, "out.img"), nil); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(time.Since(t0).Seconds(), "s-restore")
			os.Remove(filepath.Join(dir, "out.img"))
		}
	}
	b.ReportMetric(wall/float64(b.N), "s-incremental")
	b.ReportMetric(cpu/float64(b.N), "s-cpu")
	b.ReportMetric(added/float64(b.N), "MiB-added")
}

// benchChunk is UMBRA_BENCH_CHUNK in KiB (0: the default).
func benchChunk() int {
	n, _ := strconv.Atoi(os.Getenv("UMBRA_BENCH_CHUNK"))
	return n << 10
}

// BenchmarkImageReader backs up UMBRA_BENCH_IMAGE into a repository on
// tmpfs and reads the image back the way `umbra mount` does: 4 KiB reads
// at random places, 4 KiB reads hopping within a 16 MiB window that
// moves along, and 128 KiB reads in order (UMBRA_GROUP_KIB sets the blob
// size to compare).
func BenchmarkImageReader(b *testing.B) {
	ctx := context.Background()
	repo, x, _ := benchBackup(b, backup.Settings{})
	blocks := int(x.Size / 4096)
	reads := map[string]func(ir *backup.ImageReader, r *rand.Rand, i int) int{
		"random-4K": func(ir *backup.ImageReader, r *rand.Rand, _ int) int {
			buf := make([]byte, 4096)
			n, _ := ir.ReadAt(buf, int64(r.IntN(blocks))*4096)
			return n
		},
		"local-4K": func(ir *backup.ImageReader, r *rand.Rand, i int) int {
			buf := make([]byte, 4096)
			base := int64(i/500) * (16 << 20)
			n, _ := ir.ReadAt(buf, (base+int64(r.IntN(16<<20/4096))*4096)%x.Size)
			return n
		},
		"sequential-128K": func(ir *backup.ImageReader, _ *rand.Rand, i int) int {
			buf := make([]byte, 128<<10)
			n, _ := ir.ReadAt(buf, int64(i)*int64(len(buf))%x.Size)
			return n
		},
	}
	for _, name := range []string{"random-4K", "local-4K", "sequential-128K"} {
		b.Run(name, func(b *testing.B) {
			ir, err := repo.OpenImage(ctx, x.ID)
			if err != nil {
				b.Fatal(err)
			}
			r := rand.New(rand.NewPCG(1, 2))
			var bytes int64
			for i := 0; b.Loop(); i++ {
				bytes += int64(reads[name](ir, r, i))
			}
			b.SetBytes(bytes / int64(max(b.N, 1)))
		})
	}
}

// BenchmarkRestoreFile backs up UMBRA_BENCH_IMAGE once into a repository
// on tmpfs (encrypted when UMBRA_PASSWORD is set), then restores it onto
// tmpfs b.N times, reporting the time and the CPU (user and system) of
// each restore: the in-process part of bench/backup.sh's restore rows.
func BenchmarkRestoreFile(b *testing.B) {
	repo, x, dir := benchBackup(b, backup.Settings{Password: os.Getenv("UMBRA_PASSWORD"), ChunkSize: benchChunk()})
	out := filepath.Join(dir, "out.img")
	var wall, user, sys float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		os.Remove(out)
		u0, s0 := cpuSeconds()
		t0 := time.Now()
		if err := repo.Restore(x.ID, out, nil); err != nil {
			b.Fatal(err)
		}
		wall += time.Since(t0).Seconds()
		u1, s1 := cpuSeconds()
		user, sys = user+u1-u0, sys+s1-s0
	}
	b.ReportMetric(wall/float64(b.N), "s-restore")
	b.ReportMetric(user/float64(b.N), "s-user")
	b.ReportMetric(sys/float64(b.N), "s-sys")
}

// cpuSeconds is the process's user and system CPU time so far (system
// time on these VMs moves with what the host charges for fresh pages;
// user time is the engine's own work).
func cpuSeconds() (user, sys float64) {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano()).Seconds(), time.Duration(ru.Stime.Nano()).Seconds()
}

// benchBackup backs up UMBRA_BENCH_IMAGE into a new repository (set) in
// a directory on tmpfs, all removed when the benchmark ends.
func benchBackup(b *testing.B, set backup.Settings) (*backup.Repo, *backup.Image, string) {
	f, err := os.Open(benchImage(b))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	dir, err := os.MkdirTemp("/dev/shm", "umbra-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	repo, err := backup.InitWith(context.Background(), filepath.Join(dir, "repo"), set)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(repo.Close)
	x, _, err := repo.Backup(context.Background(), fileSource{f}, backup.Options{Volume: "v", Allocated: backup.FileAllocation(f)})
	if err != nil {
		b.Fatal(err)
	}
	return repo, x, dir
}

// BenchmarkCopyFile backs the file UMBRA_BENCH_IMAGE up into a
// repository on tmpfs (not timed), then copies the image into a new one:
// the in-process part of bench/copy.sh, for profiling. UMBRA_PASSWORD
// encrypts both (with their own keys: every chunk hashed again).
func BenchmarkCopyFile(b *testing.B) {
	f, err := os.Open(benchImage(b))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	ctx := context.Background()
	dir, _ := os.MkdirTemp("/dev/shm", "umbra-bench-")
	defer os.RemoveAll(dir)
	set := backup.Settings{Password: os.Getenv("UMBRA_PASSWORD")}
	src, err := backup.InitWith(ctx, filepath.Join(dir, "src"), set)
	if err != nil {
		b.Fatal(err)
	}
	defer src.Close()
	if _, _, err := src.Backup(ctx, fileSource{f}, backup.Options{Volume: "v", Allocated: backup.FileAllocation(f)}); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		dst, err := backup.InitWith(ctx, filepath.Join(dir, "dst"+strconv.Itoa(i)), set)
		if err != nil {
			b.Fatal(err)
		}
		st, err := backup.Copy(ctx, src, dst, backup.CopyOptions{All: true})
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(st.BytesRead)/st.Seconds/(1<<20), "MiB/s-read")
		b.ReportMetric(st.Seconds, "s-copy")
		dst.Close()
		os.RemoveAll(filepath.Join(dir, "dst"+strconv.Itoa(i)))
	}
}
