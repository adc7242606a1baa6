package backup

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// memFile is a run held in memory (io.WriterAt and io.ReaderAt).
type memFile struct{ b []byte }

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if need := int(off) + len(p); need > len(m.b) {
		m.b = append(m.b, make([]byte, need-len(m.b))...)
	}
	copy(m.b[off:], p)
	return len(p), nil
}

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	return bytes.NewReader(m.b).ReadAt(p, off)
}

func randEntries(r *rand.Rand, n, hashLen int) []indexEntry {
	es := make([]indexEntry, n)
	for i := range es {
		for j := 0; j < hashLen; j++ {
			es[i].h[j] = byte(r.Uint32())
		}
		es[i].l = loc{pack: uint32(r.IntN(3)), off: r.Uint32(), len: r.Uint32(), rawOff: r.Uint32(), raw: r.Uint32()}
	}
	return es
}

func sortedUnique(es []indexEntry) []indexEntry {
	x := newChunkIndex()
	x.addBulk(es)
	return x.frozen().sorted
}

func writeTestRun(t testing.TB, es []indexEntry, hashLen int, meta runMeta) *memFile {
	m := &memFile{}
	w := newRunWriter(m, hashLen)
	for _, e := range es {
		if err := w.add(e); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.finish(meta); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestRunFile writes runs of both hash lengths and sizes around a page
// and reads every entry back by lookup, by position and in order; a
// hash absent from the run is not found.
func TestRunFile(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, hashLen := range []int{16, 32} {
		per := runPerPage(hashLen)
		for _, n := range []int{0, 1, per - 1, per, per + 1, 5*per + 7} {
			es := sortedUnique(randEntries(r, n, hashLen))
			meta := runMeta{Repo: "id loc", Packs: make([]PackID, 3), Covered: []string{"index/a", "index/b"}}
			m := writeTestRun(t, es, hashLen, meta)
			var seen []indexEntry
			ru, err := openRun(m, int64(len(m.b)), hashLen, func(e indexEntry) { seen = append(seen, e) })
			if err != nil {
				t.Fatalf("hash %d, %d entries: %v", hashLen, n, err)
			}
			if len(seen) != len(es) || ru.n != int64(len(es)) || fmt.Sprint(ru.meta) != fmt.Sprint(meta) {
				t.Fatalf("hash %d, %d entries: read %d (n %d), meta %v", hashLen, n, len(seen), ru.n, ru.meta)
			}
			page := make([]byte, runPage)
			for i, e := range es {
				if seen[i] != e {
					t.Fatalf("entry %d: %v, want %v", i, seen[i], e)
				}
				p, l, ok, err := ru.find(&e.h, page)
				if err != nil || !ok || l != e.l || p != int64(i) {
					t.Fatalf("find entry %d: %d %v %v %v", i, p, l, ok, err)
				}
				if g, err := ru.entryAt(int64(i), page); err != nil || g != e {
					t.Fatalf("entryAt %d: %v %v", i, g, err)
				}
			}
			it := ru.iter()
			k := 0
			for e, ok := it.next(); ok; e, ok = it.next() {
				if e != es[k] {
					t.Fatalf("iter %d: %v", k, e)
				}
				k++
			}
			if it.err != nil || k != len(es) {
				t.Fatalf("iter: %d entries, %v", k, it.err)
			}
			for _, e := range randEntries(r, 50, hashLen) {
				if _, _, ok, err := ru.find(&e.h, page); ok || err != nil {
					t.Fatalf("absent hash found: %v %v", ok, err)
				}
			}
		}
	}
}

// TestRunFileDamage: a byte changed anywhere in a run — header, a page,
// the keys, the metadata — or the run cut short makes it refused as
// corrupt, never read with wrong entries: at open, or (a page, which
// an open does not read) when that page is read; an open that reads
// every page refuses it.
func TestRunFileDamage(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	es := sortedUnique(randEntries(r, 3*runPerPage(32)+5, 32))
	m := writeTestRun(t, es, 32, runMeta{Repo: "x", Packs: make([]PackID, 3), Covered: []string{"index/a"}})
	good := m.b
	pages := (len(es) + runPerPage(32) - 1) / runPerPage(32)
	keysAt := runPage + pages*runPage
	for _, off := range []int{0, 9, 20, 50, runHeaderLen - 1, runPage + 3, 2*runPage + 100, 3*runPage - 1, 4*runPage + 1, keysAt, keysAt + 8*pages - 1, len(good) - 1} {
		bad := bytes.Clone(good)
		bad[off] ^= 0x40
		if _, err := openRun(&memFile{bad}, int64(len(bad)), 32, func(indexEntry) {}); !errors.Is(err, ErrCorrupt) {
			t.Errorf("byte %d changed, every page read at open: %v, want corrupt", off, err)
		}
		ru, err := openRun(&memFile{bad}, int64(len(bad)), 32, nil)
		if err == nil {
			if off < runPage || off >= keysAt {
				t.Errorf("byte %d changed (not in a page): opened", off)
			}
			it := ru.iter()
			for _, ok := it.next(); ok; _, ok = it.next() {
			}
			if !errors.Is(it.err, ErrCorrupt) {
				t.Errorf("byte %d changed: read whole, %v, want corrupt", off, it.err)
			}
			p := (off - runPage) / runPage
			if _, err := ru.entryAt(int64(p*runPerPage(32)), make([]byte, runPage)); !errors.Is(err, ErrCorrupt) {
				t.Errorf("byte %d changed: entry read from its page: %v, want corrupt", off, err)
			}
		} else if !errors.Is(err, ErrCorrupt) {
			t.Errorf("byte %d changed: %v, want corrupt", off, err)
		}
	}
	for _, n := range []int{0, 100, runPage, 2 * runPage, len(good) - 1} {
		if _, err := openRun(&memFile{good[:n]}, int64(n), 32, nil); err == nil {
			t.Errorf("cut to %d bytes: accepted", n)
		}
	}
	if _, err := openRun(&memFile{good}, int64(len(good)), 16, nil); !errors.Is(err, ErrCorrupt) {
		t.Errorf("read with another hash length: %v", err)
	}
	// A page damaged after the run was opened is refused at lookup.
	ru, err := openRun(&memFile{bytes.Clone(good)}, int64(len(good)), 32, nil)
	if err != nil {
		t.Fatal(err)
	}
	ru.r.(*memFile).b[runPage+10] ^= 1
	if _, _, _, err := ru.find(&es[0].h, make([]byte, runPage)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("lookup in a damaged page: %v", err)
	}
}

// FuzzRunFile: any bytes either are refused or read as a run whose
// every entry is found again by lookup. The seed corpus
// (testdata/fuzz/FuzzRunFile) holds valid runs of both hash lengths.
func FuzzRunFile(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte, long bool) {
		hashLen := 16
		if long {
			hashLen = 32
		}
		var es []indexEntry
		ru, err := openRun(&memFile{b}, int64(len(b)), hashLen, func(e indexEntry) { es = append(es, e) })
		if err != nil {
			return
		}
		page := make([]byte, runPage)
		for i, e := range es {
			p, l, ok, err := ru.find(&e.h, page)
			if err != nil || !ok || l != e.l || p != int64(i) {
				t.Fatalf("entry %d of an accepted run: %d %v %v %v", i, p, l, ok, err)
			}
		}
	})
}

