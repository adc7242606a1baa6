package reflink

import (
	"encoding/binary"
	"fmt"
	"os"
	"sort"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// On btrfs, FIEMAP cannot tell blocks of compressed extents apart (see
// opaque); the file's extent items can. Each names the on-disk extent
// (disk_bytenr) and where in its uncompressed data the file's range
// starts (offset), so (disk_bytenr, offset + position in the item)
// identifies a block's bytes: an extent is never changed in place while
// a snapshot still refers to it. Reading the items needs the tree-search
// ioctl (CAP_SYS_ADMIN); without it Changed keeps to FIEMAP.

// From linux/btrfs.h and btrfs_tree.h.
const (
	btrfsSuperMagic     = 0x9123683e
	btrfsIocTreeSearch  = 0xd0009411 // _IOWR(0x94, 17, struct btrfs_ioctl_search_args), 4096 bytes
	btrfsSearchKeySize  = 104
	btrfsSearchHdrSize  = 32
	btrfsExtentDataKey  = 108
	btrfsFileExtentSize = 53 // btrfs_file_extent_item up to num_bytes
	btrfsExtentInline   = 0
	btrfsExtentPrealloc = 2
)

// item is one file extent item: bytes [pos, pos+length) of the file are
// bytes [offset, offset+length) of on-disk extent disk.
type item struct {
	pos, length  int64
	disk, offset int64
	kind         uint8 // btrfsExtentInline, 1 (regular) or btrfsExtentPrealloc
}

func isBtrfs(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && uint32(st.Type) == btrfsSuperMagic
}

// btrfsItems returns the extent items of the file at path, by position.
func btrfsItems(path string) ([]item, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	// Items describe written data only: write out what is still in
	// the page cache (FIEMAP_FLAG_SYNC does the same for FIEMAP).
	if err := f.Sync(); err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, err
	}
	var args [4096]byte
	var out []item
	le := binary.LittleEndian
	next := uint64(0)
	for {
		clear(args[:])
		k := args[:btrfsSearchKeySize]
		// tree_id 0: the subvolume the file is in.
		le.PutUint64(k[8:], st.Ino)              // min_objectid
		le.PutUint64(k[16:], st.Ino)             // max_objectid
		le.PutUint64(k[24:], next)               // min_offset
		le.PutUint64(k[32:], ^uint64(0))         // max_offset
		le.PutUint64(k[48:], ^uint64(0))         // max_transid
		le.PutUint32(k[56:], btrfsExtentDataKey) // min_type
		le.PutUint32(k[60:], btrfsExtentDataKey) // max_type
		le.PutUint32(k[64:], 4096)               // nr_items
		if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), btrfsIocTreeSearch, uintptr(unsafe.Pointer(&args[0]))); e != 0 {
			return nil, fmt.Errorf("btrfs tree search %s: %w", path, e)
		}
		n := int(le.Uint32(k[64:]))
		if n == 0 {
			return out, nil
		}
		buf := args[btrfsSearchKeySize:]
		for i, at := 0, 0; i < n; i++ {
			if at+btrfsSearchHdrSize > len(buf) {
				return nil, fmt.Errorf("btrfs tree search %s: item %d past the buffer", path, i)
			}
			h := buf[at : at+btrfsSearchHdrSize]
			objectid, offset, typ, size := le.Uint64(h[8:]), le.Uint64(h[16:]), le.Uint32(h[24:]), int(le.Uint32(h[28:]))
			data := buf[at+btrfsSearchHdrSize:]
			at += btrfsSearchHdrSize + size
			if at > len(buf) {
				return nil, fmt.Errorf("btrfs tree search %s: item %d past the buffer", path, i)
			}
			next = offset + 1
			if objectid != st.Ino || typ != btrfsExtentDataKey {
				continue
			}
			if size < 21 {
				return nil, fmt.Errorf("btrfs tree search %s: extent item of %d bytes", path, size)
			}
			data = data[:size]
			it := item{pos: int64(offset), kind: data[20]}
			if it.kind == btrfsExtentInline {
				it.length = int64(le.Uint64(data[8:])) // ram_bytes
			} else {
				if size < btrfsFileExtentSize {
					return nil, fmt.Errorf("btrfs tree search %s: extent item of %d bytes", path, size)
				}
				it.disk, it.offset, it.length = int64(le.Uint64(data[21:])), int64(le.Uint64(data[37:])), int64(le.Uint64(data[45:]))
			}
			out = append(out, it)
		}
	}
}

// locateItem returns what identifies the block at off of a file with
// items its: the on-disk extent and the offset in its data, and how the
// block is mapped.
func locateItem(its []item, off int64) (disk, at int64, how int) {
	i := sort.Search(len(its), func(i int) bool { return its[i].pos+its[i].length > off })
	switch {
	case i == len(its) || its[i].pos > off:
		return 0, 0, mapHole
	case its[i].kind == btrfsExtentInline:
		return 0, 0, mapOpaque
	case its[i].kind == btrfsExtentPrealloc || its[i].disk == 0:
		return 0, 0, mapHole // preallocated or a hole: reads zeros
	}
	return its[i].disk, its[i].offset + off - its[i].pos, mapPlain
}
