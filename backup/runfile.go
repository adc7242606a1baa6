package backup

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"sort"
	"sync"
	"sync/atomic"
)

// A run is a sorted, immutable file of chunk index entries (runfile
// version 2, docs/formats.md "Local index cache"): a 4 KiB header, then
// 4 KiB pages of fixed-size entries in increasing hash order, each page
// ending with its entry count and a CRC-32C, then the keys (the top 64
// bits of every page's first hash), then the metadata (pack table, the
// index objects the run covers, the repository it belongs to); the
// keys' and the metadata's SHA-256 are in the header. Lookups read one
// page with pread after a binary search over the keys' top 32 bits,
// which is all a run keeps in memory (4 bytes a page, ~0.05 byte a
// chunk: 0.8 MiB at 16 Mi chunks; the whole keys were twice that, the
// largest thing verify, prune and stats held that grew with the
// index). Pages whose keys tie on those bits (one in ~2^32/pages) are
// all searched, so a lookup is as exact as with whole keys. Pages are
// read with pread rather than through a mapping: mapped pages a lookup
// touched count in the process's resident set, read pages stay in the
// page cache, which the kernel shares and reclaims.
//
// Opening a run reads its header, keys and metadata, not its pages:
// each page is checked when read (its checksum, its count, its first
// key, the order of its entries, pack numbers within the pack table),
// so that opening the local index cache costs the same at any size (it
// read and checked all of it: ~870 MiB at 16 Mi chunks). Version 1 had
// no keys: such a run is read whole at open, and the cache written
// again.
const (
	runMagic    = "UMBRARUN"
	runVersion  = 2
	runPage     = 4096
	runPageTail = 8 // u32 entries, u32 CRC-32C of the rest of the page
	placeBytes  = 20
	// maxRunMeta bounds the metadata a run's header may announce.
	maxRunMeta = 64 << 20
)

// runMeta is what a run says besides its entries. Temporary runs (a
// backup's spilled entries) have none.
type runMeta struct {
	Repo    string   // the repository's ID and location
	Packs   []PackID // loc.pack numbers index this table
	Covered []string // index objects whose entries the run holds
}

func runEntrySize(hashLen int) int { return hashLen + placeBytes }
func runPerPage(hashLen int) int   { return (runPage - runPageTail) / runEntrySize(hashLen) }

// runWriter writes a run; entries come in strictly increasing hash order.
type runWriter struct {
	w       io.WriterAt
	bw      *bufio.Writer
	hashLen int
	page    []byte
	inPage  int
	// The first hash's top 64 bits of every page written: the top 32
	// (the run's keys in memory) and the rest, until finish.
	keys, keysLo []uint32
	n            int64
	last         Hash
	err          error
}

type offsetWriter struct {
	w   io.WriterAt
	off int64
}

func (o *offsetWriter) Write(p []byte) (int, error) {
	n, err := o.w.WriteAt(p, o.off)
	o.off += int64(n)
	return n, err
}

// runWriters and runReaders are the 256 KiB buffers runs are written
// and merged through, shared from run to run: the runs an open (or
// prune reading back the index it wrote: 512 objects at 16 Mi chunks)
// makes of the index objects it loads, one for each 16 Ki entries, and
// their tiered merges, about as many, took three new ones each: ~0.75
// GiB to collect at 16 Mi chunks, 50 MiB at 1 Mi.
var (
	runWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, runBufSize) }}
	runReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, runBufSize) }}
)

const runBufSize = 256 << 10

func newRunWriter(w io.WriterAt, hashLen int) *runWriter {
	bw := runWriters.Get().(*bufio.Writer)
	bw.Reset(&offsetWriter{w: w, off: runPage})
	return &runWriter{w: w, bw: bw, hashLen: hashLen, page: make([]byte, runPage)}
}

// release gives the writer's buffer back for another run; rw is not
// used after.
func (rw *runWriter) release() {
	if rw.bw != nil {
		rw.bw.Reset(nil)
		runWriters.Put(rw.bw)
		rw.bw = nil
	}
}

