package nbd_test

import (
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
