package backup

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// StreamBatch is a run of an image's chunks read by ImageReader.Stream.
type StreamBatch struct {
	// First is the index of the batch's first chunk.
	First int64
	// Data holds the chunks, ChunkSize bytes each (the last chunk of the
	// image may be shorter). It is valid only during the put call. It is
	// nil when every chunk of the batch is zero (a run of zero chunks,
	// handed over as one batch).
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
// chunk handed over was checked against its hash. A run of zero chunks
// at least a batch long comes as one batch without Data (at most a
// segment of the chunk list: 64 Ki chunks). An error of put stops the
// stream and is returned. Memory is Restore's: a batch per worker, the
// chunk cache and two segments of the chunk list with their plans.
func (ir *ImageReader) Stream(ctx context.Context, need func(i int64) bool, put func(StreamBatch) error) error {
	r, x := ir.r, ir.x
	rs := r.newRestoreRun(x, "stream")
	rs.need, rs.put = need, put
	go rs.writer()
	var want func(first int64, hs []Hash) bool
	if need != nil {
		want = func(first int64, hs []Hash) bool {
			for j := range hs {
				if need(first + int64(j)) {
					return true
				}
			}
			return false
		}
	}
	err := r.eachPlannedSegment(ctx, x, want, rs.cache.ahead, func(first int64, hs []Hash, p *usePlan) error {
		rs.cache.start(p)
		if err := rs.streamSegment(ctx, first, hs); err != nil {
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

// streamSegment reads one segment of the list for a stream (the chunk
// cache started with its plan): its runs of
// at least a batch of zero chunks go to put as one batch each, without
// data, and the chunks between them through segment. A volume that is
// mostly zeros (a 64 GiB image holding 512 MiB of files) is millions of
// zero chunks: batch by batch, each zeroed in a buffer, checked and
// looked at one by one on the other side, they cost the stream more
// than its data.
func (rs *restoreRun) streamSegment(ctx context.Context, first int64, hs []Hash) error {
	n := int64(len(hs))
	for lo := int64(0); lo < n; {
		zs, ze := zeroRun(hs, lo, rs.perBatch)
		if zs > lo {
			if err := rs.batches(ctx, first+lo, hs[lo:zs]); err != nil {
				return err
			}
		}
		if ze > zs {
			if err := rs.zeroBatch(ctx, first+zs, ze-zs); err != nil {
				return err
			}
		}
		lo = ze
	}
	return nil
}

// zeroRun finds the first run of zero hashes in hs from lo on that is at
// least atLeast long: [zs, ze), or zs = ze = len(hs) when there is none.
func zeroRun(hs []Hash, lo, atLeast int64) (zs, ze int64) {
	n := int64(len(hs))
	for i := lo; i < n; {
		if hs[i] != (Hash{}) {
			i++
			continue
		}
		j := i + 1
		for j < n && hs[j] == (Hash{}) {
			j++
		}
		if j-i >= atLeast {
			return i, j
		}
		i = j
	}
	return n, n
}

// zeroBatch hands chunks first..first+n, all zero, to the writer as one
// batch without data, after the batches queued before it.
func (rs *restoreRun) zeroBatch(ctx context.Context, first, n int64) error {
	b := StreamBatch{First: first, Zero: make([]bool, n), Skip: make([]bool, n), Started: time.Now()}
	skip := true
	for j := range b.Zero {
		b.Zero[j] = true
		if rs.need != nil && !rs.need(first+int64(j)) {
			b.Skip[j] = true
			continue
		}
		skip = false
	}
	if skip {
		return nil
	}
	if rs.failed.Load() {
		return errors.New("the target could not be written") // the writer's error says why
	}
	cs := int64(rs.x.ChunkSize)
	select {
	case rs.writes <- restoreWrite{covers: min((first+n)*cs, rs.x.Size) - first*cs, batch: b}:
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
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
