package filebrowse_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/filebrowse"
	"umbra/internal/testutil"
)

// BenchmarkList100k lists a directory of 100 000 files in an ext4
// filesystem inside a backup image: the first page cold (mounting the
// image included), the first page of a mounted image, and every page
// through the HTTP handler as JSON.
//
//	go test -run '^$' -bench List100k -benchtime 5x ./filebrowse
func BenchmarkList100k(b *testing.B) {
	testutil.NeedRoot(b)
	testutil.NeedFUSE(b)
	testutil.Need(b, "mkfs.ext4", "losetup", "mount")
	const n = 100_000
	dir := b.TempDir()
	img := makeFS(b, "ext4", dir, 256<<20, func(root string) {
		os.Mkdir(filepath.Join(root, "many"), 0o755)
		for i := range n {
			f, err := os.Create(filepath.Join(root, "many", fmt.Sprintf("file-%06d.dat", i)))
			if err != nil {
				b.Fatal(err)
			}
			f.Close()
		}
	}, "-N", "120000")
	repo, id := testutil.BackupFile(b, dir, img, "vol")
	br, err := filebrowse.New(filebrowse.Options{Dir: dir})
	if err != nil {
		b.Fatal(err)
	}
	defer br.Close()
	src := filebrowse.BackupImage(repo, opener(repo), id)
	ctx := context.Background()

	b.Run("cold-first-page", func(b *testing.B) {
		for b.Loop() {
			br.Drop(src.Key())
			t, err := br.Open(ctx, src)
			if err != nil {
				b.Fatal(err)
			}
			p, err := t.List(ctx, "many", "", 500)
			if err != nil || len(p.Entries) != 500 {
				b.Fatal(err)
			}
			t.Close()
		}
	})
	b.Run("first-page", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			t, err := br.Open(ctx, src)
			if err != nil {
				b.Fatal(err)
			}
			p, err := t.List(ctx, "many", "", 500)
			if err != nil || len(p.Entries) != 500 {
				b.Fatal(err)
			}
			t.Close()
		}
	})
	b.Run("all-pages", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			t, err := br.Open(ctx, src)
			if err != nil {
				b.Fatal(err)
			}
			total := 0
			for cursor := ""; ; {
				p, err := t.List(ctx, "many", cursor, 1000)
				if err != nil {
					b.Fatal(err)
				}
				total += len(p.Entries)
				if p.Next == "" {
					break
				}
				cursor = p.Next
			}
			t.Close()
			if total != n {
				b.Fatalf("%d entries, want %d", total, n)
			}
		}
		b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "entries/s")
	})
	// The peer: ls -lU (no sorting) of the same directory on the same
	// mount, the whole directory at once.
	b.Run("ls-lU", func(b *testing.B) {
		t, err := br.Open(ctx, src)
		if err != nil {
			b.Fatal(err)
		}
		defer t.Close()
		mi, _ := os.ReadFile("/proc/self/mountinfo")
		var mnt string
		for _, l := range strings.Split(string(mi), "\n") {
			if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], br.Dir()+"/fs-") {
				mnt = f[4]
			}
		}
		if mnt == "" {
			b.Fatal("the browser's mount is not in mountinfo")
		}
		for b.Loop() {
			out, err := exec.Command("sh", "-c", "ls -lU --color=never "+mnt+"/many | wc -l").Output()
			if err != nil || strings.TrimSpace(string(out)) != fmt.Sprint(n+1) {
				b.Fatalf("ls: %v %s", err, out)
			}
		}
		b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "entries/s")
	})
	h := br.Handler(filebrowse.HandlerOptions{Image: func(*http.Request, string, string) (filebrowse.Source, error) { return src, nil }})
	srv := httptest.NewServer(h)
	defer srv.Close()
	b.Run("all-pages-http", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			total := 0
			for cursor := ""; ; {
				res, err := http.Get(srv.URL + "/image/r/" + id + "/many/?format=json&limit=1000&cursor=" + cursor)
				if err != nil {
					b.Fatal(err)
				}
				var p filebrowse.Page
				err = json.NewDecoder(res.Body).Decode(&p)
				res.Body.Close()
				if err != nil {
					b.Fatal(err)
				}
				total += len(p.Entries)
				if p.Next == "" {
					break
				}
				cursor = p.Next
			}
			if total != n {
				b.Fatalf("%d entries, want %d", total, n)
			}
		}
		b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "entries/s")
	})
}
