package cow

import "sync"

// stripes are the chunk locks: chunk c is guarded by stripe c mod
// numStripes. A write that preserves takes its chunks' stripes
// exclusively from before it reads the originals until the origin is
// written; a snapshot read takes them shared while it resolves and reads
// its chunks, so it never sees a chunk between its preservation and its
// overwrite. While no snapshot lives writes take none (Volume.hasSnaps).
// Each stripe is its own lock; lock takes them in ascending order.
type stripes [numStripes]sync.RWMutex

// chunkLocks is a set of held stripe locks: n stripes from first on,
// wrapping. The zero value holds none. A value, not a closure: taking
// and releasing them is on every write's path.
type chunkLocks struct {
	s      *stripes
	first  int
	n      int
	shared bool
}

func (l chunkLocks) held() bool { return l.n > 0 }

func (l chunkLocks) unlock() {
	for k := range l.n {
		i := (l.first + k) % numStripes
		if l.shared {
			l.s[i].RUnlock()
		} else {
			l.s[i].Unlock()
		}
	}
}

// of returns the stripe locks of chunks c0..c1, not taken.
func (s *stripes) of(c0, c1 uint64, shared bool) chunkLocks {
	return chunkLocks{s: s, first: int(c0 % numStripes), n: int(min(c1-c0+1, numStripes)), shared: shared}
}

// lock takes the stripe locks of chunks c0..c1, exclusively or
// shared, in ascending stripe order (so two lockers never deadlock).
func (s *stripes) lock(c0, c1 uint64, shared bool) chunkLocks {
	l := s.of(c0, c1, shared)
	lock := func(i int) {
		if shared {
			s[i].RLock()
		} else {
			s[i].Lock()
		}
	}
	wrap := l.first + l.n - numStripes // stripes held past the end, from 0
	for i := 0; i < wrap; i++ {
		lock(i)
	}
	for i := l.first; i < min(l.first+l.n, numStripes); i++ {
		lock(i)
	}
	return l
}

// tryLock takes the stripe locks of chunks c0..c1 for writing if
// none is held, else takes none.
func (s *stripes) tryLock(c0, c1 uint64) (chunkLocks, bool) {
	l := s.of(c0, c1, false)
	for k := range l.n {
		if !s[(l.first+k)%numStripes].TryLock() {
			l.n = k
			l.unlock()
			return chunkLocks{}, false
		}
	}
	return l, true
}
