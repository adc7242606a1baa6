package cow

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"umbra/provider"
)

// TestQuickWrites: writes tried without waiting (TryWriteAt, a server's
// reading goroutine) go through the raw-system-call path (quickio.go)
// and must keep what every write keeps: the snapshot reads the
// originals, the volume the new bytes — for single chunks, runs of
// chunks and writes not on chunk boundaries, with the originals in the
// page cache and (where the kernel drops them when asked) not.
func TestQuickWrites(t *testing.T) {
	dir := t.TempDir()
	origin := filepath.Join(dir, "o")
	const size = 4 << 20
	orig := make([]byte, size)
	for i := range orig {
		orig[i] = byte(i*7 + i/4096)
	}
	if err := os.WriteFile(origin, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	v, err := Open("v", origin, Options{StorageDir: filepath.Join(dir, "d")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(orig)
	writes := []struct{ off, n int64 }{
		{0, 4096}, {8192, 4096}, {65536, 65536}, {1<<20 + 100, 5000}, {2 << 20, 3 * 4096},
	}
	for i, w := range writes {
		if i%2 == 1 {
			// The originals out of the page cache: the no-wait read
			// refuses and the ordinary one reads them.
			f, err := os.Open(origin)
			if err != nil {
				t.Fatal(err)
			}
			f.Sync()
			unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
			f.Close()
		}
		p := bytes.Repeat([]byte{byte(0xa0 + i)}, int(w.n))
		n, ok, err := v.TryWriteAt(p, w.off)
		if !ok || err != nil || n != len(p) {
			t.Fatalf("TryWriteAt [%d,+%d): n %d, ok %v, err %v", w.off, w.n, n, ok, err)
		}
		copy(want[w.off:], p)
	}
	got := make([]byte, size)
	if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the volume does not hold what was written (%v)", err)
	}
	onDisk, err := os.ReadFile(origin)
	if err != nil || !bytes.Equal(onDisk, want) {
		t.Fatalf("the origin file does not hold what was written (%v)", err)
	}
	s, err := v.OpenSnapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.ReadAt(got, 0); err != nil || !bytes.Equal(got, orig) {
		t.Fatalf("the snapshot does not hold the originals (%v)", err)
	}
}

// TestQuickIOErrors: the raw reads and writes report what the ordinary
// ones would: a write the file refuses fails with the errno (not a
// silent short write), and a read of a range past the end is not taken
// as read.
func TestQuickIOErrors(t *testing.T) {
	name := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(name, bytes.Repeat([]byte{1}, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := OSFS{}.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	of := f.(osFile)
	if n, err := of.writeAtQuick([]byte("x"), 0); err == nil || n != 0 {
		t.Fatalf("a write to a read-only file: n %d, err %v; want EBADF", n, err)
	}
	p := make([]byte, 4096)
	if of.readAtQuick(p, 8192-100) {
		t.Fatal("a read running past the end was taken as read in full")
	}
	if of.readAtQuick(p, 0) && !bytes.Equal(p, bytes.Repeat([]byte{1}, 4096)) {
		t.Fatal("a quick read returned other bytes than the file's")
	}
}

// TestWriteBehindOSFile: the write-behind writes an OS file with raw
// system calls (writeAtRaw): each copy lands in its slot, runs of
// consecutive slots and lone ones alike, and a write the file refuses
// leaves its copies pending (readable from memory) and reported as
// failed, as an ordinary write's error would.
func TestWriteBehindOSFile(t *testing.T) {
	const chunk = 4096
	name := filepath.Join(t.TempDir(), "store")
	f, err := OSFS{}.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := newWriteBehind(f, chunk)
	defer w.stop()
	slots := []int64{0, 1, 2, 5, 9, 10}
	for i, slot := range slots {
		sp := w.reserve(chunk)
		copy(sp.buf, bytes.Repeat([]byte{byte(0x10 + i)}, chunk))
		w.add(sp, 0, chunk, slot, uint64(i))
		w.release(sp)
	}
	w.drain()
	if fs := w.failures(); len(fs) != 0 {
		t.Fatalf("%d copies failed", len(fs))
	}
	got, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	for i, slot := range slots {
		if off := slot * chunk; int64(len(got)) < off+chunk || !bytes.Equal(got[off:off+chunk], bytes.Repeat([]byte{byte(0x10 + i)}, chunk)) {
			t.Fatalf("slot %d does not hold its copy", slot)
		}
	}

	ro, err := OSFS{}.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	w2 := newWriteBehind(ro, chunk)
	defer w2.stop()
	sp := w2.reserve(chunk)
	copy(sp.buf, bytes.Repeat([]byte{0xee}, chunk))
	w2.add(sp, 0, chunk, 3, 3)
	w2.release(sp)
	w2.drain()
	if fs := w2.failures(); len(fs) != 1 || fs[0].slot != 3 {
		t.Fatalf("a refused write: failures %v, want slot 3", fs)
	}
	p := make([]byte, chunk)
	if !w2.read(3, p, 0) || !bytes.Equal(p, bytes.Repeat([]byte{0xee}, chunk)) {
		t.Fatal("a copy whose write failed is no longer readable from memory")
	}
}
