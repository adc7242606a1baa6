package nbd_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/internal/testutil"
)

// TestFullDiskIsENOSPC: a write the volume's disk has no room for reaches
// an NBD client as "No space left on device", not as an I/O error (which
// a filesystem on the export takes for a failing disk), and the export
// goes on serving.
func TestFullDiskIsENOSPC(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "qemu-io")
	dir := t.TempDir()
	small := filepath.Join(dir, "small")
	os.Mkdir(small, 0o755)
	testutil.Run(t, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small)
	t.Cleanup(func() { exec.Command("umount", "-l", small).Run() })
	origin := filepath.Join(small, "vol.img")
	testutil.SparseFile(t, origin, 8<<20)
	s := serveOrigin(t, dir, origin) // the diff area is outside the tmpfs
	qemuIO := func(cmd string) string {
		out, _ := exec.Command("qemu-io", "-f", "raw", "-c", cmd, s.uri("vol")).CombinedOutput()
		return string(out)
	}
	if out := qemuIO("write -P 0x5a 0 4M"); !strings.Contains(out, "No space left on device") {
		t.Fatalf("a write past the disk's room: %s, want ENOSPC", out)
	}
	if out := qemuIO("read -P 0 6M 64k"); !strings.Contains(out, "read 65536/65536") {
		t.Fatalf("the export after a full disk: %s", out)
	}
}

// TestWriteRangeWraps: a write whose offset plus length wraps around
// 2^64 is beyond the end of the export, whichever path serves it (small
// writes are tried on the reading goroutine, large ones spliced): ENOSPC
// as the protocol asks, nothing written, and the connection goes on; a
// read that wraps is refused the same way (EINVAL).
func TestWriteRangeWraps(t *testing.T) {
	s := serve(t, 1<<20)
	c := goExport(t, s.sock, "vol")
	defer c.Close()
	for i, n := range []uint32{4096, 256 << 10} {
		off := ^uint64(0) - uint64(n)/2 + 1 // off + n wraps to n/2
		request(c, 1, uint64(10+i), off, n)
		c.Write(bytes.Repeat([]byte{0x77}, int(n)))
		if errno, cookie := simpleReply(t, c); errno != 28 || cookie != uint64(10+i) {
			t.Fatalf("a %d-byte write at %#x: errno %d (cookie %d), want ENOSPC (28)", n, off, errno, cookie)
		}
	}
	// A read that wraps: beyond the end too (EINVAL for reads), on the
	// inline path as on the others.
	request(c, 0, 15, ^uint64(0)-2047, 4096)
	if errno, cookie := simpleReply(t, c); errno != 22 || cookie != 15 {
		t.Fatalf("a wrapped read: errno %d (cookie %d), want EINVAL (22)", errno, cookie)
	}
	request(c, 3, 20, 0, 0) // flush: the connection is in step
	if errno, cookie := simpleReply(t, c); errno != 0 || cookie != 20 {
		t.Fatalf("flush after the wrapped writes: errno %d cookie %d", errno, cookie)
	}
	got := make([]byte, 1<<20)
	s.vol.ReadAt(got, 0)
	if !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Fatal("a wrapped write changed the volume")
	}
}