func (rw *runWriter) add(e indexEntry) error {
	if rw.err != nil {
		return rw.err
	}
	if rw.n > 0 && cmpHash(&e.h, &rw.last) <= 0 {
		rw.err = fmt.Errorf("index run: entries out of order")
		return rw.err
	}
	rw.last = e.h
	per := runPerPage(rw.hashLen)
	if rw.inPage == 0 {
		t := top64(&e.h)
		rw.keys, rw.keysLo = append(rw.keys, uint32(t>>32)), append(rw.keysLo, uint32(t))
	}
	putRunEntry(rw.page[rw.inPage*runEntrySize(rw.hashLen):], e, rw.hashLen)
	rw.inPage++
	rw.n++
	if rw.inPage == per {
		rw.flushPage()
	}
	return rw.err
}

func putRunEntry(b []byte, e indexEntry, hashLen int) {
	copy(b, e.h[:hashLen])
	p := b[hashLen:]
	binary.LittleEndian.PutUint32(p, e.l.pack)
	binary.LittleEndian.PutUint32(p[4:], e.l.off)
	binary.LittleEndian.PutUint32(p[8:], e.l.len)
	binary.LittleEndian.PutUint32(p[12:], e.l.rawOff)
	binary.LittleEndian.PutUint32(p[16:], e.l.raw)
}

func getRunEntry(b []byte, hashLen int) (e indexEntry) {
	copy(e.h[:], b[:hashLen])
	p := b[hashLen:]
	e.l = loc{pack: binary.LittleEndian.Uint32(p), off: binary.LittleEndian.Uint32(p[4:]), len: binary.LittleEndian.Uint32(p[8:]),
		rawOff: binary.LittleEndian.Uint32(p[12:]), raw: binary.LittleEndian.Uint32(p[16:])}
	return e
}

func (rw *runWriter) flushPage() {
	clear(rw.page[rw.inPage*runEntrySize(rw.hashLen) : runPage-runPageTail])
	binary.LittleEndian.PutUint32(rw.page[runPage-8:], uint32(rw.inPage))
	binary.LittleEndian.PutUint32(rw.page[runPage-4:], crc32.Checksum(rw.page[:runPage-4], castagnoli))
	if _, err := rw.bw.Write(rw.page); err != nil && rw.err == nil {
		rw.err = err
	}
	rw.inPage = 0
}

// finish writes the metadata and the header; the run is then complete.
func (rw *runWriter) finish(meta runMeta) (*run, error) {
	if rw.inPage > 0 {
		rw.flushPage()
	}
	if rw.err != nil {
		return nil, rw.err
	}
	// The keys go out through the write buffer and their hash, not as
	// one more copy of them (1.7 MiB at 16 Mi chunks).
	ks := sha256.New()
	var kb [8]byte
	for i, k := range rw.keys {
		binary.LittleEndian.PutUint64(kb[:], uint64(k)<<32|uint64(rw.keysLo[i]))
		ks.Write(kb[:])
		if _, err := rw.bw.Write(kb[:]); err != nil {
			return nil, err
		}
	}
	m := encodeRunMeta(meta)
	if _, err := rw.bw.Write(m); err != nil {
		return nil, err
	}
	if err := rw.bw.Flush(); err != nil {
		return nil, err
	}
	pages := int64(len(rw.keys))
	rw.keysLo = nil
	var keysSum [sha256.Size]byte
	ks.Sum(keysSum[:0])
	h := makeRunHeader(rw.hashLen, rw.n, pages, keysSum, m)
	if _, err := rw.w.WriteAt(h, 0); err != nil {
		return nil, err
	}
	return &run{r: rw.w.(io.ReaderAt), hashLen: rw.hashLen, n: rw.n, keys: rw.keys, meta: meta}, nil
}

func encodeRunMeta(m runMeta) []byte {
	var b []byte
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.Repo)))
	b = append(b, m.Repo...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.Packs)))
	for _, p := range m.Packs {
		b = append(b, p[:]...)
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.Covered)))
	for _, c := range m.Covered {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(c)))
		b = append(b, c...)
	}
	return b
}

