package cow

import (
	"math"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// storeMap is a read-only shared mapping of a diff-area file in memory
// (tmpfs, ramfs: see mapRead) that slot reads copy from instead of
// calling pread: a snapshot read whose span mixes the origin with
// scattered preserved chunks reads one slot per preserved chunk, and on
// these machines a 4 KiB pread costs ~1.2 µs against ~0.2 µs for the copy
// (BenchmarkDeepRead); a long run of slots copies at 4.1-4.6 GB/s where
// pread, page by page through tmpfs, reads 3.1-3.3 GB/s, faults on pages
// not yet mapped included (BenchmarkReadPending, each region read once).
// The mapping reserves address space only; the
// pages are the page cache's, which pread reads too. Three rules keep it
// safe:
//   - only bytes the file is known to hold are copied (size, refreshed
//     with fstat when a read goes past it; the file only shrinks when the
//     store is reset, which sets it back to zero first);
//   - a copy that faults anyway (the file cut short behind the engine's
//     back) panics instead of killing the process
//     (debug.SetPanicOnFault), is recovered, and the read falls back to
//     pread, which reports what is there;
//   - the mapping is removed only when no reader is in it (close takes
//     the lock readers hold shared).
//
// Pages a read touched stay mapped and count in the process's resident
// set; see trimDue for when the mapping's page-table entries are dropped
// (MADV_DONTNEED on a shared file mapping leaves the page cache as it
// is), so the service's RSS does not grow with its diff areas.
type storeMap struct {
	mu     sync.RWMutex // shared while copying; exclusive to unmap
	b      []byte       // nil: no mapping (not a file in memory, or mmap failed)
	size   atomic.Int64 // bytes of the file known to exist
	copied atomic.Int64 // bytes copied from the mapping, ever
	faults atomic.Int64 // copies that faulted and fell back to pread
}

const (
	// storeMapBytes is how much of the diff-area file is mapped; slots
	// beyond it are read with pread.
	storeMapBytes = 64 << 30
)

// Pages the kernel or a copy touched through a mapping (the diff area's
// here, the origin's in Volume.MappedRange) stay mapped and count in the
// process's resident set — and a large RSS makes the service the OOM
// killer's first choice. So every trimEvery bytes a mapping lends, it
// looks at the process's resident file pages and, past mapBudget, drops
// its page-table entries. Dropping them costs the next reads a page
// fault per 64 KiB (fault-around) and every core a TLB flush: dropping
// every 64 MiB whatever the resident size cost four clients reading the
// same 512 MiB a fifth of their throughput (measured 2026-12-03), and at every
// loan a third. mapBudget is a sixteenth of RAM, at least 64 MiB.
// (Variables: tests make them small.)
var (
	trimEvery int64 = 64 << 20
	mapBudget       = defaultMapBudget()
)

func defaultMapBudget() int64 {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 64 << 20
	}
	return max(int64(si.Totalram)*int64(si.Unit)/16, 64<<20)
}

// trimDue reports whether a mapping that has now lent t bytes, n of them
// just now, should drop its page-table entries (see mapBudget).
func trimDue(t, n int64) bool {
	if t/trimEvery == (t-n)/trimEvery {
		return false
	}
	return residentFilePages() > mapBudget
}

// residentFilePages is the process's resident file and shared-memory
// pages in bytes (the third field of /proc/self/statm), or MaxInt64
// when it cannot be read: then every mapping trims, as if over budget.
func residentFilePages() int64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return math.MaxInt64
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return math.MaxInt64
	}
	pages, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		return math.MaxInt64
	}
	return pages * int64(os.Getpagesize())
}

// mapper is a File that can be mapped for reading.
type mapper interface {
	mapRead(n int) ([]byte, error)
}

// mapRead maps a file in memory (tmpfs, ramfs) only: on a disk a copy
// from a page not cached would wait for the disk inside a page fault,
// holding one of the Go scheduler's processors the whole time, where a
// pread lets the runtime hand it to another goroutine.
func (f osFile) mapRead(n int) ([]byte, error) {
	if f.nowait.Load() != nowaitMemory {
		return nil, unix.ENODEV
	}
	return unix.Mmap(int(f.Fd()), 0, n, unix.PROT_READ, unix.MAP_SHARED)
}

// newStoreMap maps f if it can be; a store without a mapping reads with
// pread only.
func newStoreMap(f File) *storeMap {
	m := &storeMap{}
	if mf, ok := f.(mapper); ok {
		if b, err := mf.mapRead(storeMapBytes); err == nil {
			m.b = b
		}
	}
	return m
}

// read copies p from the file at off when it can; false means the
// caller reads with pread.
func (m *storeMap) read(f File, p []byte, off int64) bool {
	end := off + int64(len(p))
	if m.b == nil || off < 0 || end > int64(len(m.b)) {
		return false
	}
	if end > m.size.Load() {
		n, err := f.Size()
		if err != nil || end > n {
			return false // past the end: pread says what is there
		}
		m.size.Store(n)
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.b == nil {
		return false
	}
	if !copyMapped(p, m.b[off:end]) {
		m.faults.Add(1)
		return false
	}
	if trimDue(m.copied.Add(int64(len(p))), int64(len(p))) {
		_ = unix.Madvise(m.b, unix.MADV_DONTNEED)
	}
	return true
}

// copyMapped copies src, part of a mapping, to dst; false when touching
// src faulted.
func copyMapped(dst, src []byte) (ok bool) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if recover() != nil {
			ok = false
		}
	}()
	copy(dst, src)
	return true
}

// truncated tells the map the file was cut to zero.
func (m *storeMap) truncated() { m.size.Store(0) }

// close removes the mapping once no read is in it.
func (m *storeMap) close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.b != nil {
		_ = unix.Munmap(m.b)
		m.b = nil
	}
}
