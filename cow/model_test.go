package cow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"umbra/internal/testutil"
	"umbra/provider"
)

// The model-based test drives a volume on the fault-injecting FS with
// random operations — writes anywhere, snapshots (persistent or not),
// deletes at any position, reads of everything, reverts, flushes, backup
// cursors, storage limits, clean reopen and power loss — and checks it
// against an in-memory model after every step.
//
// UMBRA_SEED=n replays one seed; UMBRA_LONG=1 runs 10 000+ crash points.

type modelSnap struct {
	id         string
	persistent bool
	content    []byte
	cursor     int64 // bytes: chunks wholly below are released
	invalid    bool
}

type modelRun struct {
	t       *testing.T
	r       *rand.Rand
	fs      *faultFS
	v       *Volume
	opts    Options
	size    int64
	chunk   int64
	origin  []byte
	flushed []byte     // origin content known durable
	since   [][2]int64 // writes since the last flush: [off, len]
	sinceB  [][]byte
	snaps   []*modelSnap
	nextID  int
	crashes int
	step    int
}

const (
	modelOrigin = "/vol/origin"
	modelDiff   = "/diff"
)

func (m *modelRun) fatalf(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf("step %d: %s", m.step, fmt.Sprintf(format, args...))
}

func (m *modelRun) open() {
	m.t.Helper()
	v, err := Open("m", modelOrigin, m.opts)
	if err != nil {
		m.fatalf("open: %v", err)
	}
	if errs := v.RecoveryErrors(); len(errs) > 0 {
		m.fatalf("recovery errors without injected damage: %v", errs)
	}
	m.v = v
}

// sync reconciles the model with the engine's list: snapshots the policy
// deleted leave the model (only allowed under a storage limit), invalid
// ones are marked.
func (m *modelRun) sync() {
	m.t.Helper()
	list := m.v.Snapshots()
	byID := map[string]provider.Snapshot{}
	for _, s := range list {
		byID[s.ID] = s
	}
	kept := m.snaps[:0]
	for _, s := range m.snaps {
		e, ok := byID[s.id]
		if !ok {
			if m.opts.MaxStorage == 0 {
				m.fatalf("snapshot %s vanished with no storage limit", s.id)
			}
			continue
		}
		if !e.Valid {
			if e.Reason == "" {
				m.fatalf("snapshot %s invalid without a reason", s.id)
			}
			s.invalid = true
		}
		delete(byID, s.id)
		kept = append(kept, s)
	}
	m.snaps = kept
	if len(byID) > 0 {
		m.fatalf("engine lists snapshots the model does not know: %v", byID)
	}
}

func (m *modelRun) checkAll() {
	m.t.Helper()
	m.sync()
	got := make([]byte, m.size)
	if _, err := m.v.ReadAt(got, 0); err != nil {
		m.fatalf("read origin: %v", err)
	}
	if !bytes.Equal(got, m.origin) {
		m.fatalf("origin differs from the model at byte %d", firstDiff(got, m.origin))
	}
	for _, s := range m.snaps {
		m.checkSnap(s)
	}
	m.checkSpace()
}

func (m *modelRun) checkSnap(s *modelSnap) {
	m.t.Helper()
	h, err := m.v.OpenSnapshot(s.id)
	if err != nil {
		m.fatalf("open snapshot %s: %v", s.id, err)
	}
	defer h.Close()
	start := (s.cursor / m.chunk) * m.chunk
	buf := make([]byte, m.size-start)
	_, err = h.ReadAt(buf, start)
	if s.invalid {
		if !errors.Is(err, provider.ErrSnapshotInvalid) {
			m.fatalf("invalid snapshot %s read: %v, want ErrSnapshotInvalid", s.id, err)
		}
		return
	}
	if err != nil {
		m.fatalf("read snapshot %s from %d: %v", s.id, start, err)
	}
	if !bytes.Equal(buf, s.content[start:]) {
		m.fatalf("snapshot %s differs from its commit point at byte %d", s.id, start+int64(firstDiff(buf, s.content[start:])))
	}
	if start >= m.chunk {
		if _, err := h.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrReleased) {
			m.fatalf("read behind the cursor of %s: %v, want ErrReleased", s.id, err)
		}
	}
	// Tracking never misses a change.
	bm, reliable, err := m.v.Changed(s.id, "")
	if err != nil {
		m.fatalf("changed since %s: %v", s.id, err)
	}
	if reliable {
		for c := int64(0); c*m.chunk < m.size; c++ {
			lo, hi := c*m.chunk, min((c+1)*m.chunk, m.size)
			if lo < start {
				continue
			}
			if !bytes.Equal(s.content[lo:hi], m.origin[lo:hi]) && !bm.Set(c) {
				m.fatalf("tracking since %s misses changed chunk %d", s.id, c)
			}
		}
	}
}