// TestRunFileSeeds keeps the fuzz seed corpus what FuzzRunFile expects:
// valid runs (written again with UMBRA_WRITE_SEEDS=1).
func TestRunFileSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzRunFile")
	r := rand.New(rand.NewPCG(7, 8))
	seeds := map[string][]byte{}
	for _, c := range []struct {
		hashLen, n int
	}{{16, 3}, {32, 2}, {16, 0}, {32, runPerPage(32) + 1}} {
		es := sortedUnique(randEntries(r, c.n, c.hashLen))
		m := writeTestRun(t, es, c.hashLen, runMeta{Repo: "r", Packs: make([]PackID, 3), Covered: []string{"index/x"}})
		seeds[fmt.Sprintf("run-%d-%d", c.hashLen, c.n)] = []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\nbool(%v)\n", m.b, c.hashLen == 32))
	}
	for name, want := range seeds {
		p := filepath.Join(dir, name)
		if os.Getenv("UMBRA_WRITE_SEEDS") == "1" {
			os.MkdirAll(dir, 0o755)
			if err := os.WriteFile(p, want, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		got, err := os.ReadFile(p)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("seed %s is missing or stale (write with UMBRA_WRITE_SEEDS=1): %v", p, err)
		}
	}
}

// TestChunkStore checks the store against a map with a buffer of a few
// entries, so that lookups go through many spilled and merged runs: the
// first place of a chunk is kept, every chunk is found, each gives it
// once, a frozen base numbers them in hash order; with a filter (each
// entry added is looked up) and without (looked up in the buffer only:
// a chunk stored twice is then in two runs until a fold, and len is
// an upper bound).
func TestChunkStore(t *testing.T) {
	for _, filter := range []bool{true, false} {
		t.Run(fmt.Sprintf("filter=%v", filter), func(t *testing.T) { testChunkStore(t, filter) })
	}
}

