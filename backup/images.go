package backup

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	"github.com/zeebo/blake3"
)

// An image is two objects: lists/ID, its chunk list (Index.Encode,
// compressed and sealed), and images/ID, a small sealed JSON record of
// the image that names the list's hash. The record is written last, so
// an image is listed only when it is whole.

// writeImage stores x's chunk list, then its record.
func (r *Repo) writeImage(ctx context.Context, x *Index) error {
	list := r.seal.seal(nil, x.Encode())
	x.ListHash = blake3.Sum256(list)
	if err := r.be.Put(ctx, listName(x.ID), list); err != nil {
		return err
	}
	if err := r.be.Sync(ctx); err != nil {
		return err
	}
	rec, _ := json.Marshal(x)
	if err := r.putSealed(ctx, imageName(x.ID), rec); err != nil {
		return err
	}
	return r.be.Sync(ctx)
}

// imageRecord reads images/ID.
func (r *Repo) imageRecord(ctx context.Context, id string) (*Index, error) {
	b, err := r.getSealed(ctx, imageName(id))
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", id, err)
	}
	var x Index
	if err := json.Unmarshal(b, &x); err != nil || x.ID != id {
		return nil, fmt.Errorf("image %s: record: %w", id, ErrCorrupt)
	}
	return &x, nil
}

// Image reads image id with its chunk list.
func (r *Repo) Image(id string) (*Index, error) { return r.image(context.Background(), id) }

func (r *Repo) image(ctx context.Context, id string) (*Index, error) {
	if !validImageID(id) {
		return nil, fmt.Errorf("image %q: not an image ID (see `umbra images list`)", id)
	}
	x, err := r.imageRecord(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := r.loadChunks(ctx, x); err != nil {
		return nil, err
	}
	return x, nil
}

// loadChunks fills x.Chunks from its list, checking it against the record.
func (r *Repo) loadChunks(ctx context.Context, x *Index) error {
	if x.Chunks != nil {
		return nil
	}
	raw, err := r.be.Get(ctx, listName(x.ID), 0, -1)
	if err != nil {
		return fmt.Errorf("image %s: chunk list: %w", x.ID, err)
	}
	if blake3.Sum256(raw) != x.ListHash {
		return fmt.Errorf("image %s: chunk list: %w: does not match the image record's hash", x.ID, ErrCorrupt)
	}
	b, err := r.seal.open(nil, raw)
	if err != nil {
		return fmt.Errorf("image %s: chunk list: %w", x.ID, err)
	}
	l, err := DecodeIndex(b)
	if err != nil {
		return fmt.Errorf("image %s: %w", x.ID, err)
	}
	if l.ID != x.ID || l.Size != x.Size || l.ChunkSize != r.cfg.ChunkSize {
		return fmt.Errorf("image %s: chunk list: %w: belongs to %s (size %d, chunk %d)", x.ID, ErrCorrupt, l.ID, l.Size, l.ChunkSize)
	}
	x.Chunks = l.Chunks
	return nil
}

// Images lists the images without their chunk lists, oldest first;
// unreadable records are reported in errs.
func (r *Repo) Images() (list []*Index, errs []error) { return r.images(context.Background()) }

func (r *Repo) images(ctx context.Context) (list []*Index, errs []error) {
	names, err := r.be.List(ctx, "images/")
	if err != nil {
		return nil, []error{err}
	}
	for _, n := range names {
		x, err := r.imageRecord(ctx, strings.TrimPrefix(n, "images/"))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		list = append(list, x)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Created.Before(list[j].Created) })
	return list, errs
}

// Latest returns the newest image of vol (without its chunk list), or nil.
func (r *Repo) Latest(vol string) *Index {
	list, _ := r.Images()
	for i := len(list) - 1; i >= 0; i-- {
		if list[i].Volume == vol {
			return list[i]
		}
	}
	return nil
}