// checkSpace: the allocator's used slots are exactly those entries hold,
// and every entry belongs to the owned set of the live snapshot of its
// generation, which owns nothing else (usersAbove relies on it).
func (m *modelRun) checkSpace() {
	m.t.Helper()
	v := m.v
	v.mu.RLock()
	defer v.mu.RUnlock()
	perGen := map[uint64]uint64{}
	v.entries.Ascend(func(e entry) bool {
		if s := v.snapByGen(e.gen); s == nil || !s.owned.Contains(uint32(e.chunk)) {
			m.fatalf("entry %+v not owned by a live snapshot of its generation", e)
		}
		perGen[e.gen]++
		return true
	})
	for _, s := range v.snaps {
		if n := s.owned.GetCardinality(); n != perGen[s.gen] {
			m.fatalf("snapshot %s owns %d chunks and has %d entries", s.id, n, perGen[s.gen])
		}
	}
	if v.store == nil {
		return
	}
	slots := map[int64]bool{}
	v.entries.Ascend(func(e entry) bool {
		if e.slot != zeroSlot {
			if slots[e.slot] {
				m.fatalf("slot %d referenced twice", e.slot)
			}
			slots[e.slot] = true
		}
		return true
	})
	if int64(len(slots)) != v.store.used() {
		m.fatalf("diff area leak: %d slots used, %d referenced", v.store.used(), len(slots))
	}
	if max := v.maxSlots(); max > 0 && v.store.used() > max {
		m.fatalf("diff area over its limit: %d slots > %d", v.store.used(), max)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func (m *modelRun) write() {
	off := m.r.Int64N(m.size)
	n := 1 + m.r.Int64N(min(3*m.chunk, m.size-off))
	if m.r.IntN(4) == 0 { // whole chunks, sometimes
		off = off / m.chunk * m.chunk
		n = min(m.chunk*(1+m.r.Int64N(3)), m.size-off)
	}
	p := make([]byte, n)
	if m.r.IntN(5) > 0 {
		for i := range p {
			p[i] = byte(m.r.Uint32())
		}
	}
	if os.Getenv("UMBRA_TRACE") != "" {
		m.t.Logf("write [%d,+%d) chunks %d-%d", off, n, off/m.chunk, (off+n-1)/m.chunk)
	}
	if _, err := m.v.WriteAt(p, off); err != nil {
		m.fatalf("write [%d,+%d): %v", off, n, err)
	}
	copy(m.origin[off:], p)
	m.since = append(m.since, [2]int64{off, n})
	m.sinceB = append(m.sinceB, p)
}

func (m *modelRun) trim() {
	off := m.r.Int64N(m.size)
	n := 1 + m.r.Int64N(min(2*m.chunk, m.size-off))
	if err := m.v.Trim(off, n); err != nil {
		m.fatalf("trim: %v", err)
	}
	z := make([]byte, n)
	copy(m.origin[off:], z)
	m.since = append(m.since, [2]int64{off, n})
	m.sinceB = append(m.sinceB, z)
}

func (m *modelRun) snapshot() {
	if len(m.snaps) >= 12 {
		return
	}
	m.nextID++
	id := "s" + strconv.Itoa(m.nextID)
	persistent := m.r.IntN(2) == 0
	if _, err := m.v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: id, Persistent: persistent}); err != nil {
		m.fatalf("create snapshot: %v", err)
	}
	if persistent { // commit flushed the origin
		m.flush()
	}
	m.snaps = append(m.snaps, &modelSnap{id: id, persistent: persistent, content: append([]byte(nil), m.origin...)})
}

func (m *modelRun) delete() {
	if len(m.snaps) == 0 {
		return
	}
	i := m.r.IntN(len(m.snaps))
	if err := m.v.DeleteSnapshot(m.snaps[i].id); err != nil {
		m.fatalf("delete %s: %v", m.snaps[i].id, err)
	}
	m.snaps = append(m.snaps[:i], m.snaps[i+1:]...)
}

func (m *modelRun) flush() {
	if err := m.v.Flush(); err != nil {
		m.fatalf("flush: %v", err)
	}
	m.flushed = append(m.flushed[:0], m.origin...)
	m.since, m.sinceB = nil, nil
}

