package cow

// Benchmarks for issue 3's speed goals. Each reports the figure with a
// snapshot beside a no-snapshot baseline measured in the same run, and
// their ratio. Files live on tmpfs (/dev/shm) so the disk is not what is
// measured. Run: go test ./cow -run '^$' -bench . -benchtime 1x

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"umbra/provider"
)

func benchDir(b *testing.B) string {
	return benchDirOn(b, "/dev/shm")
}

// benchDirOn makes a temporary directory under base ("" for the default
// temporary directory, which is on disk here).
func benchDirOn(b *testing.B, base string) string {
	b.Helper()
	if fi, err := os.Stat(base); base != "" && (err != nil || !fi.IsDir()) {
		base = ""
	}
	d, err := os.MkdirTemp(base, "umbra-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// benchVolume makes a volume of size bytes filled with random data.
func benchVolume(b *testing.B, size, chunk int64, onDisk bool) *Volume {
	return benchVolumeFS(b, size, chunk, onDisk, nil)
}

// syncCountFS is the real filesystem, counting the syncs of its files.
type syncCountFS struct {
	OSFS
	n  *atomic.Int64
	ns *atomic.Int64 // time spent in syncs, summed over callers (nil: not timed)
}

func (c syncCountFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	f, err := c.OSFS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return syncCountFile{f, c.n, c.ns}, nil
}

type syncCountFile struct {
	File
	n  *atomic.Int64
	ns *atomic.Int64
}

func (f syncCountFile) timed(sync func() error) error {
	f.n.Add(1)
	if f.ns == nil {
		return sync()
	}
	t := time.Now()
	err := sync()
	f.ns.Add(int64(time.Since(t)))
	return err
}

func (f syncCountFile) Sync() error { return f.timed(f.File.Sync) }

func (f syncCountFile) Datasync() error {
	return f.timed(func() error {
		if d, ok := f.File.(interface{ Datasync() error }); ok {
			return d.Datasync()
		}
		return f.File.Sync()
	})
}

// journalCommits reads the transactions the ext4 journal named by
// UMBRA_BENCH_JBD2 (a /proc/fs/jbd2/DEV/info file: the benchmark's
// TMPDIR is on DEV) has committed; -1 when not set or unreadable.
func journalCommits() int64 {
	p := os.Getenv("UMBRA_BENCH_JBD2")
	if p == "" {
		return -1
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return -1
	}
	var n int64
	if _, err := fmt.Sscanf(string(b), "%d transactions", &n); err != nil {
		return -1
	}
	return n
}

// benchVolumeFS is benchVolume on fsys (nil: the real one).
func benchVolumeFS(b *testing.B, size, chunk int64, onDisk bool, fsys FS) *Volume {
	b.Helper()
	d := benchDir(b)
	if onDisk {
		d = benchDirOn(b, "")
	}
	origin := filepath.Join(d, "origin")
	f, err := os.Create(origin)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	r := rand.New(rand.NewPCG(1, 2))
	for off := int64(0); off < size; off += int64(len(buf)) {
		for i := range buf {
			buf[i] = byte(r.Uint32())
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	v, err := Open("bench", origin, Options{ChunkSize: chunk, StorageDir: filepath.Join(d, "diff"), FS: fsys})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { v.Close() })
	return v
}

// timeWrites writes ops blocks of bs bytes at the offsets given and
// returns the throughput in MB/s.
func timeWrites(b *testing.B, v *Volume, offs []int64, bs int) float64 {
	b.Helper()
	p := make([]byte, bs)
	for i := range p {
		p[i] = byte(i)
	}
	start := time.Now()
	for _, off := range offs {
		if _, err := v.WriteAt(p, off); err != nil {
			b.Fatal(err)
		}
	}
	el := time.Since(start)
	return float64(len(offs)*bs) / el.Seconds() / 1e6
}

// firstWriteOffsets returns n offsets of bs-byte writes, each in a chunk
// not written before, in random order.
func firstWriteOffsets(size, chunk int64, bs int, n int, r *rand.Rand) []int64 {
	nchunks := size / chunk
	perm := r.Perm(int(nchunks))
	var offs []int64
	for _, c := range perm {
		if len(offs) == n {
			break
		}
		if int64(bs) >= chunk {
			// Sequential-size writes: aligned, covering whole chunks.
			if int64(c)*chunk+int64(bs) > size || (int64(c)*chunk)%int64(bs) != 0 {
				continue
			}
		}
		offs = append(offs, int64(c)*chunk+r.Int64N(max(chunk-int64(bs), 0)/4096+1)*4096)
	}
	return offs
}

// benchFirstWrite measures first writes to chunks under a live
// non-persistent snapshot against the same writes with no snapshot.
func benchFirstWrite(b *testing.B, chunk int64, bs int) {
	const size = 256 << 20
	v := benchVolume(b, size, chunk, false)
	r := rand.New(rand.NewPCG(3, 4))
	n := int(min(size/max(chunk, int64(bs)), 8192))
	var base, cow float64
	for i := 0; i < b.N; i++ {
		offs := firstWriteOffsets(size, max(chunk, int64(bs)), bs, n, r)
		b1 := timeWrites(b, v, offs, bs)
		base += b1
		s, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{})
		if err != nil {
			b.Fatal(err)
		}
		offs = firstWriteOffsets(size, max(chunk, int64(bs)), bs, n, r)
		c1 := timeWrites(b, v, offs, bs)
		cow += c1
		if testing.Verbose() {
			b.Logf("round %d: base %.0f cow %.0f MB/s ratio %.2f", i, b1, c1, c1/b1)
		}
		if err := v.DeleteSnapshot(s.ID); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(base/float64(b.N), "base-MB/s")
	b.ReportMetric(cow/float64(b.N), "cow-MB/s")
	b.ReportMetric(cow/base, "ratio")
}

// BenchmarkPhysicalLimit measures, with plain syscalls on the same
// tmpfs and the same kind of file as benchFirstWrite, the three I/Os of
// a first write under a snapshot — read the original (random blocks),
// write it to the diff area (space not allocated before), write the new
// data over the block just read — beside the baseline's one write of the
// same size at a random offset, and reports the best ratios any engine
// could reach here: all three in turn (limit-ratio), the diff-area write
// on another core beside the other two (limit-ratio-pipelined), and the
// diff-area write alone, the bound of one diff-area file whatever else
// overlaps (limit-ratio-diff-write-alone). On these VMs space allocated
// for the first time can cost several times a rewrite, and that varies
// from hour to hour: run it beside FirstWrite.
func BenchmarkPhysicalLimit(b *testing.B) {
	for _, bs := range []int{4 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("bs=%dK", bs>>10), func(b *testing.B) { benchPhysicalLimit(b, bs) })
	}
}

// plainOrigin makes d/origin, size bytes of a pattern written 1 MiB at a
// time, for the benchmarks that use plain system calls; it returns the
// file (closed when the benchmark ends) and the 1 MiB buffer.
func plainOrigin(b *testing.B, d string, size int64) (*os.File, []byte) {
	b.Helper()
	f, err := os.Create(filepath.Join(d, "origin"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		f.WriteAt(buf, off)
	}
	return f, buf
}

func benchPhysicalLimit(b *testing.B, bs int) {
	const size = 256 << 20
	d := benchDir(b)
	f, _ := plainOrigin(b, d, size)
	store, err := os.Create(filepath.Join(d, "store"))
	if err != nil {
		b.Fatal(err)
	}
	defer store.Close()
	r := rand.New(rand.NewPCG(5, 6))
	p, q := make([]byte, bs), make([]byte, bs)
	n := min(8192, size/bs/2)
	var base, read, fresh, over time.Duration
	slot := int64(0)
	for i := 0; i < b.N; i++ {
		perm := r.Perm(size / bs)
		t := time.Now()
		for _, c := range perm[:n] {
			f.WriteAt(p, int64(c*bs))
		}
		base += time.Since(t)
		for _, c := range perm[n : 2*n] {
			t0 := time.Now()
			f.ReadAt(q, int64(c*bs))
			t1 := time.Now()
			store.WriteAt(q, slot*int64(bs))
			slot++
			t2 := time.Now()
			f.WriteAt(p, int64(c*bs))
			t3 := time.Now()
			read, fresh, over = read+t1.Sub(t0), fresh+t2.Sub(t1), over+t3.Sub(t2)
		}
	}
	per := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(n*b.N) }
	b.ReportMetric(per(base), "ns/base-write")
	b.ReportMetric(per(read), "ns/read")
	b.ReportMetric(per(fresh), "ns/fresh-write")
	b.ReportMetric(per(over), "ns/overwrite")
	b.ReportMetric(per(base)/(per(read)+per(fresh)+per(over)), "limit-ratio")
	b.ReportMetric(per(base)/max(per(fresh), per(read)+per(over)), "limit-ratio-pipelined")
	b.ReportMetric(per(base)/per(fresh), "limit-ratio-diff-write-alone")
	b.ReportMetric(per(base)/(per(read)+per(over)), "limit-ratio-without-diff-write")
}

// BenchmarkPipelineLimit is the 1 MiB first write done the fastest way
// plain system calls allow, with nothing of the engine: the writer reads
// a 256 KiB piece's original into a free buffer, hands it to goroutines
// that write it to fresh space in one diff-area file (or, for
// files=2, alternately in two: one file's writes take its inode lock
// in turn on tmpfs) and writes that piece of the origin; beside it the
// baseline's 1 MiB writes over the same origin. It bounds what
// FirstWrite/bs=1024K can reach on this machine.
func BenchmarkPipelineLimit(b *testing.B) {
	for _, files := range []int{1, 2} {
		b.Run(fmt.Sprintf("files=%d", files), func(b *testing.B) { benchPipelineLimit(b, files) })
	}
}

func benchPipelineLimit(b *testing.B, files int) {
	const size = 256 << 20
	const piece = 256 << 10
	d := benchDir(b)
	o, p := plainOrigin(b, d, size)
	r := rand.New(rand.NewPCG(9, 10))
	type job struct {
		buf []byte
		at  int64
	}
	free := make(chan []byte, 16)
	for range cap(free) {
		free <- make([]byte, piece)
	}
	var base, pipe float64
	for i := 0; i < b.N; i++ {
		perm := r.Perm(size >> 20)
		t := time.Now()
		for _, c := range perm {
			o.WriteAt(p, int64(c)<<20)
		}
		base += size / time.Since(t).Seconds() / 1e6
		var wg sync.WaitGroup
		queues := make([]chan job, files)
		for k := range queues {
			f, err := os.Create(filepath.Join(d, fmt.Sprintf("store%d", k)))
			if err != nil {
				b.Fatal(err)
			}
			queues[k] = make(chan job, 8)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer f.Close()
				for j := range queues[k] {
					f.WriteAt(j.buf, j.at)
					free <- j.buf
				}
			}()
		}
		t = time.Now()
		n := int64(0) // pieces so far; two (512 KiB) go to a file in turn
		for _, c := range perm {
			for q := int64(0); q < 1<<20; q += piece {
				at := int64(c)<<20 + q
				buf := <-free
				o.ReadAt(buf, at)
				k := n / 2 % int64(files)
				queues[k] <- job{buf, n/int64(2*files)*2*piece + n%2*piece}
				n++
				o.WriteAt(p[q:q+piece], at)
			}
		}
		for _, q := range queues {
			close(q)
		}
		wg.Wait()
		pipe += size / time.Since(t).Seconds() / 1e6
		for k := range queues {
			os.Remove(filepath.Join(d, fmt.Sprintf("store%d", k)))
		}
	}
	b.ReportMetric(base/float64(b.N), "base-MB/s")
	b.ReportMetric(pipe/float64(b.N), "pipeline-MB/s")
	b.ReportMetric(pipe/base, "limit-ratio")
}

// BenchmarkFirstWrite is the chunk-size table: 4 KiB random and 1 MiB
// sequential first writes under a live snapshot, per chunk size.
func BenchmarkFirstWrite(b *testing.B) {
	for _, chunk := range []int64{4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20} {
		for _, bs := range []int{4 << 10, 1 << 20} {
			b.Run(fmt.Sprintf("chunk=%dK/bs=%dK", chunk>>10, bs>>10), func(b *testing.B) { benchFirstWrite(b, chunk, bs) })
		}
	}
}

// BenchmarkRewrite measures writes to chunks already preserved for the
// live snapshot against the same writes with no snapshot.
func BenchmarkRewrite(b *testing.B) {
	const size = 256 << 20
	const chunk = DefaultChunkSize
	v := benchVolume(b, size, chunk, false)
	r := rand.New(rand.NewPCG(5, 6))
	offs := make([]int64, 16384)
	for i := range offs {
		offs[i] = r.Int64N(size/4096) * 4096
	}
	var base, cow float64
	for i := 0; i < b.N; i++ {
		base += timeWrites(b, v, offs, 4096)
		s, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{})
		if err != nil {
			b.Fatal(err)
		}
		timeWrites(b, v, offs, 4096) // preserve
		cow += timeWrites(b, v, offs, 4096)
		v.DeleteSnapshot(s.ID)
	}
	b.ReportMetric(base/float64(b.N), "base-MB/s")
	b.ReportMetric(cow/float64(b.N), "cow-MB/s")
	b.ReportMetric(cow/base, "ratio")
}

