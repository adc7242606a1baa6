package frontend

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"umbra/fusefile"
	"umbra/nbd"
)

// OverlayBlock is the unit an Overlay tracks: a write smaller than a
// block copies the rest of it from the image first.
const OverlayBlock = 4096

// Overlay serves a read-only image read-write: written blocks go to a
// sparse file beside it, a bitmap in memory says which blocks the file
// holds, and reads take each block from the file or the image. The
// image is never written; Close removes the file, so every write is
// thrown away. It is an nbd.Backend and a fusefile.Backend, safe for
// concurrent use.
//
// The bitmap costs one bit per 4 KiB: 32 MiB for a 1 TiB image.
type Overlay struct {
	img  image
	f    *os.File
	size int64

	mu      sync.RWMutex // guards bits, written and the file's blocks (writers exclusive)
	bits    []uint64     // block i written: bits[i/64] & 1<<(i%64)
	written int64        // blocks written
	closed  bool
}

// NewOverlay makes an overlay over img with its file in dir (created
// if needed).
func NewOverlay(img interface {
	ReadAt(p []byte, off int64) (int, error)
	Size() int64
}, dir, name string) (*Overlay, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("overlay directory: %w", err)
	}
	f, err := os.CreateTemp(dir, "umbra-overlay-"+name+"-*")
	if err != nil {
		return nil, fmt.Errorf("overlay file: %w", err)
	}
	size := img.Size()
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("overlay file %s: %w", f.Name(), err)
	}
	blocks := (size + OverlayBlock - 1) / OverlayBlock
	return &Overlay{img: img, f: f, size: size, bits: make([]uint64, (blocks+63)/64)}, nil
}

// Path is the overlay's file.
func (o *Overlay) Path() string { return o.f.Name() }

// Size is the image's size.
func (o *Overlay) Size() int64 { return o.size }

// Written is how many bytes (whole blocks) the overlay holds.
func (o *Overlay) Written() int64 {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.written * OverlayBlock
}

func (o *Overlay) has(i int64) bool { return o.bits[i/64]&(1<<(i%64)) != 0 }

func (o *Overlay) set(i int64) {
	if !o.has(i) {
		o.bits[i/64] |= 1 << (i % 64)
		o.written++
	}
}

// ErrOverlayClosed: the overlay was closed (its writes thrown away).
var ErrOverlayClosed = errors.New("overlay closed")

// ReadAt reads each run of blocks from the overlay's file where they
// were written, from the image elsewhere.
func (o *Overlay) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > o.size {
		return 0, fmt.Errorf("read of %d bytes at %d: past the end of the image (%d bytes)", len(p), off, o.size)
	}
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.closed {
		return 0, ErrOverlayClosed
	}
	return o.readLocked(p, off)
}

func (o *Overlay) readLocked(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		i := pos / OverlayBlock
		in := o.has(i)
		// The run of blocks that come from the same place.
		end := (i + 1) * OverlayBlock
		for end < off+int64(len(p)) && o.has(end/OverlayBlock) == in {
			end += OverlayBlock
		}
		end = min(end, off+int64(len(p)))
		chunk := p[n : n+int(end-pos)]
		var err error
		if in {
			_, err = o.f.ReadAt(chunk, pos)
		} else {
			_, err = o.img.ReadAt(chunk, pos)
		}
		if err != nil {
			return n, err
		}
		n += len(chunk)
	}
	return n, nil
}

// WriteAt writes to the overlay's file; the parts of the first and last
// blocks that p does not cover come from the image first, if the
// overlay does not hold those blocks yet.
func (o *Overlay) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > o.size {
		return 0, fmt.Errorf("write of %d bytes at %d: past the end of the image (%d bytes)", len(p), off, o.size)
	}
	if len(p) == 0 {
		return 0, nil
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return 0, ErrOverlayClosed
	}
	end := off + int64(len(p))
	first, last := off/OverlayBlock, (end-1)/OverlayBlock
	for _, i := range []int64{first, last} {
		bs, be := i*OverlayBlock, min((i+1)*OverlayBlock, o.size)
		if o.has(i) || (off <= bs && end >= be) {
			continue
		}
		blk := make([]byte, be-bs)
		if _, err := o.img.ReadAt(blk, bs); err != nil {
			return 0, fmt.Errorf("overlay: read the image's block at %d: %w", bs, err)
		}
		if _, err := o.f.WriteAt(blk, bs); err != nil {
			return 0, fmt.Errorf("overlay file %s: %w", o.f.Name(), err)
		}
		o.set(i)
	}
	if _, err := o.f.WriteAt(p, off); err != nil {
		return 0, fmt.Errorf("overlay file %s: %w", o.f.Name(), err)
	}
	for i := first; i <= last; i++ {
		o.set(i)
	}
	return len(p), nil
}

// Flush has nothing to make durable: the overlay is thrown away.
func (o *Overlay) Flush() error { return nil }

// Close removes the overlay's file: its writes are gone.
func (o *Overlay) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return nil
	}
	o.closed = true
	err := o.f.Close()
	if rerr := os.Remove(o.f.Name()); rerr != nil && err == nil {
		err = rerr
	}
	return err
}

// OverlayExports serves an overlay read-write as the NBD export name
// (description desc).
func OverlayExports(name, desc string, o *Overlay) nbd.Exports { return overlayExports{name, desc, o} }

type overlayExports struct {
	name, desc string
	o          *Overlay
}

func (e overlayExports) List() []string { return []string{e.name} }

func (e overlayExports) Lookup(name string) (*nbd.Export, error) {
	if name != e.name && name != "" {
		return nil, fmt.Errorf("export %q: this server serves only image %s", name, e.name)
	}
	return &nbd.Export{Name: e.name, Description: e.desc, Backend: e.o}, nil
}

// OverlayFUSESource serves an overlay as the read-write file name.
func OverlayFUSESource(name string, o *Overlay) fusefile.Source { return overlayFUSE{name, o} }

type overlayFUSE struct {
	name string
	o    *Overlay
}

func (s overlayFUSE) List() []string { return []string{s.name} }

func (s overlayFUSE) Open(name string) (*fusefile.Entry, error) {
	if name != s.name {
		return nil, fmt.Errorf("%s: no such image file", name)
	}
	return &fusefile.Entry{Name: name, Backend: s.o}, nil
}
