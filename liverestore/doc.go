// Package liverestore restores an image into a target (a file or block
// device) while the target is already in use: the instant recovery of
// `umbra restore --live`.
//
// A Target sits below the COW engine as the volume's origin file
// (cow.File): the volume, its front-ends and its snapshots read and write
// the Target, never the target file directly. The Target's content is the
// image's for chunks not yet restored and the file's own bytes for the
// chunks that are (restored, or written through the volume). A read of an
// unrestored chunk fetches it from the repository first (verified against
// its hash; an all-zero chunk becomes a hole); a write that covers part of
// an unrestored chunk fills the chunk first; every chunk written becomes
// the target's own, and the background restore (Run) never overwrites
// it. Run restores the rest in volume order at the speed of a plain
// restore. Because the COW engine reads originals through the Target
// when it preserves them, snapshots taken during the restore see the
// image's bytes too.
//
// # Durability
//
// A map file beside the state (mapfile.go) holds a bit per chunk. A
// chunk's bit is set in the map only after its data is durable in the
// target (fsync of the target, then the map's words, then fsync of the
// map; the background restore does this every commitEvery bytes, Sync
// does it for the volume's flushes). After a crash a chunk whose bit is
// set reads the target's bytes; any other chunk is fetched again, which
// can only undo writes that were never flushed. When every chunk is the
// target's own the map file is removed and the target is an ordinary
// volume.
//
// # Failure
//
// When the repository cannot be read, a read of an unrestored chunk fails
// with an error wrapping syscall.EIO (never other bytes) and Run retries
// with backoff, resuming where it was once the repository answers.
//
// # Concurrency
//
// Striped chunk locks (a stripe per 64 adjacent chunks, taken in
// ascending stripe order) order a fetch, a fill, a write and the
// background restore of the same chunk. A chunk's bit in memory only
// goes from 0 to 1: a reader that sees it set reads the file without a
// lock. While a read or a write fetches unrestored chunks, the
// background restore waits before its next batch, so that on-demand
// fetches do not queue behind it; its commits run beside it. In its
// quiet start (Options.QuietStart) it waits while the target is
// attached and mounted, so that those get the CPU.
package liverestore