// BenchmarkPersistentConcurrent: 16 writers doing 4 KiB first writes under
// a persistent snapshot (fsync of diff area and log before each origin
// write, shared by group commit) against the same with no snapshot. On
// disk, not tmpfs: fsync is what this measures (TMPDIR chooses the
// filesystem). Neither side flushes the origin, so the ratio is the whole
// cost of the ordering guarantee. syncs/write is fsyncs and fdatasyncs
// per persistent first write: its inverse is the group commit's size.
func BenchmarkPersistentConcurrent(b *testing.B) {
	const size = 256 << 20
	const chunk = DefaultChunkSize
	const writers = 16
	var syncs, syncNs atomic.Int64
	v := benchVolumeFS(b, size, chunk, true, syncCountFS{n: &syncs, ns: &syncNs})
	r := rand.New(rand.NewPCG(7, 8))
	run := func() float64 {
		offs := firstWriteOffsets(size, chunk, 4096, 4096, r)
		var wg sync.WaitGroup
		start := time.Now()
		for w := 0; w < writers; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				p := make([]byte, 4096)
				for i := w; i < len(offs); i += writers {
					if _, err := v.WriteAt(p, offs[i]); err != nil {
						b.Error(err)
						return
					}
				}
			}(w)
		}
		wg.Wait()
		return float64(len(offs)) / time.Since(start).Seconds()
	}
	var base, cow float64
	var nsync, nsyncNs, commits int64
	for i := 0; i < b.N; i++ {
		base += run()
		s, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{Persistent: true})
		if err != nil {
			b.Fatal(err)
		}
		n0, t0, j0 := syncs.Load(), syncNs.Load(), journalCommits()
		cow += run()
		nsync += syncs.Load() - n0
		nsyncNs += syncNs.Load() - t0
		if j0 >= 0 {
			commits += journalCommits() - j0
		}
		v.DeleteSnapshot(s.ID)
	}
	b.ReportMetric(base/float64(b.N), "base-IOPS")
	b.ReportMetric(cow/float64(b.N), "persistent-IOPS")
	b.ReportMetric(cow/base, "ratio")
	b.ReportMetric(float64(nsync)/float64(b.N*4096), "syncs/write")
	if nsync > 0 {
		b.ReportMetric(float64(nsyncNs)/float64(nsync)/1e6, "ms/sync")
	}
	if os.Getenv("UMBRA_BENCH_JBD2") != "" {
		b.ReportMetric(float64(commits)/float64(b.N*4096), "commits/write")
	}
}