func decodeRunMeta(b []byte) (runMeta, error) {
	var m runMeta
	bad := errors.New("index run: bad metadata")
	take := func(n int) ([]byte, bool) {
		if n < 0 || n > len(b) {
			return nil, false
		}
		v := b[:n]
		b = b[n:]
		return v, true
	}
	u32 := func() (int, bool) {
		v, ok := take(4)
		if !ok {
			return 0, false
		}
		return int(binary.LittleEndian.Uint32(v)), true
	}
	n, ok := u32()
	s, ok2 := take(n)
	if !ok || !ok2 {
		return m, bad
	}
	m.Repo = string(s)
	n, ok = u32()
	if !ok || n > len(b)/32 {
		return m, bad
	}
	m.Packs = make([]PackID, n)
	for i := range m.Packs {
		v, _ := take(32)
		copy(m.Packs[i][:], v)
	}
	n, ok = u32()
	if !ok || n > len(b)/4 {
		return m, bad
	}
	for range n {
		k, ok := u32()
		s, ok2 := take(k)
		if !ok || !ok2 {
			return m, bad
		}
		m.Covered = append(m.Covered, string(s))
	}
	if len(b) != 0 {
		return m, bad
	}
	return m, nil
}

// The header: magic, u32 version, u32 hash length, u64 entries, u64
// pages, u64 metadata length, (version 2) SHA-256 of the keys, SHA-256
// of the metadata, SHA-256 of the header up to here.
const (
	runHeaderLen   = 8 + 4 + 4 + 8 + 8 + 8 + 32 + 32 + 32
	runHeaderLenV1 = runHeaderLen - 32
)

func makeRunHeader(hashLen int, n, pages int64, keysSum [sha256.Size]byte, meta []byte) []byte {
	h := make([]byte, 0, runPage)
	h = append(h, runMagic...)
	h = binary.LittleEndian.AppendUint32(h, runVersion)
	h = binary.LittleEndian.AppendUint32(h, uint32(hashLen))
	h = binary.LittleEndian.AppendUint64(h, uint64(n))
	h = binary.LittleEndian.AppendUint64(h, uint64(pages))
	h = binary.LittleEndian.AppendUint64(h, uint64(len(meta)))
	h = append(h, keysSum[:]...)
	ms := sha256.Sum256(meta)
	h = append(h, ms[:]...)
	hs := sha256.Sum256(h)
	h = append(h, hs[:]...)
	return h[:runPage]
}

// run is an opened run.
type run struct {
	r       io.ReaderAt
	f       *os.File // nil unless the run is a file this process opened
	hashLen int
	n       int64
	keys    []uint32 // the top 32 bits of each page's first hash
	meta    runMeta
	// v1: a version 1 run (read whole at open; the cache is written
	// again as version 2).
	v1 bool
	// onDamage, when set, is called (once) when a page is found damaged:
	// the local index cache's run removes its file, so that the next
	// open rebuilds it.
	onDamage func()
	damaged  sync.Once
	// pins counts users outside the store's lock (a frozen base); the
	// file is closed once it is retired and unpinned.
	pins    atomic.Int32
	retired atomic.Bool

	// The page read last, checked: reads of one page in a row (a
	// pack's entries by position, in order) read it once.
	lastMu sync.Mutex // guards the fields below
	last   []byte     // runPage bytes; nil: none yet
	lastP  int
	lastN  int // bytes of its entries
}

// close retires r: its file closes now, or when its last pin goes.
func (r *run) close() {
	if r == nil {
		return
	}
	r.retired.Store(true)
	if r.pins.Load() == 0 && r.f != nil {
		r.f.Close()
	}
}

func (r *run) unpin() {
	if r != nil && r.pins.Add(-1) == 0 && r.retired.Load() && r.f != nil {
		r.f.Close()
	}
}

