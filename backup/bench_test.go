package backup_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"umbra/backup"
)

// BenchmarkBackupFile backs up the file UMBRA_BENCH_IMAGE (e.g. the ext4
// image bench/backup.sh builds) into a fresh repository on tmpfs, then
// restores it: the in-process part of bench/backup.sh, for profiling.
func BenchmarkBackupFile(b *testing.B) {
	path := os.Getenv("UMBRA_BENCH_IMAGE")
	if path == "" {
		b.Skip("set UMBRA_BENCH_IMAGE to an image file")
	}
	f, err := os.Open(path)
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
		if os.Getenv("UMBRA_BENCH_RESTORE") != "" {
			if err := repo.Restore(x.ID, filepath.Join(dir, "out.img"), nil); err != nil {
				b.Fatal(err)
			}
		}
		repo.Close()
	}
}