// BenchmarkCommitLatency: commit on a 100 GiB sparse volume whose chunks
// were written across 10 GiB under earlier snapshots (one write per
// chunk: the engine's state is what commit could depend on).
func BenchmarkCommitLatency(b *testing.B) {
	d := benchDir(b)
	origin := filepath.Join(d, "origin")
	f, _ := os.Create(origin)
	f.Truncate(100 << 30)
	f.Close()
	v, err := Open("big", origin, Options{StorageDir: filepath.Join(d, "diff")})
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	ctx := context.Background()
	p := []byte{1}
	for i := 0; i < 4; i++ {
		if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{}); err != nil {
			b.Fatal(err)
		}
		for off := int64(i) << 30 * 10 / 4; off < int64(i+1)<<30*10/4; off += DefaultChunkSize {
			v.WriteAt(p, off)
		}
	}
	var lat []time.Duration
	for i := 0; i < b.N; i++ {
		for j := 0; j < 100; j++ {
			start := time.Now()
			s, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
			lat = append(lat, time.Since(start))
			if err != nil {
				b.Fatal(err)
			}
			v.DeleteSnapshot(s.ID)
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(v.Storage().Used>>20), "diff-MiB")
}

// BenchmarkDeepRead reads a snapshot 64 deep in a chain (63 newer
// snapshots, each with scattered preserved chunks) against the origin.
func BenchmarkDeepRead(b *testing.B) {
	const size = 128 << 20
	const chunk = DefaultChunkSize
	v := benchVolume(b, size, chunk, false)
	ctx := context.Background()
	r := rand.New(rand.NewPCG(9, 10))
	first, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{})
	if err != nil {
		b.Fatal(err)
	}
	p := make([]byte, 4096)
	for i := 0; i < 64; i++ {
		for j := 0; j < 64; j++ {
			v.WriteAt(p, r.Int64N(size/4096)*4096)
		}
		if i < 63 {
			if _, err := v.CreateSnapshot(ctx, provider.SnapshotOptions{}); err != nil {
				b.Fatal(err)
			}
		}
	}
	s, _ := v.OpenSnapshot(first.ID)
	read := func(r interface {
		ReadAt([]byte, int64) (int, error)
	}, bs int) float64 {
		buf := make([]byte, bs)
		start := time.Now()
		for off := int64(0); off < size; off += int64(bs) {
			if _, err := r.ReadAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
		return float64(size) / time.Since(start).Seconds() / 1e6
	}
	for _, bs := range []int{4096, 1 << 20} {
		var base, snap float64
		for i := 0; i < b.N; i++ {
			base += read(v, bs)
			snap += read(s, bs)
		}
		b.ReportMetric(base/float64(b.N), fmt.Sprintf("origin-%dK-MB/s", bs>>10))
		b.ReportMetric(snap/float64(b.N), fmt.Sprintf("snap64-%dK-MB/s", bs>>10))
		b.ReportMetric(snap/base, fmt.Sprintf("ratio-%dK", bs>>10))
	}
}