// openRun reads a run's header, keys and metadata; its pages are
// checked as they are read. With fn (and always for a version 1 run,
// which has no keys) it reads every page at once, checks it and calls
// fn for each entry. size is the file's size.
func openRun(ra io.ReaderAt, size int64, hashLen int, fn func(indexEntry)) (*run, error) {
	bad := func(why string) error { return fmt.Errorf("index run: %w: %s", ErrCorrupt, why) }
	if size < runPage {
		return nil, bad("shorter than its header")
	}
	h := make([]byte, runHeaderLen)
	if _, err := ra.ReadAt(h, 0); err != nil {
		return nil, err
	}
	if string(h[:8]) != runMagic {
		return nil, bad("bad magic")
	}
	v := binary.LittleEndian.Uint32(h[8:])
	hl := runHeaderLen
	switch v {
	case 1:
		hl = runHeaderLenV1
	case runVersion:
	default:
		return nil, bad(fmt.Sprintf("version %d, this Umbra reads 1 and %d", v, runVersion))
	}
	if hs := sha256.Sum256(h[:hl-32]); !bytes.Equal(hs[:], h[hl-32:hl]) {
		return nil, bad("header checksum mismatch")
	}
	if hl := int(binary.LittleEndian.Uint32(h[12:])); hl != hashLen {
		return nil, bad(fmt.Sprintf("hashes of %d bytes, the repository's have %d", hl, hashLen))
	}
	n := binary.LittleEndian.Uint64(h[16:])
	pages := binary.LittleEndian.Uint64(h[24:])
	metaLen := binary.LittleEndian.Uint64(h[32:])
	keysLen := pages * 8
	if v == 1 {
		keysLen = 0
	}
	per := uint64(runPerPage(hashLen))
	if pages > uint64(size/runPage) || n > pages*per || n < pages*per-min(pages*per, per-1) || (pages == 0) != (n == 0) ||
		metaLen > maxRunMeta || int64(metaLen) != size-runPage-int64(pages)*runPage-int64(keysLen) {
		return nil, bad("sizes do not add up")
	}
	r := &run{r: ra, hashLen: hashLen, n: int64(n), v1: v == 1}
	metaSum := h[40:72]
	if v != 1 {
		// Read a piece at a time into the keys and their hash, not
		// whole as one more copy of them (1.7 MiB at 16 Mi chunks).
		r.keys = make([]uint32, pages)
		ks := sha256.New()
		var last uint64
		var order error // keys out of order: reported once they are known to be as written
		kb := make([]byte, min(keysLen, 16<<10))
		off := int64(runPage + pages*runPage)
		for i := 0; i < len(r.keys); {
			b := kb[:min(uint64(len(kb)), 8*uint64(len(r.keys)-i))]
			if _, err := ra.ReadAt(b, off); err != nil {
				return nil, err
			}
			off += int64(len(b))
			ks.Write(b)
			for ; len(b) > 0; b, i = b[8:], i+1 {
				k := binary.LittleEndian.Uint64(b)
				if i > 0 && k < last && order == nil {
					order = bad(fmt.Sprintf("key %d out of order", i))
				}
				r.keys[i], last = uint32(k>>32), k
			}
		}
		if !bytes.Equal(ks.Sum(nil), h[40:72]) {
			return nil, bad("keys checksum mismatch")
		}
		if order != nil {
			return nil, order
		}
		metaSum = h[72:104]
	}
	mb := make([]byte, metaLen)
	if _, err := ra.ReadAt(mb, runPage+int64(pages)*runPage+int64(keysLen)); err != nil {
		return nil, err
	}
	if ms := sha256.Sum256(mb); !bytes.Equal(ms[:], metaSum) {
		return nil, bad("metadata checksum mismatch")
	}
	meta, err := decodeRunMeta(mb)
	if err != nil {
		return nil, bad(err.Error())
	}
	r.meta = meta
	if v != 1 && fn == nil {
		return r, nil
	}
	// Every page now, in order.
	if v == 1 {
		r.keys = make([]uint32, pages)
	}
	br := bufio.NewReaderSize(io.NewSectionReader(ra, runPage, int64(pages)*runPage), 1<<20)
	page := make([]byte, runPage)
	var last Hash
	esz := runEntrySize(hashLen)
	for p := uint64(0); p < pages; p++ {
		if _, err := io.ReadFull(br, page); err != nil {
			return nil, bad("truncated")
		}
		if v == 1 {
			r.keys[p] = binary.BigEndian.Uint32(page[:4])
		}
		cnt, err := r.checkPage(int(p), page)
		if err != nil {
			return nil, bad(fmt.Sprintf("page %d: %v", p, err))
		}
		first := getRunEntry(page, hashLen)
		if p > 0 && cmpHash(&first.h, &last) <= 0 {
			return nil, bad(fmt.Sprintf("page %d: entries out of order", p))
		}
		for i := 0; i < cnt; i++ {
			e := getRunEntry(page[i*esz:], hashLen)
			last = e.h
			if fn != nil {
				fn(e)
			}
		}
	}
	return r, nil
}

