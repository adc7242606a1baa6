package backup_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

	"umbra/backup"
	"umbra/provider"
)

// patternSource is a synthetic volume like `nbdkit pattern`: every 8-byte
// word of its first data bytes is its offset (big-endian), so every 4 KiB
// chunk is unique and compresses well; the rest is a hole. A chunk in
// changed holds its offset XOR salt instead (a rewritten block).
type patternSource struct {
	size, data int64
	changed    *roaring.Bitmap // a few bytes a chunk, as the service's map
	salt       uint64
}

func (p *patternSource) Size() int64 { return p.size }

func (p *patternSource) ReadAt(b []byte, off int64) (int, error) {
	if off%8 != 0 || len(b)%8 != 0 {
		return 0, fmt.Errorf("pattern source: unaligned read of %d at %d", len(b), off)
	}
	for i := 0; i < len(b); {
		o := off + int64(i)
		end := min(len(b), i+int(4096-o%4096)) // the rest of o's chunk
		salt := uint64(0)
		if p.isChanged(o / 4096) {
			salt = p.salt
		}
		for ; i < end; i += 8 {
			v := uint64(off + int64(i))
			if off+int64(i) >= p.data {
				v, salt = 0, 0
			}
			binary.BigEndian.PutUint64(b[i:], v^salt)
		}
	}
	return len(b), nil
}

func (p *patternSource) isChanged(c int64) bool {
	return p.changed != nil && p.changed.Contains(uint32(c))
}

func (p *patternSource) allocated(off, n int64) ([]backup.Range, error) {
	if off >= p.data {
		return nil, nil
	}
	return []backup.Range{{Off: off, Len: min(n, p.data-off)}}, nil
}

// peakRSS is the process's peak resident set since resetPeak, in MiB.
func peakRSS() float64 { var st procStatus; defer st.close(); return st.mib("VmHWM:") }

func curRSS() float64 { var st procStatus; defer st.close(); return st.mib("VmRSS:") }

// procStatus reads /proc/self/status into memory it keeps, so that a
// sampler reading it every few ms allocates nothing in the process it
// measures (a file read and its lines split 100 times a second were
// ~350 KB/s of garbage: several MiB over a long phase, which the
// collector's goal made room for).
type procStatus struct {
	f   *os.File
	buf [8192]byte
	n   int
}

// mib is field name (kB) of a fresh read of the status, in MiB.
func (p *procStatus) mib(name string) float64 {
	p.read()
	return p.field(name)
}

func (p *procStatus) read() {
	if p.f == nil {
		f, err := os.Open("/proc/self/status")
		if err != nil {
			return
		}
		p.f = f
	}
	p.n, _ = p.f.ReadAt(p.buf[:], 0)
}

// field is field name (kB) of the last read, in MiB.
func (p *procStatus) field(name string) float64 {
	b := p.buf[:p.n]
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if !bytes.HasPrefix(line, []byte(name)) {
			continue
		}
		kb := 0
		for _, c := range line[len(name):] {
			if c >= '0' && c <= '9' {
				kb = kb*10 + int(c-'0')
			} else if kb > 0 {
				break
			}
		}
		return float64(kb) / 1024
	}
	return 0
}

func (p *procStatus) close() {
	if p.f != nil {
		p.f.Close()
	}
}

// cpuTime is the process's CPU time so far (user and system).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// resetPeak returns memory to the system and starts a new peak.
func resetPeak() {
	runtime.GC()
	debug.FreeOSMemory()
	os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
}