// BenchmarkReadPending reads preserved chunks of a snapshot once, 1 MiB
// at a time as a backup does, while none of the volume's copies waits in
// the write-behind and while 100 others do (a backup reading a
// snapshot as writes go on): only the slots still in memory should be
// read apart from the rest. Each pass reads a region not read before
// (pages of the diff area already mapped would read faster); past 6
// rounds the regions repeat.
func BenchmarkReadPending(b *testing.B) {
	const size = 256 << 20
	const region = 16 << 20
	const regions = 12 // preserved: the first 192 MiB
	defer func(d time.Duration) { wbDelay = d }(wbDelay)
	wbDelay = time.Hour // the few copies below stay in memory
	v := benchVolume(b, size, DefaultChunkSize, false)
	info, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{})
	if err != nil {
		b.Fatal(err)
	}
	s, err := v.OpenSnapshot(info.ID)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	p := make([]byte, 1<<20)
	for off := int64(0); off < regions*region; off += int64(len(p)) {
		v.WriteAt(p, off)
	}
	v.pre.settleWriteBehind(true) // every copy in the file
	read := func(r int) float64 {
		start := time.Now()
		for off := int64(r) * region; off < int64(r+1)*region; off += int64(len(p)) {
			if _, err := s.ReadAt(p, off); err != nil {
				b.Fatal(err)
			}
		}
		return region / time.Since(start).Seconds() / 1e6
	}
	var idle, busy float64
	for i := 0; i < b.N; i++ {
		idle += read(2 * (i % (regions / 2)))
		for k := range int64(100) { // 100 first writes past the regions
			v.WriteAt(p[:4096], regions*region+int64(i%64)<<20+k*4096)
		}
		if v.store.wb.items.Load() == 0 {
			b.Fatal("no copy waits in the write-behind")
		}
		busy += read(2*(i%(regions/2)) + 1)
		v.pre.settleWriteBehind(true)
	}
	b.ReportMetric(idle/float64(b.N), "none-pending-MB/s")
	b.ReportMetric(busy/float64(b.N), "some-pending-MB/s")
	b.ReportMetric(busy/idle, "ratio")
}