func checkRunPage(page []byte, hashLen int) (int, error) {
	if crc32.Checksum(page[:runPage-4], castagnoli) != binary.LittleEndian.Uint32(page[runPage-4:]) {
		return 0, errors.New("checksum mismatch")
	}
	cnt := int(binary.LittleEndian.Uint32(page[runPage-8:]))
	if cnt == 0 || cnt > runPerPage(hashLen) {
		return 0, fmt.Errorf("%d entries", cnt)
	}
	return cnt, nil
}

// checkPage checks page p as read (a run's pages are trusted only
// once checked): its checksum, its count (every page full but the
// last, which holds the rest), its first key, the order of its
// entries, their pack numbers within the pack table when the run has
// one. It returns the page's entries.
func (r *run) checkPage(p int, page []byte) (int, error) {
	cnt, err := checkRunPage(page, r.hashLen)
	if err != nil {
		return 0, err
	}
	per := int64(runPerPage(r.hashLen))
	want := per
	if p == len(r.keys)-1 {
		want = r.n - int64(p)*per
	}
	if int64(cnt) != want {
		return 0, fmt.Errorf("%d entries, want %d", cnt, want)
	}
	if binary.BigEndian.Uint32(page[:4]) != r.keys[p] {
		return 0, errors.New("first hash is not the page's key")
	}
	esz := runEntrySize(r.hashLen)
	packs := uint32(len(r.meta.Packs))
	for i := 0; i < cnt; i++ {
		e := page[i*esz:]
		if i > 0 && bytes.Compare(e[:r.hashLen], page[(i-1)*esz:(i-1)*esz+r.hashLen]) <= 0 {
			return 0, errors.New("entries out of order")
		}
		if r.meta.Packs != nil && binary.LittleEndian.Uint32(e[r.hashLen:]) >= packs {
			return 0, fmt.Errorf("pack %d outside its table of %d", binary.LittleEndian.Uint32(e[r.hashLen:]), packs)
		}
	}
	return cnt, nil
}

// damage reports a page found damaged (once).
func (r *run) damage() {
	if r.onDamage != nil {
		r.damaged.Do(r.onDamage)
	}
}

// damagedPage reports page p found damaged (why: err) and says so.
func (r *run) damagedPage(p int, err error) error {
	r.damage()
	return fmt.Errorf("index run: page %d: %w: %v (the local index cache is damaged; it is rebuilt at the next open)", p, ErrCorrupt, err)
}

// readPage reads page p into buf and returns its entries' bytes.
func (r *run) readPage(p int, buf []byte) ([]byte, error) {
	r.lastMu.Lock()
	if r.last != nil && r.lastP == p {
		copy(buf[:runPage], r.last)
		n := r.lastN
		r.lastMu.Unlock()
		return buf[:n], nil
	}
	r.lastMu.Unlock()
	if _, err := r.r.ReadAt(buf[:runPage], runPage+int64(p)*runPage); err != nil {
		return nil, fmt.Errorf("index run: page %d: %w", p, err)
	}
	cnt, err := r.checkPage(p, buf[:runPage])
	if err != nil {
		return nil, r.damagedPage(p, err)
	}
	n := cnt * runEntrySize(r.hashLen)
	r.lastMu.Lock()
	if r.last == nil {
		r.last = make([]byte, runPage)
	}
	copy(r.last, buf[:runPage])
	r.lastP, r.lastN = p, n
	r.lastMu.Unlock()
	return buf[:n], nil
}

