package backup

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/zeebo/blake3"
	"golang.org/x/sys/unix"

	"umbra/provider"
)

// Source is what an image is read from: a snapshot, a file, a device.
type Source interface {
	ReadAt(p []byte, off int64) (int, error)
	Size() int64
}

// Options of one backup.
type Options struct {
	Volume   string
	Snapshot string
	// Parent is the volume's previous image; with Changed (the chunks that
	// may differ since Parent's snapshot) only those are read.
	Parent  *Index
	Changed *provider.Bitmap
	// Cursor is told how far the ascending read has come (the COW
	// engine's backup cursor releases preserved data behind it).
	Cursor   func(off int64)
	Progress func(done, total int64)
}

// Stats of one backup.
type Stats struct {
	Incremental bool    `json:"incremental"`
	Read        int64   `json:"bytes_read"`
	Reused      int64   `json:"bytes_reused_from_parent"`
	Zero        int64   `json:"bytes_zero"`
	Stored      int64   `json:"bytes_new"`     // new chunks, uncompressed
	Compressed  int64   `json:"bytes_written"` // new chunks, compressed
	Seconds     float64 `json:"seconds"`
}

const batch = 256 // chunks read at once (1 MiB)

func changedChunk(bm *provider.Bitmap, i int64) bool {
	lo := i * ChunkSize / bm.Granule
	hi := ((i+1)*ChunkSize - 1) / bm.Granule
	for b := lo; b <= hi; b++ {
		if bm.Set(b) {
			return true
		}
	}
	return false
}

// Backup reads src in ascending order and writes an image. The image is
// listed only after every chunk and the index are durable.
func (r *Repo) Backup(ctx context.Context, src Source, opts Options) (*Index, Stats, error) {
	start := time.Now()
	size := src.Size()
	n := (size + ChunkSize - 1) / ChunkSize
	x := &Index{Volume: opts.Volume, Snapshot: opts.Snapshot, Size: size, Created: time.Now().UTC(), Chunks: make([]Hash, n)}
	x.ID = imageID(opts.Volume, x.Created)
	var st Stats
	incr := opts.Parent != nil && opts.Changed != nil && opts.Parent.Size == size
	if incr {
		x.Parent = opts.Parent.ID
		st.Incremental = true
	}
	buf := make([]byte, batch*ChunkSize)
	for first := int64(0); first < n; first += batch {
		if err := ctx.Err(); err != nil {
			return nil, st, err
		}
		last := min(first+batch, n)
		var need []int64
		for i := first; i < last; i++ {
			if incr && !changedChunk(opts.Changed, i) {
				x.Chunks[i] = opts.Parent.Chunks[i]
				st.Reused += ChunkSize
				continue
			}
			need = append(need, i)
		}
		// Read runs of consecutive needed chunks, one read each.
		for j := 0; j < len(need); {
			k := j + 1
			for k < len(need) && need[k] == need[k-1]+1 {
				k++
			}
			lo, hi := need[j], need[k-1]+1
			off := lo * ChunkSize
			span := min(hi*ChunkSize, size) - off
			if _, err := src.ReadAt(buf[:span], off); err != nil && err != io.EOF {
				return nil, st, fmt.Errorf("backup %s: read at %d: %w", opts.Volume, off, err)
			}
			st.Read += span
			for i := lo; i < hi; i++ {
				o := (i - lo) * ChunkSize
				data := buf[o:min(o+ChunkSize, span)]
				if allZero(data) {
					x.Chunks[i] = Hash{}
					st.Zero += int64(len(data))
					continue
				}
				h := Hash(blake3.Sum256(data))
				x.Chunks[i] = h
				wrote, z, err := r.putChunk(h, data)
				if err != nil {
					return nil, st, err
				}
				if wrote {
					st.Stored += int64(len(data))
					st.Compressed += z
				}
			}
			j = k
		}
		if opts.Cursor != nil {
			opts.Cursor(last * ChunkSize)
		}
		if opts.Progress != nil {
			opts.Progress(min(last*ChunkSize, size), size)
		}
	}
	if err := r.syncfs(); err != nil {
		return nil, st, fmt.Errorf("backup %s: make chunks durable: %w", opts.Volume, err)
	}
	if err := writeAtomic(r.indexPath(x.ID), x.Encode()); err != nil {
		return nil, st, fmt.Errorf("backup %s: write index: %w", opts.Volume, err)
	}
	st.Seconds = time.Since(start).Seconds()
	return x, st, nil
}

func imageID(vol string, t time.Time) string {
	v := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' {
			return r
		}
		return '_'
	}, strings.TrimPrefix(vol, "/"))
	return fmt.Sprintf("%s-%s", v, t.Format("20060102T150405.000000000Z"))
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// syncfs makes everything written to the repository's filesystem durable.
func (r *Repo) syncfs() error {
	d, err := os.Open(r.dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return unix.Syncfs(int(d.Fd()))
}