func (m *modelRun) revert() {
	m.sync()
	var cands []int
	for i, s := range m.snaps {
		if !s.invalid && s.cursor < m.chunk {
			cands = append(cands, i)
		}
	}
	if len(cands) == 0 {
		return
	}
	i := cands[m.r.IntN(len(cands))]
	s := m.snaps[i]
	if os.Getenv("UMBRA_TRACE") != "" {
		m.t.Logf("revert to %s", s.id)
	}
	if err := m.v.Revert(s.id); err != nil {
		m.fatalf("revert to %s: %v", s.id, err)
	}
	m.snaps = m.snaps[:i+1]
	m.origin = append(m.origin[:0], s.content...)
	m.flushed = append(m.flushed[:0], s.content...) // revert flushes
	m.since, m.sinceB = nil, nil
}

func (m *modelRun) cursor() {
	if len(m.snaps) == 0 {
		return
	}
	s := m.snaps[m.r.IntN(len(m.snaps))]
	off := m.r.Int64N(m.size)
	h, err := m.v.OpenSnapshot(s.id)
	if err != nil {
		m.fatalf("open %s: %v", s.id, err)
	}
	h.SetCursor(off)
	h.Close()
	if os.Getenv("UMBRA_TRACE") != "" {
		m.t.Logf("cursor %s at %d", s.id, off)
	}
	s.cursor = max(s.cursor, off)
}

func (m *modelRun) setMax() {
	var limit int64
	if m.r.IntN(3) > 0 {
		limit = m.chunk * (2 + m.r.Int64N(12))
	}
	if err := m.v.SetMaxStorage(limit); err != nil {
		m.fatalf("set max storage %d: %v", limit, err)
	}
	m.opts.MaxStorage = limit
	m.sync()
}

func (m *modelRun) reopen() {
	if err := m.v.Close(); err != nil {
		m.fatalf("close: %v", err)
	}
	m.open()
	m.flushed = append(m.flushed[:0], m.origin...)
	m.since, m.sinceB = nil, nil
	m.afterRestart(true)
}

// afterRestart: non-persistent snapshots are gone, persistent ones stay.
func (m *modelRun) afterRestart(clean bool) {
	var kept []*modelSnap
	for _, s := range m.snaps {
		if s.persistent {
			kept = append(kept, s)
		}
	}
	m.snaps = kept
	list := m.v.Snapshots()
	if len(list) != len(m.snaps) {
		m.fatalf("after restart the engine lists %d snapshots, the model %d persistent ones", len(list), len(m.snaps))
	}
	for i, s := range m.snaps {
		if list[i].ID != s.id {
			m.fatalf("after restart snapshot %d is %s, want %s", i, list[i].ID, s.id)
		}
		if !clean && s.cursor >= m.chunk && list[i].Valid {
			m.fatalf("snapshot %s had an active cursor at an unclean stop but is still valid", s.id)
		}
		if !clean {
			if _, reliable, err := m.v.Changed(s.id, ""); err != nil || reliable {
				m.fatalf("tracking of %s after an unclean stop: reliable=%v err=%v", s.id, reliable, err)
			}
		}
	}
}

func (m *modelRun) crash() {
	m.crashes++
	if st := m.v.store; st != nil {
		st.wb.drain() // the power goes after the batch in flight (its order is the flusher's)
	}
	m.fs.Crash(m.r)
	abandon(m.v)
	m.restarted()
}

// restarted opens the volume after a power loss and checks the origin.
func (m *modelRun) restarted() {
	m.open()
	data, _ := m.fs.Get(modelOrigin)
	// Every byte holds the flushed value or one written since.
	for i := range m.size {
		if data[i] == m.flushed[i] {
			continue
		}
		ok := false
		for k, w := range m.since {
			if i >= w[0] && i < w[0]+w[1] && m.sinceB[k][i-w[0]] == data[i] {
				ok = true
				break
			}
		}
		if !ok {
			m.fatalf("after power loss origin byte %d is %d: neither flushed (%d) nor written since", i, data[i], m.flushed[i])
		}
	}
	m.origin = data
	m.flushed = append(m.flushed[:0], data...)
	m.since, m.sinceB = nil, nil
	m.afterRestart(false)
}