// find looks h up: its position in the run and its entry.
func (r *run) find(h *Hash, buf []byte) (int64, loc, bool, error) {
	if r == nil || r.n == 0 {
		return 0, loc{}, false, nil
	}
	t := uint32(top64(h) >> 32)
	// The first page that may hold h: the last one starting before its
	// top bits (pages whose first top bits equal t may follow, and any
	// of them may start after h: a page holds it only if the next one
	// starts after it, which its search finds).
	p := sort.Search(len(r.keys), func(i int) bool { return r.keys[i] >= t })
	if p > 0 {
		p--
	}
	esz := runEntrySize(r.hashLen)
	for ; p < len(r.keys) && r.keys[p] <= t; p++ {
		es, err := r.readPage(p, buf)
		if err != nil {
			return 0, loc{}, false, err
		}
		cnt := len(es) / esz
		i := sort.Search(cnt, func(i int) bool {
			var k Hash
			copy(k[:], es[i*esz:i*esz+r.hashLen])
			return cmpHash(&k, h) >= 0
		})
		if i < cnt {
			e := getRunEntry(es[i*esz:], r.hashLen)
			if e.h == *h {
				return int64(p)*int64(runPerPage(r.hashLen)) + int64(i), e.l, true, nil
			}
			return 0, loc{}, false, nil // the next entry is past h
		}
	}
	return 0, loc{}, false, nil
}

// entryAt reads the entry at position i.
func (r *run) entryAt(i int64, buf []byte) (indexEntry, error) {
	per := int64(runPerPage(r.hashLen))
	if i < 0 || i >= r.n {
		return indexEntry{}, fmt.Errorf("index run: position %d outside %d entries", i, r.n)
	}
	es, err := r.readPage(int(i/per), buf)
	if err != nil {
		return indexEntry{}, err
	}
	esz := runEntrySize(r.hashLen)
	if int(i%per)*esz >= len(es) {
		return indexEntry{}, fmt.Errorf("index run: %w: position %d past its page", ErrCorrupt, i)
	}
	return getRunEntry(es[int(i%per)*esz:], r.hashLen), nil
}

// iter reads the run's entries in order.
type runIter struct {
	r    *run
	br   *bufio.Reader
	page []byte
	es   []byte
	p    int64
	last Hash // the previous page's last hash
	err  error
}

func (r *run) iter() *runIter { return r.iterReusing(nil) }

// iterReusing is iter with the read buffers of old, an iterator done
// with (nil: new ones), for a caller passing over the run many times.
func (r *run) iterReusing(old *runIter) *runIter {
	sr := io.NewSectionReader(r.r, runPage, int64(len(r.keys))*runPage)
	if old == nil || old.br == nil {
		br := runReaders.Get().(*bufio.Reader)
		br.Reset(sr)
		return &runIter{r: r, br: br, page: make([]byte, runPage)}
	}
	old.br.Reset(sr)
	return &runIter{r: r, br: old.br, page: old.page}
}

// release gives the iterator's read buffer back for another; it is
// not used after (next then reports the end).
func (it *runIter) release() {
	if it.br != nil {
		it.br.Reset(nil)
		runReaders.Put(it.br)
		it.br = nil
	}
	it.es, it.p = nil, int64(len(it.r.keys))
}

// next returns the next entry; ok is false at the end or on an error
// (it.err).
func (it *runIter) next() (indexEntry, bool) {
	esz := runEntrySize(it.r.hashLen)
	for len(it.es) == 0 {
		if it.err != nil || it.p >= int64(len(it.r.keys)) {
			return indexEntry{}, false
		}
		if _, err := io.ReadFull(it.br, it.page); err != nil {
			it.err = fmt.Errorf("index run: page %d: %w", it.p, err)
			return indexEntry{}, false
		}
		cnt, err := it.r.checkPage(int(it.p), it.page)
		if err == nil && it.p > 0 && bytes.Compare(it.page[:it.r.hashLen], it.last[:it.r.hashLen]) <= 0 {
			err = errors.New("entries out of order")
		}
		if err != nil {
			it.err = it.r.damagedPage(int(it.p), err)
			return indexEntry{}, false
		}
		it.es = it.page[:cnt*esz]
		copy(it.last[:], it.page[(cnt-1)*esz:(cnt-1)*esz+it.r.hashLen])
		it.p++
	}
	e := getRunEntry(it.es, it.r.hashLen)
	it.es = it.es[esz:]
	return e, true
}
