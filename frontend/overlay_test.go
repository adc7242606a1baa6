package frontend

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"testing"
)

type memImage []byte

func (m memImage) ReadAt(p []byte, off int64) (int, error) { return copy(p, m[off:]), nil }
func (m memImage) Size() int64                             { return int64(len(m)) }

// TestOverlay: random writes of every size and alignment read back as a
// model of them says, the image is never written, and Close removes the
// overlay's file.
func TestOverlay(t *testing.T) {
	const size = 1<<20 + 1000 // a last block that is not whole
	img := make(memImage, size)
	for i := range img {
		img[i] = byte(i * 7)
	}
	orig := bytes.Clone(img)
	model := bytes.Clone(img)
	dir := t.TempDir()
	o, err := NewOverlay(img, dir, "img")
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		off := rng.Int64N(size)
		n := min(rng.Int64N(3*OverlayBlock)+1, size-off)
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		if rng.IntN(2) == 0 {
			if _, err := o.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
		} else {
			got := make([]byte, n)
			if _, err := o.ReadAt(got, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, model[off:off+n]) {
				t.Fatalf("read %d at %d differs from what was written", n, off)
			}
		}
	}
	got := make([]byte, size)
	if _, err := o.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("whole image: %v, equal %v", err, bytes.Equal(got, model))
	}
	if !bytes.Equal(img, orig) {
		t.Fatal("the image under the overlay was written")
	}
	if o.Written() == 0 || o.Written() > size+OverlayBlock {
		t.Errorf("written %d", o.Written())
	}
	if _, err := o.WriteAt([]byte{1}, size); err == nil {
		t.Error("a write past the end was taken")
	}
	path := o.Path()
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("overlay file %s after Close: %v", path, err)
	}
	if _, err := o.ReadAt(got[:1], 0); !errors.Is(err, ErrOverlayClosed) {
		t.Errorf("read after Close: %v", err)
	}
}
