// Package cow is Umbra's copy-on-write snapshot engine: the software
// provider. Every write to a protected volume passes through a *Volume.
// Before a chunk that a live snapshot still needs is overwritten, its
// original is preserved in the volume's shadow storage (the diff area); a
// snapshot then reads, forever, the bytes the volume held at its commit, or
// an explicit error.
//
// Why our own: no library implements a userspace, crash-safe, differential
// COW chain over a plain file or block device; dm-snapshot and LVM need the
// kernel's device-mapper, which Umbra cannot assume.
//
// # Model
//
// Snapshots form a chain ordered by generation. A first write to chunk c
// after the newest snapshot n was committed preserves c once, as entry
// (c, n). Snapshot j reads c from the first entry (c, g) with g >= j, or
// from the origin when there is none: older snapshots read through newer
// ones, so a write preserves at most one copy however many snapshots live.
// Deleting snapshot i hands each of its entries to its predecessor p when p
// has none for that chunk, and frees the rest; other snapshots read the
// same bytes before and after.
//
// Changed-block tracking keeps, per snapshot, the set D of chunks first
// written while it was the newest. Chunks changed since snapshot j are the
// union of D over j and every newer snapshot (deleting a snapshot merges its
// D into its predecessor's).
//
// # Durability
//
// Persistent snapshots keep an append-only metadata log (meta.log) beside
// the diff-area data file (store). Whenever a persistent snapshot is alive,
// a preserved chunk's data is written to store and its mapping record,
// with the data's checksum, to meta.log; both are made durable at once
// (fdatasync of each), and only then is the origin write issued;
// concurrent writers share those syncs (group commit). Replay drops a
// record whose slot does not hold the bytes it was written with: that
// copy's origin write never happened. Without a
// live persistent snapshot nothing is logged or synced, and the snapshots
// are discarded on the next open. A clean close appends a CLEAN record with
// the tracking bitmaps; an open that finds none reports tracking as
// unreliable and invalidates snapshots whose backup cursor was active.
//
// # Failure
//
// No snapshot problem fails or corrupts an origin write. When a chunk cannot
// be preserved (storage limit, full filesystem, I/O error) the volume's
// policy applies: delete-oldest drops the oldest snapshots until the copy
// fits; invalidate marks the snapshots that needed the chunk invalid with a
// reason, which their reads and listings report.
//
// # Concurrency
//
// A gate counts writes in flight; Hold closes it (new writes wait, reads
// never do). Striped chunk locks order a write's preserve-then-overwrite
// against snapshot reads of the same chunk. Volume.mu guards the mapping
// state; slotMu keeps a freed diff-area slot from being reused while a
// reader that found it is still reading it.
package cow