// BenchmarkMappingMemory reports heap bytes per preserved chunk.
func BenchmarkMappingMemory(b *testing.B) {
	d := benchDir(b)
	origin := filepath.Join(d, "origin")
	f, _ := os.Create(origin)
	f.Truncate(64 << 30)
	f.Close()
	v, err := Open("mem", origin, Options{ChunkSize: 4096, StorageDir: filepath.Join(d, "diff")})
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	const n = 1 << 18
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	p := []byte{1}
	r := rand.New(rand.NewPCG(11, 12))
	for i := 0; i < n; i++ {
		// Sparse chunks preserve as zero entries: mapping state only.
		v.WriteAt(p, r.Int64N(64<<30/4096)*4096)
	}
	// The write-behind's batch buffers (up to wbQueue+2 of 512 KiB, the
	// same for any number of chunks) are not mapping state: they are
	// reported apart, and let go before the mapping is measured.
	var mw runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&mw)
	v.mu.RLock()
	entries := v.entries.Len()
	st := v.store
	v.mu.RUnlock()
	st.wb.drain()
	st.wb.dropSpares()
	runtime.GC()
	runtime.ReadMemStats(&m1)
	b.ReportMetric(float64(m1.HeapAlloc-m0.HeapAlloc)/float64(entries), "bytes/chunk")
	b.ReportMetric(float64(mw.HeapAlloc-m1.HeapAlloc)/(1<<20), "wb-spares-MiB")
	b.ReportMetric(float64(entries), "chunks")
}