// crashInWrite loses power in the middle of a write: at one of the
// syncs it makes (a persistent snapshot's copies and their mapping
// records being made durable), with whatever of its unsynced writes
// reached the disk. The write was never acknowledged: the origin holds
// its bytes or not, and every snapshot still reads its commit point.
func (m *modelRun) crashInWrite() {
	if m.opts.MaxStorage != 0 {
		return // the policy may delete snapshots mid-write; crash covers it
	}
	off := m.r.Int64N(m.size)
	n := 1 + m.r.Int64N(min(3*m.chunk, m.size-off))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(m.r.Uint32())
	}
	if st := m.v.store; st != nil {
		st.wb.drain()
	}
	m.fs.CrashAtSync(1+m.r.IntN(3), m.r)
	_, err := m.v.WriteAt(p, off)
	if !m.fs.Crashed() {
		if err != nil {
			m.fatalf("write [%d,+%d): %v", off, n, err)
		}
		copy(m.origin[off:], p)
		m.since = append(m.since, [2]int64{off, n})
		m.sinceB = append(m.sinceB, p)
		return
	}
	m.crashes++
	if os.Getenv("UMBRA_TRACE") != "" {
		m.t.Logf("power lost during write [%d,+%d): %v", off, n, err)
	}
	abandon(m.v)
	m.since = append(m.since, [2]int64{off, n}) // its bytes may have reached the origin
	m.sinceB = append(m.sinceB, p)
	m.restarted()
}

func runModel(t *testing.T, seed uint64, steps int, policy Policy) (crashes int) {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	oldPiece, oldBatch, oldDelay, oldGap, oldZero := writePiece, wbBatchBytes, wbDelay, originGap, zeroBatch
	defer func() {
		writePiece, wbBatchBytes, wbDelay, originGap, zeroBatch = oldPiece, oldBatch, oldDelay, oldGap, oldZero
	}()
	// Persistent copies reserve and zero the diff area's next slots one
	// to four at a time, interleaved with copies, frees and the policy.
	zeroBatch = 4096 * int64(1+seed%4)
	// Snapshot reads take the origin run by run, or across every gap.
	switch seed / 3 % 3 {
	case 1:
		originGap = 0
	case 2:
		originGap = 1 << 40
	}
	// A full batch or a drain writes the write-behind, never a timer, so
	// a seed replays the same file operations.
	wbDelay = time.Hour
	switch seed % 3 {
	case 1: // writes in one-chunk pieces
		writePiece = 4096
	case 2: // two chunks a batch, one a run
		wbBatchBytes = 1
	}
	ffs := newFaultFS()
	const chunk = 4096
	size := chunk*(4+r.Int64N(28)) - r.Int64N(3)*512 // sometimes a short last chunk
	ffs.Put(modelOrigin, make([]byte, size))
	m := &modelRun{
		t: t, r: r, fs: ffs, size: size, chunk: chunk,
		opts:    Options{ChunkSize: chunk, StorageDir: modelDiff, Policy: policy, FS: ffs},
		origin:  make([]byte, size),
		flushed: make([]byte, size),
	}
	m.open()
	defer func() { m.v.Close() }()
	trace := os.Getenv("UMBRA_TRACE") != ""
	for m.step = 0; m.step < steps; m.step++ {
		k := r.IntN(100)
		if trace {
			t.Logf("step %d op %d snaps %d", m.step, k, len(m.snaps))
		}
		switch {
		case k < 40:
			m.write()
		case k < 44:
			m.trim()
		case k < 54:
			m.snapshot()
		case k < 61:
			m.delete()
		case k < 67:
			m.flush()
		case k < 69:
			m.revert()
		case k < 72:
			m.cursor()
		case k < 75:
			m.setMax()
		case k < 79:
			m.reopen()
		case k < 83:
			m.crash()
		case k < 85:
			m.crashInWrite()
		default:
			m.checkAll()
		}
		m.sync()
		m.checkSpace()
		if trace {
			m.v.mu.RLock()
			for _, sn := range m.v.snaps {
				t.Logf("  engine %s gen %d persistent %v cursor %v/%d invalid %q", sn.id, sn.gen, sn.persistent, sn.hasCursor, sn.cursor, sn.invalid)
			}
			m.v.entries.Ascend(func(e entry) bool {
				t.Logf("  entry %+v", e)
				return true
			})
			m.v.mu.RUnlock()
		}
	}
	m.checkAll()
	return m.crashes
}

func TestModel(t *testing.T) {
	seeds, steps := 40, 300
	if os.Getenv("UMBRA_LONG") != "" {
		seeds, steps = 400, 500 // ~12 000 crash points
	}
	base, seeds := testutil.Seeds(t, seeds)
	crashes := 0
	for i := range seeds {
		seed := base + uint64(i)
		for _, policy := range []Policy{PolicyDeleteOldest, PolicyInvalidate} {
			ok := t.Run(fmt.Sprintf("seed=%d/%s", seed, policy), func(t *testing.T) {
				crashes += runModel(t, seed, steps, policy)
			})
			if !ok {
				t.Fatalf("replay with UMBRA_SEED=%d", seed)
			}
		}
	}
	t.Logf("%d crash points", crashes)
}
