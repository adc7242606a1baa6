package backup

import (
	"context"
	"fmt"
	"time"
)

// StreamBatch is a run of an image's chunks read by ImageReader.Stream.
type StreamBatch struct {
	// First is the index of the batch's first chunk.
	First int64
	// Data holds the chunks, ChunkSize bytes each (the last chunk of the
	// image may be shorter). It is valid only during the put call.
	Data []byte
	// Zero marks the all-zero chunks (never stored; Data holds zeros).
	Zero []bool
	// Skip marks the chunks need declined: not read, Data holds zeros.
	Skip []bool
	// Started is when the batch's reads began: a batch read ahead of a
	// failure does not show that the repository answers after it.
	Started time.Time
}

// Stream reads the image's chunks in volume order, at the speed of
// Restore (the same workers, batches and chunk cache), and hands each
// batch to put, one call at a time, in the order the batches finish. need
// (nil: every chunk) is asked, from several goroutines, whether chunk i
// is wanted; a batch none of whose chunks is wanted is not read. Every
// chunk handed over was checked against its hash. An error of put stops
// the stream and is returned. Memory is Restore's: a batch per worker,
// the chunk cache and one segment of the chunk list.
func (ir *ImageReader) Stream(ctx context.Context, need func(i int64) bool, put func(StreamBatch) error) error {
	r, x := ir.r, ir.x
	rs := r.newRestoreRun(x, "stream")
	rs.need, rs.put = need, put
	go rs.writer()
	err := r.eachSegment(ctx, x, func(first int64, hs []Hash) error {
		if need != nil {
			wanted := false
			for j := range hs {
				if need(first + int64(j)) {
					wanted = true
					break
				}
			}
			if !wanted {
				return nil
			}
		}
		if err := rs.segment(ctx, first, hs); err != nil {
			return fmt.Errorf("image %s: %w", x.ID, err)
		}
		return nil
	})
	close(rs.writes)
	if werr := <-rs.wrote; werr != nil {
		return werr // the cause: the workers stopped for it
	}
	if err != nil {
		return err
	}
	return ctx.Err()
}

// wanted returns the hashes of a batch (chunks first.. of hs) to read:
// those need declines replaced by the zero hash (so not read), with the
// batch's Zero and Skip marks; skip says no chunk is wanted.
func (rs *restoreRun) wanted(first int64, hs []Hash) (out []Hash, b StreamBatch, skip bool) {
	if rs.put == nil {
		return hs, StreamBatch{}, false
	}
	b = StreamBatch{First: first, Zero: make([]bool, len(hs)), Skip: make([]bool, len(hs))}
	out = make([]Hash, len(hs))
	skip = true
	for j, h := range hs {
		b.Zero[j] = h == (Hash{})
		if rs.need != nil && !rs.need(first+int64(j)) {
			b.Skip[j] = true
			continue
		}
		skip = false
		out[j] = h
	}
	return out, b, skip
}

// ChunkSize is the image's chunk size.
func (ir *ImageReader) ChunkSize() int64 { return int64(ir.x.ChunkSize) }