func testChunkStore(t *testing.T, filter bool) {
	defer set(&bufMax, 100)()
	defer set(&smallBufMax, 100)()
	defer set(&directRunMin, 50)() // batches of 1-300: both paths
	r := rand.New(rand.NewPCG(9, 10))
	s := newChunkStore(32, t.TempDir())
	defer s.close()
	if filter {
		defer set(&minFilterAfter, 0)() // built at the first miss
		defer s.useFilter()()
	}
	model := map[Hash]loc{}
	var all []indexEntry
	for round := range 30 {
		es := randEntries(r, 1+r.IntN(300), 32)
		for i := range es {
			if len(all) > 0 && r.IntN(5) == 0 {
				es[i].h = all[r.IntN(len(all))].h // a chunk stored twice
			}
		}
		s.addMany(es)
		for _, e := range es {
			if _, ok := model[e.h]; !ok {
				model[e.h] = e.l
				all = append(all, e)
			}
		}
		if round%10 == 9 {
			if len(s.runs) > 12 {
				t.Fatalf("%d runs for %d entries: merges do not keep them few", len(s.runs), len(model))
			}
		}
	}
	if s.len() != len(model) && (filter || s.len() < len(model)) {
		t.Fatalf("%d entries, want %d", s.len(), len(model))
	}
	for h, l := range model {
		if g, ok := s.get(h); !ok || g != l {
			t.Fatalf("get: %v %v, want %v", g, ok, l)
		}
	}
	for _, e := range randEntries(r, 100, 32) {
		if _, ok := s.get(e.h); ok {
			t.Fatal("absent chunk found")
		}
	}
	n := 0
	if err := s.each(func(h Hash, l loc) {
		n++
		if model[h] != l {
			t.Fatalf("each: %v at %v, want %v", h, l, model[h])
		}
	}); err != nil || n != len(model) {
		t.Fatalf("each: %d entries, %v", n, err)
	}
	base, err := s.frozen()
	if err != nil {
		t.Fatal(err)
	}
	defer base.unpin()
	want := sortedUnique(all)
	page := make([]byte, runPage)
	for i, e := range want {
		if p, l, ok, err := base.find(&e.h, page); err != nil || !ok || p != int64(i) || l != model[e.h] {
			t.Fatalf("frozen position of entry %d: %d %v %v %v", i, p, l, ok, err)
		}
	}
	if s.failed() != nil {
		t.Fatal(s.failed())
	}
}

// TestBloom: the chunk index's filter finds every hash added, of both
// hash lengths (16-byte keyed hashes leave the rest zero), and lets
// through under 1 % of hashes never added at 16 bits a chunk, and under
// 20 % once it stops growing at four times as many.
func TestBloom(t *testing.T) {
	for _, hashLen := range []int{16, 32} {
		r := rand.New(rand.NewPCG(51, uint64(hashLen)))
		for _, c := range []struct {
			n, sizedFor int
			maxFP       float64
		}{{1 << 16, 1 << 16, 0.01}, {1 << 17, 1 << 15, 0.20}} {
			f := newBloom(int64(c.sizedFor))
			es := randEntries(r, c.n, hashLen)
			for i := range es {
				f.add(&es[i].h)
			}
			for i := range es {
				if !f.has(&es[i].h) {
					t.Fatalf("hash length %d: entry %d added, not found", hashLen, i)
				}
			}
			fp := 0
			others := randEntries(r, 1<<18, hashLen)
			for i := range others {
				if f.has(&others[i].h) {
					fp++
				}
			}
			if rate := float64(fp) / float64(len(others)); rate > c.maxFP {
				t.Errorf("hash length %d, %d chunks in a filter of %d bytes: %.2f %% false positives, want at most %.0f %%", hashLen, c.n, f.bytes(), 100*rate, 100*c.maxFP)
			}
		}
	}
}

// BenchmarkBloomAdd: building the filter of a 4 Mi-chunk index (at
// open, from the local index cache).
func BenchmarkBloomAdd(b *testing.B) {
	es := randEntries(rand.New(rand.NewPCG(1, 1)), 4<<20, 32)
	b.ResetTimer()
	for range b.N {
		f := newBloom(int64(len(es)))
		for i := range es {
			f.add(&es[i].h)
		}
	}
}