// BenchmarkHoldWindow measures how long writes are held to commit a
// snapshot (flush-and-hold, commit, release) while writers keep writing
// 4 KiB blocks as fast as they can, as p50, p99 and max.
func BenchmarkHoldWindow(b *testing.B) {
	for _, writers := range []int{1, 2, 8} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) { benchHoldWindow(b, writers) })
	}
}

func benchHoldWindow(b *testing.B, writers int) {
	const size = 256 << 20
	v := benchVolume(b, size, DefaultChunkSize, false)
	ctx := context.Background()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 99))
			p := make([]byte, 4096)
			for {
				select {
				case <-stop:
					return
				default:
				}
				v.WriteAt(p, r.Int64N(size/4096)*4096)
			}
		}(w)
	}
	var lat []time.Duration
	for i := 0; i < b.N; i++ {
		for j := 0; j < 200; j++ {
			start := time.Now()
			h, err := v.Hold(ctx, time.Second)
			if err != nil {
				b.Fatal(err)
			}
			s, err := h.CreateSnapshot(ctx, provider.SnapshotOptions{})
			if err != nil {
				b.Fatal(err)
			}
			h.Release()
			lat = append(lat, time.Since(start))
			v.DeleteSnapshot(s.ID)
			time.Sleep(time.Millisecond)
		}
	}
	close(stop)
	wg.Wait()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds()), "max-µs")
}

