package frontend

import (
	"fmt"

	"umbra/backup"
	"umbra/fusefile"
	"umbra/nbd"
)

// ImageExports serves one backup image, read-only, as the NBD export
// name, with base:allocation from its zero chunks.
func ImageExports(name string, ir *backup.ImageReader) nbd.Exports { return imageExports{name, ir} }

type imageExports struct {
	name string
	ir   *backup.ImageReader
}

func (e imageExports) List() []string { return []string{e.name} }

func (e imageExports) Lookup(name string) (*nbd.Export, error) {
	if name != e.name && name != "" {
		return nil, fmt.Errorf("export %q: this server serves only image %s", name, e.name)
	}
	x := e.ir.Image()
	return &nbd.Export{
		Name:        e.name,
		Description: fmt.Sprintf("backup image %s of %s (snapshot %s)", x.ID, x.Volume, x.Snapshot),
		Backend:     readOnly{e.ir},
		ReadOnly:    true,
		Extents: func(off, length int64) ([]nbd.Extent, error) {
			cs := int64(x.ChunkSize)
			var out []nbd.Extent
			for pos := off; pos < off+length; {
				i := pos / cs
				end := min((i+1)*cs, off+length)
				zero, err := e.ir.Zero(i)
				if err != nil {
					return nil, err
				}
				if n := len(out); n > 0 && out[n-1].Zero == zero {
					out[n-1].Len += end - pos
				} else {
					out = append(out, nbd.Extent{Off: pos, Len: end - pos, Hole: zero, Zero: zero})
				}
				pos = end
			}
			return out, nil
		},
	}, nil
}

// ImageFUSESource serves one backup image as a read-only file.
func ImageFUSESource(name string, ir *backup.ImageReader) fusefile.Source { return imageFUSE{name, ir} }

type imageFUSE struct {
	name string
	ir   *backup.ImageReader
}

func (s imageFUSE) List() []string { return []string{s.name} }

func (s imageFUSE) Open(name string) (*fusefile.Entry, error) {
	if name != s.name {
		return nil, fmt.Errorf("%s: no such image file", name)
	}
	return &fusefile.Entry{Name: name, Backend: readOnly{s.ir}, ReadOnly: true}, nil
}