// dirBytes sums the sizes of the repository's files under dir whose
// path (relative) does not start with skip: not the local index cache
// (cache/), which is not part of the repository.
func dirBytes(dir, skip string) int64 {
	var n int64
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if rel, _ := filepath.Rel(dir, p); (skip == "" || !strings.HasPrefix(rel, skip)) && !strings.HasPrefix(rel, "cache/") {
				fi, _ := d.Info()
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// BenchmarkScale backs up a synthetic volume of UMBRA_SCALE_CHUNKS unique
// 4 KiB chunks (in a volume 16 times larger, the rest a hole) into a
// repository under UMBRA_SCALE_DIR (default /tmp), then an incremental
// after 1 % of its data chunks were rewritten at scattered places, then
// verifies the repository, deletes the full image (prune), reads the
// statistics, restores the incremental image (into a sink that checks
// every chunk) and checks the repository as `umbra repair --dry-run`
// does (UMBRA_SCALE_SKIP lists phases to leave out), reporting each
// phase's peak RSS (VmHWM, reset before each) and the metadata each
// backup wrote: the in-process part of bench/scale.sh.
//
// To iterate on one phase: UMBRA_SCALE_KEEP names a directory where the
// full backup's repository is kept (made once, then copied to the same
// place for each run, so its index cache stays current);
// UMBRA_SCALE_PROFILE names a directory for each phase's CPU profile
// and a heap profile taken each time the resident set reached a new
// peak (PHASE-cpu.pprof, PHASE-heap.pprof).
func BenchmarkScale(b *testing.B) {
	n, _ := strconv.ParseInt(os.Getenv("UMBRA_SCALE_CHUNKS"), 10, 64)
	if n == 0 {
		b.Skip("set UMBRA_SCALE_CHUNKS to the number of unique 4 KiB chunks")
	}
	ctx := context.Background()
	var err error
	base := os.Getenv("UMBRA_SCALE_DIR")
	if base == "" {
		base = os.TempDir()
	}
	keep := os.Getenv("UMBRA_SCALE_KEEP")
	dir := keep
	if keep == "" {
		dir, err = os.MkdirTemp(base, "umbra-scale-")
		if err != nil {
			b.Fatal(err)
		}
		defer os.RemoveAll(dir)
	}
	loc := filepath.Join(dir, "repo")
	kept := filepath.Join(dir, "full")
	set := backup.Settings{Password: os.Getenv("UMBRA_PASSWORD")}
	src := &patternSource{size: 16 * n * 4096, data: n * 4096}
	report := func(name string, v float64, unit string) {
		b.ReportMetric(v, unit)
		fmt.Fprintf(os.Stderr, "scale chunks=%d %s %.2f %s\n", n, name, v, unit)
	}
	skip := strings.Split(os.Getenv("UMBRA_SCALE_SKIP"), ",")
	prof := os.Getenv("UMBRA_SCALE_PROFILE")
	phase := func(name string, fn func(r *backup.Repo)) {
		if slices.Contains(skip, name) {
			return
		}
		resetPeak()
		stop := startProfiles(b, prof, name)
		peak := samplePeak()
		t0, cpu0 := time.Now(), cpuTime()
		r, err := backup.OpenWith(ctx, loc, set)
		if err != nil {
			b.Fatal(err)
		}
		fn(r)
		r.Close()
		stop()
		at := peak()
		report(name+"-peak-rss", peakRSS(), "MiB")
		for _, k := range peakParts {
			report(name+"-peak-"+k, at[k], "MiB")
		}
		report(name+"-s", time.Since(t0).Seconds(), "s")
		report(name+"-cpu-s", (cpuTime() - cpu0).Seconds(), "s")
		resetPeak()
		report(name+"-after-rss", curRSS(), "MiB")
	}
	var full, incr *backup.Image
	// UMBRA_SCALE_REPO: a copy of a repository an earlier run of the
	// same size left after its incremental (its two images): the phases
	// after the incremental run on it, so that they can run side by side
	// on copies. It is opened once first (a copy's local index cache is
	// rebuilt for its new place).
	reuse := os.Getenv("UMBRA_SCALE_REPO")
	if reuse != "" {
		loc = reuse
		r, err := backup.OpenWith(ctx, loc, set)
		if err != nil {
			b.Fatal(err)
		}
		list, errs := r.Images()
		r.Close()
		if len(errs) > 0 || len(list) != 2 {
			b.Fatalf("%s: %d images (%v), want a full and an incremental", loc, len(list), errs)
		}
		full, incr = list[0], list[1]
		if full.Parent != "" {
			full, incr = incr, full
		}
		skip = append(skip, "incremental")
	} else if _, err := os.Stat(kept); keep != "" && err == nil {
		// The full backup of an earlier run, copied to the same place.
		if err := os.RemoveAll(loc); err != nil {
			b.Fatal(err)
		}
		if out, err := exec.Command("cp", "-a", kept, loc).CombinedOutput(); err != nil {
			b.Fatalf("copy the kept repository: %v: %s", err, out)
		}
		// The copy's writes on their way to the disk first: else the
		// incremental's first Sync waits for them (a syncfs did, 2 s
		// of a 3 s incremental at 1 Mi chunks).
		if out, err := exec.Command("sync", "-f", loc).CombinedOutput(); err != nil {
			b.Fatalf("sync the copy: %v: %s", err, out)
		}
		r, err := backup.OpenWith(ctx, loc, set)
		if err != nil {
			b.Fatal(err)
		}
		list, errs := r.Images()
		r.Close()
		if len(list) != 1 || len(errs) > 0 || list[0].Size != src.size {
			b.Fatalf("%s holds %d images (%v), not one of a %d-byte volume: remove it", kept, len(list), errs, src.size)
		}
		full = list[0]
	} else {
		os.RemoveAll(loc)
		repo, err := backup.InitWith(ctx, loc, set)
		if err != nil {
			b.Fatal(err)
		}
		repo.Close()
		phase("backup", func(r *backup.Repo) {
			var st backup.Stats
			full, st, err = r.Backup(ctx, src, backup.Options{Volume: "v", Allocated: src.allocated})
			if err != nil {
				b.Fatal(err)
			}
			report("backup-index", float64(st.Index)/(1<<20), "MiB")
		})
		if full == nil {
			b.Fatal("UMBRA_SCALE_SKIP leaves out the backup and UMBRA_SCALE_KEEP holds none")
		}
		report("repo-size", float64(dirBytes(loc, ""))/(1<<20), "MiB")
		if keep != "" {
			if out, err := exec.Command("cp", "-a", loc, kept).CombinedOutput(); err != nil {
				b.Fatalf("keep the repository: %v: %s", err, out)
			}
		}
	}
	// 1 % of the data chunks rewritten at scattered places.
	rnd := rand.New(rand.NewPCG(1, 2))
	src.changed, src.salt = roaring.New(), 0x5a5a5a5a5a5a5a5a
	// A compressed map, as the COW engine hands its changes over (a bit
	// a chunk would be 32 MiB for the 1 TiB volume of 16 Mi chunks).
	bm := &provider.Bitmap{Granule: 4096, Size: src.size, Marks: roaring.New()}
	for range n / 100 {
		c := rnd.Int64N(n)
		src.changed.Add(uint32(c))
		bm.Marks.Add(uint32(c))
	}
	changed := int64(src.changed.GetCardinality()) * 4096
	meta0 := dirBytes(loc, "packs")
	ranIncr := false
	phase("incremental", func(r *backup.Repo) {
		ranIncr = true
		var st backup.Stats
		incr, st, err = r.Backup(ctx, src, backup.Options{Volume: "v", Parent: full, Changed: bm, Allocated: src.allocated})
		if err != nil {
			b.Fatal(err)
		}
		if !st.Incremental {
			b.Fatalf("not incremental: %s", st.WhyFull)
		}
	})
	if ranIncr {
		// Measured after the phase: walking the repository is not the
		// incremental's memory, nor its time.
		meta := float64(dirBytes(loc, "packs") - meta0)
		report("incremental-changed", float64(changed)/(1<<20), "MiB")
		report("incremental-metadata", meta/(1<<20), "MiB")
		report("incremental-metadata-pct", 100*meta/float64(changed), "%")
	}
	phase("verify", func(r *backup.Repo) {
		if rep := r.VerifyContext(ctx, nil); len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes) > 0 {
			b.Fatalf("verify: %+v", rep)
		}
	})
	phase("prune", func(r *backup.Repo) {
		if _, err := r.Delete(ctx, []string{full.ID}); err != nil {
			b.Fatal(err)
		}
	})
	phase("stats", func(r *backup.Repo) {
		if st := r.Stats(ctx); st.Chunks < int(n) {
			b.Fatalf("stats: %d chunks, the volume has %d", st.Chunks, n)
		}
	})
	phase("restore", func(r *backup.Repo) {
		// The incremental image (the full one is deleted by then), through
		// restore's pipeline (the same workers, batches, chunk cache and
		// checks) into a sink that checks every chunk against the
		// pattern without storing it: a 16 Mi-chunk volume would need
		// 64 GiB of disk as a sparse file.
		ir, err := r.OpenImage(ctx, incr.ID)
		if err != nil {
			b.Fatal(err)
		}
		var got int64
		err = ir.Stream(ctx, nil, func(sb backup.StreamBatch) error {
			for j := range sb.Zero {
				c := sb.First + int64(j)
				if sb.Zero[j] != (c*4096 >= src.data) {
					return fmt.Errorf("chunk %d: zero %v, the volume's data ends at chunk %d", c, sb.Zero[j], src.data/4096)
				}
				if sb.Zero[j] {
					continue
				}
				d := sb.Data[j*4096 : (j+1)*4096]
				for k := 0; k < 4096; k += 8 {
					want := uint64(c*4096 + int64(k))
					if src.isChanged(c) {
						want ^= src.salt
					}
					if v := binary.BigEndian.Uint64(d[k:]); v != want {
						return fmt.Errorf("chunk %d at byte %d: %#x, want %#x", c, k, v, want)
					}
				}
				got++
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		if got != n {
			b.Fatalf("restore streamed %d data chunks of %d", got, n)
		}
	})
	phase("repair-check", func(r *backup.Repo) {
		rep, err := r.Repair(ctx, true)
		if err != nil || rep.LostChunks > 0 || len(rep.DamagedPacks)+len(rep.BrokenImages) > 0 {
			b.Fatalf("repair --dry-run: %+v, %v", rep, err)
		}
	})
}

// peakParts are what samplePeak reports of the resident set at its
// highest: the kernel's split (anonymous memory, pages of mapped files,
// shared memory: RssAnon, RssFile, RssShmem of /proc/self/status) and the Go runtime's
// (runtime/metrics): heap objects (live and not yet collected), heap
// spans free but not returned to the system, goroutine stacks, the
// collector's heap goal, and all memory the runtime has mapped and not
// released.
var peakParts = []string{"anon", "file", "shmem", "heap-objects", "heap-free", "stacks", "heap-goal", "go-total"}

// samplePeak starts a goroutine that reads the resident set every 10 ms
// and, each time it is the highest yet, what it is made of
// (peakParts); the returned function stops it and gives them, in MiB.
// A sample can miss the very top between two reads: the parts are of
// the highest resident set seen, VmHWM is the true peak.
func samplePeak() func() map[string]float64 {
	at := map[string]float64{}
	ms := []metrics.Sample{
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
		{Name: "/memory/classes/heap/stacks:bytes"},
		{Name: "/gc/heap/goal:bytes"},
		{Name: "/memory/classes/total:bytes"},
		{Name: "/memory/classes/heap/released:bytes"},
	}
	var st procStatus
	sample := func() {
		st.read()
		at["anon"], at["file"], at["shmem"] = st.field("RssAnon:"), st.field("RssFile:"), st.field("RssShmem:")
		metrics.Read(ms)
		mib := func(i int) float64 { return float64(ms[i].Value.Uint64()) / (1 << 20) }
		at["heap-objects"], at["heap-free"], at["stacks"], at["heap-goal"] = mib(0), mib(1), mib(2), mib(3)
		at["go-total"] = mib(4) - mib(5)
	}
	stop := onRSSHigh(10*time.Millisecond, 0, func(float64) { sample() })
	return func() map[string]float64 {
		stop()
		st.close()
		return at
	}
}

// onRSSHigh starts a goroutine that reads the resident set every
// interval and calls f with it (MiB) each time it passes the highest
// yet by more than step MiB; the returned function stops it and waits.
func onRSSHigh(every time.Duration, step float64, f func(rss float64)) (stop func()) {
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		tick := time.NewTicker(every)
		defer tick.Stop()
		var st procStatus
		defer st.close()
		high := 0.0
		for {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			if rss := st.mib("VmRSS:"); rss > high+step {
				high = rss
				f(rss)
			}
		}
	}()
	return func() {
		close(done)
		<-exited
	}
}

// startProfiles starts phase's CPU profile and a goroutine that writes
// a heap profile each time the resident set passes its highest yet by
// 4 MiB, into dir ("": none; PHASE-heap.pprof the last, PHASE-heap-N.pprof
// each); stop ends both.
func startProfiles(b *testing.B, dir, phase string) (stop func()) {
	if dir == "" {
		return func() {}
	}
	cpu, err := os.Create(filepath.Join(dir, phase+"-cpu.pprof"))
	if err != nil {
		b.Fatal(err)
	}
	if err := pprof.StartCPUProfile(cpu); err != nil {
		b.Fatal(err)
	}
	k := 0
	stopHeap := onRSSHigh(50*time.Millisecond, 4, func(rss float64) {
		runtime.GC()
		k++
		for _, name := range []string{phase + "-heap.pprof", fmt.Sprintf("%s-heap-%d.pprof", phase, k)} {
			if f, err := os.Create(filepath.Join(dir, name)); err == nil {
				pprof.Lookup("heap").WriteTo(f, 0)
				f.Close()
			}
		}
		fmt.Fprintf(os.Stderr, "scale %s: heap profile %d at %.0f MiB resident\n", phase, k, rss)
	})
	return func() {
		stopHeap()
		pprof.StopCPUProfile()
		cpu.Close()
	}
}

// TestProcStatusAllocFree: the benchmark's resident-set sampler reads
// and parses /proc/self/status without allocating, so that it adds no
// garbage to the phase it measures.
func TestProcStatusAllocFree(t *testing.T) {
	var st procStatus
	defer st.close()
	if st.mib("VmRSS:") <= 0 || st.field("VmHWM:") < st.field("VmRSS:") {
		t.Fatalf("VmRSS %.1f, VmHWM %.1f MiB", st.field("VmRSS:"), st.field("VmHWM:"))
	}
	if n := testing.AllocsPerRun(100, func() { st.mib("RssAnon:") }); n != 0 {
		t.Fatalf("%.1f allocations a read of the status, want 0", n)
	}
}