// BenchmarkDeleteSnapshot measures deleting a snapshot that holds 1 GiB
// of preserved chunks (262 144 at 4 KiB): writes wait on the volume's
// lock meanwhile, so this is also how long writes stall.
func BenchmarkDeleteSnapshot(b *testing.B) {
	const size = 1 << 30
	v := benchVolume(b, size, 4096, false)
	p := make([]byte, 1<<20)
	var total time.Duration
	for i := 0; i < b.N; i++ {
		s, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{})
		if err != nil {
			b.Fatal(err)
		}
		for off := int64(0); off < size; off += int64(len(p)) {
			if _, err := v.WriteAt(p, off); err != nil {
				b.Fatal(err)
			}
		}
		// A second snapshot keeps the store in use, as a rolling schedule
		// does: deleting the first frees its slots one by one.
		s2, _ := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{})
		mustWrite := func(off int64) { v.WriteAt(p[:4096], off) }
		mustWrite(0)
		t := time.Now()
		if err := v.DeleteSnapshot(s.ID); err != nil {
			b.Fatal(err)
		}
		total += time.Since(t)
		v.DeleteSnapshot(s2.ID)
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/delete")
}

// BenchmarkSlowFirstWrites makes 4 KiB first writes under a live
// non-persistent snapshot at ~500 a second, one every 2 ms, the pace the
// kernel's nbd client reached in the VM of bench/vm.sh (TCG, 2026-12-07),
// and reports the diff-area writes a first write costs
// (diff-writes/op): a batch of 128 copies of 4 KiB written full is
// 0.008; one flushed before it fills costs besides its write a timer
// goroutine and a flusher wakeup. At this pace that is what wbDelay
// decides.
func BenchmarkSlowFirstWrites(b *testing.B) {
	const size = 32 << 20
	var n atomic.Int64
	v := benchVolumeFS(b, size, DefaultChunkSize, false, writeCountFS{n: &n})
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	offs := firstWriteOffsets(size, DefaultChunkSize, 4096, size/DefaultChunkSize, rand.New(rand.NewPCG(5, 6)))
	if b.N > len(offs) {
		b.Fatalf("-benchtime at most %dx: each write must be a first write", len(offs))
	}
	p := make([]byte, 4096)
	n.Store(0)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := v.WriteAt(p, offs[i]); err != nil {
			b.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	b.StopTimer()
	v.pre.settleWriteBehind(true) // the last partial batch counts too
	b.ReportMetric(float64(n.Load())/float64(b.N), "diff-writes/op")
}

// writeCountFS is the real filesystem, counting the writes to the diff
// area (the file named "store"; the origin stays an *os.File, whose fast
// paths the volume takes).
type writeCountFS struct {
	OSFS
	n *atomic.Int64
}

func (c writeCountFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	f, err := c.OSFS.OpenFile(name, flag, perm)
	if err != nil || filepath.Base(name) != "store" {
		return f, err
	}
	return writeCountFile{f, c.n}, nil
}

type writeCountFile struct {
	File
	n *atomic.Int64
}

func (f writeCountFile) WriteAt(p []byte, off int64) (int, error) {
	f.n.Add(1)
	return f.File.WriteAt(p, off)
}