// TestRunKeysNotCopied: a run's page keys (8 bytes a page: 1.7 MiB at
// 16 Mi chunks) are written and read through a small buffer, not
// encoded or read whole as one more copy of them, which every open of
// the local index cache and every write of a run held beside the keys.
func TestRunKeysNotCopied(t *testing.T) {
	const hashLen = 32
	pages := 8192
	n := pages * runPerPage(hashLen)
	fill := func(w *runWriter) {
		for i := range n {
			var e indexEntry
			binary.BigEndian.PutUint64(e.h[:8], uint64(i)*(math.MaxUint64/uint64(n)))
			e.h[8] = byte(i)
			if err := w.add(e); err != nil {
				t.Fatal(err)
			}
		}
	}
	m := &memFile{}
	w := newRunWriter(m, hashLen)
	fill(w)
	if _, err := w.finish(runMeta{Packs: []PackID{{}}}); err != nil {
		t.Fatal(err)
	}
	// Again into a file of its size, so that only finish allocates.
	m2 := &memFile{b: make([]byte, len(m.b))}
	w = newRunWriter(m2, hashLen)
	fill(w)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if _, err := w.finish(runMeta{Packs: []PackID{{}}}); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if got := after.TotalAlloc - before.TotalAlloc; got > 16<<10 {
		t.Errorf("finishing a run of %d pages allocated %d bytes: want under 16 KiB (its keys not copied)", pages, got)
	}
	runtime.ReadMemStats(&before)
	r, err := openRun(m2, int64(len(m2.b)), hashLen, nil)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := after.TotalAlloc-before.TotalAlloc, uint64(8*pages+32<<10); got > want {
		t.Errorf("opening a run of %d pages allocated %d bytes: want under %d (its keys and a small buffer)", pages, got, want)
	}
	buf := make([]byte, runPage)
	for _, i := range []int{0, 1, n / 2, n - 1} {
		var h Hash
		binary.BigEndian.PutUint64(h[:8], uint64(i)*(math.MaxUint64/uint64(n)))
		h[8] = byte(i)
		if p, _, ok, err := r.find(&h, buf); !ok || err != nil || p != int64(i) {
			t.Fatalf("entry %d: at %d, %v, %v", i, p, ok, err)
		}
	}
}

// TestRunKeysFourBytes: a run keeps 4 bytes a page in memory (its
// pages' first hashes' top 32 bits: 0.8 MiB at 16 Mi chunks, where the
// whole keys were 1.7), and lookups stay exact where many pages'
// hashes share those bits: every entry is found at its position, and
// hashes between them are not.
func TestRunKeysFourBytes(t *testing.T) {
	const hashLen = 32
	per := runPerPage(hashLen)
	pages := 4096
	n := pages * per
	// Entry i: its top 32 bits are i/(3*per) (ties across three pages
	// and a part), the next 32 i's odd number, so that 2i is between
	// entries.
	hash := func(i, mid int) (h Hash) {
		binary.BigEndian.PutUint32(h[:4], uint32(i/(3*per+per/2)))
		binary.BigEndian.PutUint32(h[4:8], uint32(mid))
		return h
	}
	m := &memFile{}
	w := newRunWriter(m, hashLen)
	for i := range n {
		if err := w.add(indexEntry{h: hash(i, 2*i+1), l: loc{off: uint32(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.finish(runMeta{Packs: []PackID{{}}}); err != nil {
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	r, err := openRun(m, int64(len(m.b)), hashLen, nil)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := after.TotalAlloc-before.TotalAlloc, uint64(4*pages+24<<10); got > want {
		t.Errorf("opening a run of %d pages allocated %d bytes: want under %d (4 bytes a page and a small buffer)", pages, got, want)
	}
	buf := make([]byte, runPage)
	for i := 0; i < n; i += 7 {
		h := hash(i, 2*i+1)
		if p, l, ok, err := r.find(&h, buf); !ok || err != nil || p != int64(i) || l.off != uint32(i) {
			t.Fatalf("entry %d: at %d (%d), %v, %v", i, p, l.off, ok, err)
		}
		h = hash(i, 2*i)
		if _, _, ok, err := r.find(&h, buf); ok || err != nil {
			t.Fatalf("a hash before entry %d: found %v, %v", i, ok, err)
		}
	}
	h := hash(n-1, 2*n+1)
	if _, _, ok, err := r.find(&h, buf); ok || err != nil {
		t.Fatalf("a hash past the last entry: found %v, %v", ok, err)
	}
}
