package frontend_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"umbra/backup"
	"umbra/cow"
	"umbra/frontend"
	"umbra/fusefile"
	"umbra/internal/testutil"
	"umbra/nbd"
	"umbra/provider"
)

// volume opens a 256 KiB COW volume "vol" whose first 4 KiB hold 0xaa,
// with a snapshot "s1" taken then, and the provider serving it.
func volume(t *testing.T) (*cow.Provider, *cow.Volume) {
	t.Helper()
	dir := t.TempDir()
	origin := testutil.SparseFile(t, filepath.Join(dir, "vol.img"), 256<<10)
	v, err := cow.Open("vol", origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	if _, err := v.WriteAt(bytes.Repeat([]byte{0xaa}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s1"}); err != nil {
		t.Fatal(err)
	}
	p := cow.NewProvider()
	p.Add(v)
	return p, v
}

func TestNames(t *testing.T) {
	p, v := volume(t)
	if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s0"}); err != nil {
		t.Fatal(err)
	}
	want := []string{"vol", "vol@s0", "vol@s1"}
	if got := frontend.Names(p); !slices.Equal(got, want) {
		t.Fatalf("Names = %q, want %q", got, want)
	}
	for name, got := range map[string][]string{
		"NBDExports": frontend.NBDExports(p, nil).List(),
		"FUSESource": frontend.FUSESource(p).List(),
	} {
		if !slices.Equal(got, want) {
			t.Errorf("%s.List = %q, want %q", name, got, want)
		}
	}
}

// TestSnapshotReadOnly: a snapshot's export and file refuse writes and
// keep the bytes of the snapshot's commit.
func TestSnapshotReadOnly(t *testing.T) {
	p, v := volume(t)
	if _, err := v.WriteAt(bytes.Repeat([]byte{0xbb}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	exp, err := frontend.NBDExports(p, nil).Lookup("vol@s1")
	if err != nil {
		t.Fatal(err)
	}
	defer exp.Release()
	fe, err := frontend.FUSESource(p).Open("vol@s1")
	if err != nil {
		t.Fatal(err)
	}
	defer fe.Release()
	if !exp.ReadOnly || !fe.ReadOnly {
		t.Fatalf("snapshot served read-write: NBD ReadOnly %v, FUSE ReadOnly %v", exp.ReadOnly, fe.ReadOnly)
	}
	for name, b := range map[string]nbd.Backend{"NBD": exp.Backend, "FUSE": fe.Backend} {
		if n, err := b.WriteAt([]byte{1, 2, 3}, 0); n != 0 || !errors.Is(err, frontend.ErrReadOnly) {
			t.Errorf("%s: WriteAt to a snapshot = %d, %v; want 0, ErrReadOnly", name, n, err)
		}
		if err := b.Flush(); err != nil {
			t.Errorf("%s: Flush: %v", name, err)
		}
		if b.Size() != v.Size() {
			t.Errorf("%s: Size %d, want %d", name, b.Size(), v.Size())
		}
		got := make([]byte, 4096)
		if _, err := b.ReadAt(got, 0); err != nil {
			t.Fatalf("%s: ReadAt: %v", name, err)
		}
		if !bytes.Equal(got, bytes.Repeat([]byte{0xaa}, 4096)) {
			t.Errorf("%s: the snapshot does not read the bytes of its commit", name)
		}
		// No write fast path may bypass the refusal.
		if _, ok := b.(nbd.TryWriter); ok {
			t.Errorf("%s: a read-only backend offers TryWriteAt", name)
		}
		if _, ok := b.(nbd.SpliceWriter); ok {
			t.Errorf("%s: a read-only backend offers TryWriteFrom", name)
		}
	}
}

func TestLookupNotFound(t *testing.T) {
	p, _ := volume(t)
	for _, name := range []string{"nope", "vol@nope", "nope@s1"} {
		if _, err := frontend.NBDExports(p, nil).Lookup(name); !errors.Is(err, provider.ErrNotFound) {
			t.Errorf("NBD Lookup(%q) = %v, want ErrNotFound", name, err)
		}
		if _, err := frontend.FUSESource(p).Open(name); !errors.Is(err, provider.ErrNotFound) {
			t.Errorf("FUSE Open(%q) = %v, want ErrNotFound", name, err)
		}
	}
	// With a registry that knows no other provider, a system snapshot's
	// name is not found either.
	reg := &provider.Registry{}
	reg.Register(p)
	if _, err := frontend.NBDExports(p, reg).Lookup("other@s1"); !errors.Is(err, provider.ErrNotFound) {
		t.Errorf("Lookup of another provider's unknown snapshot = %v, want ErrNotFound", err)
	}
}

// TestVolumeUse: while an NBD connection or an open FUSE file uses the
// volume, revert refuses and names it; once released, revert works.
func TestVolumeUse(t *testing.T) {
	p, v := volume(t)
	exp, err := frontend.NBDExports(p, nil).Lookup("vol")
	if err != nil {
		t.Fatal(err)
	}
	if exp.ReadOnly || exp.Backend != nbd.Backend(v) {
		t.Fatalf("volume export: ReadOnly %v, backend %T; want the volume read-write", exp.ReadOnly, exp.Backend)
	}
	fe, err := frontend.FUSESource(p).Open("vol")
	if err != nil {
		t.Fatal(err)
	}
	if fe.ReadOnly || fe.Opened == nil {
		t.Fatalf("volume file: ReadOnly %v, Opened set %v", fe.ReadOnly, fe.Opened != nil)
	}
	closed := fe.Opened()
	users := strings.Join(v.Users(), ", ")
	if !strings.Contains(users, "NBD connection") || !strings.Contains(users, "open FUSE file") {
		t.Fatalf("users = %q, want the NBD connection and the FUSE file", users)
	}
	if err := v.Revert("s1"); !errors.Is(err, cow.ErrInUse) {
		t.Fatalf("revert while in use = %v, want ErrInUse", err)
	}
	exp.Release()
	closed()
	if u := v.Users(); len(u) != 0 {
		t.Fatalf("users after release = %q", u)
	}
	if err := v.Revert("s1"); err != nil {
		t.Fatalf("revert after release: %v", err)
	}
}

// memSource is an in-memory volume to back up.
type memSource []byte

func (m memSource) ReadAt(p []byte, off int64) (int, error) { return copy(p, m[off:]), nil }
func (m memSource) Size() int64                             { return int64(len(m)) }

// image backs up a 64 KiB volume whose chunks 0 and 2 hold data and the
// rest zeros into a new repository, and opens the image.
func image(t *testing.T) (*backup.ImageReader, memSource) {
	t.Helper()
	src := make(memSource, 64<<10)
	copy(src[:4096], bytes.Repeat([]byte{0x11}, 4096))
	copy(src[8192:12288], bytes.Repeat([]byte{0x22}, 4096))
	repo, err := backup.Init(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(repo.Close)
	ctx := context.Background()
	x, _, err := repo.Backup(ctx, src, backup.Options{Volume: "vol", Snapshot: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	ir, err := repo.OpenImage(ctx, x.ID)
	if err != nil {
		t.Fatal(err)
	}
	if x.ChunkSize != 4096 {
		t.Fatalf("chunk size %d, the test assumes 4096", x.ChunkSize)
	}
	return ir, src
}

func TestImageExports(t *testing.T) {
	ir, src := image(t)
	exps := frontend.ImageExports("img", ir)
	if got := exps.List(); !slices.Equal(got, []string{"img"}) {
		t.Fatalf("List = %q", got)
	}
	if _, err := exps.Lookup("other"); err == nil || !strings.Contains(err.Error(), "img") {
		t.Fatalf("Lookup of another name = %v, want an error naming the image served", err)
	}
	for _, name := range []string{"img", ""} { // "": the default export
		exp, err := exps.Lookup(name)
		if err != nil {
			t.Fatalf("Lookup(%q): %v", name, err)
		}
		if !exp.ReadOnly {
			t.Fatalf("Lookup(%q): served read-write", name)
		}
		if _, err := exp.Backend.WriteAt([]byte{1}, 0); !errors.Is(err, frontend.ErrReadOnly) {
			t.Fatalf("WriteAt to an image = %v, want ErrReadOnly", err)
		}
		got := make([]byte, len(src))
		if _, err := exp.Backend.ReadAt(got, 0); err != nil || !bytes.Equal(got, src) {
			t.Fatalf("the image reads other bytes than were backed up (err %v)", err)
		}
	}
	exp, _ := exps.Lookup("img")
	for _, tc := range []struct {
		off, n int64
		want   []nbd.Extent
	}{
		{0, 64 << 10, []nbd.Extent{
			{Off: 0, Len: 4096},
			{Off: 4096, Len: 4096, Hole: true, Zero: true},
			{Off: 8192, Len: 4096},
			{Off: 12288, Len: 52 << 10, Hole: true, Zero: true},
		}},
		// Ranges that start and end inside chunks.
		{2048, 4096, []nbd.Extent{
			{Off: 2048, Len: 2048},
			{Off: 4096, Len: 2048, Hole: true, Zero: true},
		}},
		{16 << 10, 8 << 10, []nbd.Extent{{Off: 16 << 10, Len: 8 << 10, Hole: true, Zero: true}}},
	} {
		got, err := exp.Extents(tc.off, tc.n)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("Extents(%d, %d) = %+v, want %+v", tc.off, tc.n, got, tc.want)
		}
	}
}

// TestImageExportsRealClient serves an image over NBD to libnbd's
// nbdinfo and qemu-io.
func TestImageExportsRealClient(t *testing.T) {
	testutil.Need(t, "nbdinfo", "qemu-io")
	ir, _ := image(t)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(frontend.ImageExports("img", ir), nbd.Options{})
	done := make(chan struct{})
	go func() { srv.Serve(context.Background(), l); close(done) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	}()
	uri := "nbd+unix:///img?socket=" + sock
	// nbdinfo --map: offset, length, type (0 data, 3 hole and zero).
	var got []string
	for _, line := range strings.Split(strings.TrimSpace(testutil.Run(t, "nbdinfo", "--map", uri)), "\n") {
		if f := strings.Fields(line); len(f) >= 3 {
			got = append(got, strings.Join(f[:3], " "))
		}
	}
	want := []string{"0 4096 0", "4096 4096 3", "8192 4096 0", "12288 53248 3"}
	if !slices.Equal(got, want) {
		t.Errorf("nbdinfo --map = %q, want %q", got, want)
	}
	testutil.Run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 4k", "-c", "read -P 0x22 8k 4k", "-c", "read -P 0 12k 52k", uri)
	out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k", uri).CombinedOutput()
	if err == nil && !strings.Contains(string(out), "failed") {
		t.Fatalf("qemu-io wrote to a read-only image export:\n%s", out)
	}
}

func TestImageFUSESource(t *testing.T) {
	ir, _ := image(t)
	src := frontend.ImageFUSESource("img", ir)
	if got := src.List(); !slices.Equal(got, []string{"img"}) {
		t.Fatalf("List = %q", got)
	}
	if _, err := src.Open("other"); err == nil || !strings.Contains(err.Error(), "other") {
		t.Fatalf("Open of another name = %v, want an error naming it", err)
	}
	e, err := src.Open("img")
	if err != nil {
		t.Fatal(err)
	}
	if !e.ReadOnly {
		t.Fatal("image file served read-write")
	}
	if _, err := e.Backend.WriteAt([]byte{1}, 0); !errors.Is(err, frontend.ErrReadOnly) {
		t.Fatalf("WriteAt to an image file = %v, want ErrReadOnly", err)
	}
}

// TestFUSEMount mounts a volume and its snapshot as files: the volume's
// file takes writes, the snapshot's refuses to open for writing and reads
// the bytes of its commit.
func TestFUSEMount(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.NeedFUSE(t)
	p, v := volume(t)
	dir := t.TempDir()
	m, err := fusefile.Mount(dir, frontend.FUSESource(p), fusefile.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Unmount()

	f, err := os.OpenFile(filepath.Join(dir, "vol"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xcc}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0xcc}, 4096)) {
		t.Fatalf("a write through the volume's file did not reach the volume (err %v)", err)
	}

	snap := filepath.Join(dir, "vol@s1")
	if _, err := os.OpenFile(snap, os.O_WRONLY, 0); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("opening the snapshot's file for writing = %v, want EROFS", err)
	}
	b, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != v.Size() || !bytes.Equal(b[:4096], bytes.Repeat([]byte{0xaa}, 4096)) {
		t.Fatalf("the snapshot's file reads %d bytes, not the bytes of its commit", len(b))
	}
}
