package backup

import (
	"math/rand/v2"
	"testing"
)

// TestChunkIndex checks the compact index against a map: bulk loads with
// repeats, single adds across several rebuilds, batches of either size
// through addMany, the first place kept.
func TestChunkIndex(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	x := newChunkIndex()
	model := map[Hash]loc{}
	var hashes []Hash
	randHash := func() Hash {
		if len(hashes) > 0 && r.IntN(4) == 0 {
			return hashes[r.IntN(len(hashes))] // a repeat
		}
		var h Hash
		for i := range h {
			h[i] = byte(r.Uint32())
		}
		if r.IntN(10) == 0 {
			h[0], h[1] = 0, 0 // crowd one bucket
		}
		hashes = append(hashes, h)
		return h
	}
	for round := range 9 {
		if round%3 == 2 { // addMany: a few (into recent), then many (bulk)
			for _, n := range []int{500, 30000} {
				var many []indexEntry
				for i := range n {
					h := randHash()
					l := loc{pack: uint32(round), off: uint32(n + i)}
					many = append(many, indexEntry{h, l})
					if _, ok := model[h]; !ok {
						model[h] = l
					}
				}
				x.addMany(many)
			}
		} else if round%3 == 0 {
			var bulk []indexEntry
			for i := range 20000 {
				h := randHash()
				l := loc{pack: uint32(round), off: uint32(i)}
				bulk = append(bulk, indexEntry{h, l})
				if _, ok := model[h]; !ok {
					model[h] = l
				}
			}
			x.addBulk(bulk)
		} else {
			for i := range 40000 {
				h := randHash()
				l := loc{pack: uint32(round), off: uint32(i)}
				x.add(h, l)
				if _, ok := model[h]; !ok {
					model[h] = l
				}
			}
		}
		if x.len() != len(model) {
			t.Fatalf("round %d: %d entries, model %d", round, x.len(), len(model))
		}
		for h, want := range model {
			if got, ok := x.get(h); !ok || got != want {
				t.Fatalf("round %d: get(%x) = %v %v, want %v", round, h[:4], got, ok, want)
			}
		}
		for range 1000 {
			var h Hash
			h[5] = byte(r.Uint32())
			h[31] = 1
			_, known := model[h]
			if _, ok := x.get(h); ok != known {
				t.Fatalf("round %d: get of an absent hash found it", round)
			}
		}
		n := 0
		x.each(func(h Hash, l loc) {
			n++
			if model[h] != l {
				t.Fatalf("each: %x at %v, want %v", h[:4], l, model[h])
			}
		})
		if n != len(model) {
			t.Fatalf("each visited %d of %d", n, len(model))
		}
	}
}
