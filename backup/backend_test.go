package backup_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"umbra/backup"
	"umbra/internal/testutil"
)

// bothBackends makes a repository location of each kind: a local
// directory, a bucket on a versitygw of the test's own.
var bothBackends = map[string]func(t *testing.T) string{
	"local": func(t *testing.T) string { return filepath.Join(t.TempDir(), "repo") },
	"S3":    func(t *testing.T) string { return testutil.StartS3(t).Location("repo") },
}

// TestBackendGetInto: both backends read into the caller's buffer when
// it has room (the same memory comes back), into new memory when it has
// not, a range or the rest of an object; a range past the end is
// io.ErrUnexpectedEOF, a missing object fs.ErrNotExist.
func TestBackendGetInto(t *testing.T) {
	ctx := context.Background()
	for kind, loc := range bothBackends {
		t.Run(kind, func(t *testing.T) {
			be, err := backup.OpenBackend(loc(t), s3Settings.Cred)
			if err != nil {
				t.Fatal(err)
			}
			r := rand.New(rand.NewPCG(51, 52))
			obj := make([]byte, 300<<10)
			for i := range obj {
				obj[i] = byte(r.Uint32())
			}
			if err := be.Put(ctx, "packs/ab/obj", obj); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 0, 256<<10)
			for _, c := range []struct{ off, n int64 }{{0, 100}, {1000, 256 << 10}, {5, 0}, {int64(len(obj)) - 7, 7}} {
				got, err := be.GetInto(ctx, "packs/ab/obj", c.off, c.n, buf)
				if err != nil {
					t.Fatalf("%d bytes at %d: %v", c.n, c.off, err)
				}
				if !bytes.Equal(got, obj[c.off:c.off+c.n]) {
					t.Fatalf("%d bytes at %d read wrong", c.n, c.off)
				}
				if c.n > 0 && &got[0] != &buf[:1][0] {
					t.Fatalf("%d bytes at %d not read into the buffer given", c.n, c.off)
				}
			}
			// No room: new memory, the buffer untouched.
			clear(buf[:cap(buf)])
			got, err := be.GetInto(ctx, "packs/ab/obj", 10, 257<<10, buf)
			if err != nil || !bytes.Equal(got, obj[10:10+257<<10]) {
				t.Fatalf("a read larger than the buffer: %v", err)
			}
			if bytes.Count(buf[:cap(buf)], []byte{0}) != cap(buf) {
				t.Fatal("a read larger than the buffer wrote into it")
			}
			// The rest of the object.
			if got, err := be.GetInto(ctx, "packs/ab/obj", 100, -1, buf); err != nil || !bytes.Equal(got, obj[100:]) {
				t.Fatalf("the rest from 100: %d bytes, %v", len(got), err)
			}
			if _, err := be.GetInto(ctx, "packs/ab/obj", int64(len(obj))-10, 20, buf); !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("a range past the end: %v, want io.ErrUnexpectedEOF", err)
			}
			if _, err := be.GetInto(ctx, "packs/ab/none", 0, 10, buf); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("a missing object: %v, want fs.ErrNotExist", err)
			}
		})
	}
}

// packReads counts a backend's reads of packs: Gets, and GetIntos given
// no buffer.
type packReads struct {
	backup.Backend
	mu                    sync.Mutex
	gets, intos, noBuffer int
}

func (p *packReads) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	if strings.HasPrefix(name, "packs/") {
		p.mu.Lock()
		p.gets++
		p.mu.Unlock()
	}
	return p.Backend.Get(ctx, name, off, length)
}

func (p *packReads) GetInto(ctx context.Context, name string, off, length int64, buf []byte) ([]byte, error) {
	if strings.HasPrefix(name, "packs/") {
		p.mu.Lock()
		p.intos++
		if cap(buf) == 0 {
			p.noBuffer++
		}
		p.mu.Unlock()
	}
	return p.Backend.GetInto(ctx, name, off, length, buf)
}

// TestRestoreReadsIntoReusedBuffers: a restore's workers read packs into
// a buffer each, kept from read to read, from any backend (it was a
// local repository's alone: S3's reads each left their bytes as
// garbage): only a worker's first read is given no buffer.
func TestRestoreReadsIntoReusedBuffers(t *testing.T) {
	defer backup.SetGroupRaw(16 << 10)()
	defer backup.SetRestoreCache(0)() // blobs read again at each use: many reads
	defer backup.SetRestoreNextCache(0)()
	const workers = 2 // a worker a core (the backend wrapped is not S3's)
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(workers))
	ctx := context.Background()
	for kind, loc := range bothBackends {
		t.Run(kind, func(t *testing.T) {
			repo, err := backup.InitWith(ctx, loc(t), s3Settings)
			if err != nil {
				t.Fatal(err)
			}
			defer repo.Close()
			r := rand.New(rand.NewPCG(61, 62))
			src := volumeData(r, 16<<20)
			if _, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"}); err != nil {
				t.Fatal(err)
			}
			// Scattered changes: the next image's blobs alternate
			// between two packs, read in many pieces.
			for off := 0; off < len(src); off += 4096 * (1 + r.IntN(8)) {
				src[off] ^= 0xff
			}
			x, _, err := repo.Backup(ctx, src, backup.Options{Volume: "v"})
			if err != nil {
				t.Fatal(err)
			}
			reads := &packReads{}
			defer backup.SetBackend(repo, func(be backup.Backend) backup.Backend { reads.Backend = be; return reads })()
			out := filepath.Join(t.TempDir(), "out.img")
			if err := repo.Restore(x.ID, out, nil); err != nil {
				t.Fatal(err)
			}
			if got, _ := os.ReadFile(out); !bytes.Equal(got, src) {
				t.Fatal("the restore differs from the volume")
			}
			t.Logf("%d reads of packs, %d without a buffer", reads.intos, reads.noBuffer)
			if reads.gets > 0 || reads.intos < 4*workers || reads.noBuffer > workers {
				t.Fatalf("%d Gets of packs, %d GetIntos of which %d without a buffer; want GetIntos only (at least %d), each of %d workers' first without one",
					reads.gets, reads.intos, reads.noBuffer, 4*workers, workers)
			}
		})
	}
}
