package filebrowse_test

import (
	"archive/tar"
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"umbra/backup"
	"umbra/cow"
	"umbra/filebrowse"
	"umbra/internal/testutil"
	"umbra/provider"
)

// tree is what the test filesystems hold: regular files by path, plus
// links, a fifo and a directory of many files.
type tree struct {
	files map[string][]byte // path from the root -> content
	links map[string]string // path -> target
	many  int               // files in /many
}

func need(t *testing.T, tools ...string) {
	t.Helper()
	testutil.NeedRoot(t)
	testutil.NeedFUSE(t)
	testutil.Need(t, append([]string{"losetup", "mount", "umount", "blkid"}, tools...)...)
}

// makeFS makes an image file holding a filesystem of fstype with the
// test's tree, mounted only while it is filled.
func makeFS(t testing.TB, fstype, dir string, size int64, fill func(root string), mkfs ...string) string {
	t.Helper()
	img := testutil.SparseFile(t, filepath.Join(dir, fstype+".img"), size)
	testutil.Run(t, "mkfs."+fstype, append(append([]string{"-q"}, mkfs...), img)...)
	dev, detach := testutil.Attach(t, img, false, false)
	defer detach()
	mnt := filepath.Join(dir, "fill-"+fstype)
	os.Mkdir(mnt, 0o755)
	testutil.Run(t, "mount", dev, mnt)
	defer func() {
		testutil.Run(t, "umount", mnt)
		os.Remove(mnt)
	}()
	fill(mnt)
	return img
}

func fillTree(t testing.TB, root string, many int) tree {
	t.Helper()
	big := make([]byte, 3<<20+12345)
	rand.Read(big)
	tr := tree{files: map[string][]byte{
		"hello.txt":                  []byte("hello\n"),
		"big.bin":                    big,
		"sub dir/ünï cödé.txt":       []byte("unicode name\n"),
		"sub dir/nested/deep.txt":    []byte("deep\n"),
		"sub dir/nested/empty":       {},
		`sub dir/quote"and;semi.txt`: []byte("odd name\n"),
	}, links: map[string]string{
		"link-out":         "/etc/passwd",
		"link-up":          "../../../../etc",
		"sub dir/link-in":  "../hello.txt",
		"sub dir/link-dir": "nested",
	}, many: many}
	for p, b := range tr.files {
		os.MkdirAll(filepath.Join(root, filepath.Dir(p)), 0o755)
		if err := os.WriteFile(filepath.Join(root, p), b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	for p, target := range tr.links {
		if err := os.Symlink(target, filepath.Join(root, p)); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mkfifo(filepath.Join(root, "sub dir/fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(filepath.Join(root, "many"), 0o755)
	for i := range many {
		if err := os.WriteFile(filepath.Join(root, "many", fmt.Sprintf("f%06d", i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return tr
}

func opener(repo string) filebrowse.RepoOpener {
	return func(ctx context.Context) (*backup.Repo, func(), error) {
		r, err := backup.Open(repo)
		if err != nil {
			return nil, nil, err
		}
		return r, r.Close, nil
	}
}

// checkGone fails unless nothing of b is left: no mount and no loop
// device under its directory, and the directory itself.
func checkGone(t *testing.T, dir string) {
	t.Helper()
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), dir) {
		t.Errorf("mounts left under %s:\n%s", dir, grepLines(string(mi), dir))
	}
	out, _ := exec.Command("losetup", "-a").CombinedOutput()
	if strings.Contains(string(out), dir) {
		t.Errorf("loop devices left over files under %s:\n%s", dir, grepLines(string(out), dir))
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s left: %v", dir, err)
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func get(t *testing.T, u string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest("GET", u, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res, b
}

// rawGet sends path as it is, unclean (http.Client would not).
func rawGet(t *testing.T, srv *httptest.Server, rawPath string) (int, string) {
	t.Helper()
	u, _ := url.Parse(srv.URL)
	c, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\nConnection: close\r\n\r\n", rawPath)
	b, _ := io.ReadAll(c)
	s := string(b)
	var code int
	fmt.Sscanf(s, "HTTP/1.1 %d", &code)
	return code, s
}

// TestBrowse browses an ext4 and an xfs filesystem in a backup image
// and an ext4 in a snapshot over HTTP: listing (a page at a time),
// downloads whose checksums match, folders as tar and zip whose
// contents match, and every way out of the tree refused; at Close
// nothing is left.
func TestBrowse(t *testing.T) {
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) {
			need(t, "mkfs."+fstype)
			dir := t.TempDir()
			size := int64(64 << 20)
			if fstype == "xfs" {
				size = 300 << 20 // mkfs.xfs's smallest
			}
			var tr tree
			img := makeFS(t, fstype, dir, size, func(root string) { tr = fillTree(t, root, 250) })
			repo, id := testutil.BackupFile(t, dir, img, "vol")

			b, err := filebrowse.New(filebrowse.Options{Dir: dir})
			if err != nil {
				t.Fatal(err)
			}
			bdir := b.Dir()
			defer func() {
				if err := b.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
				checkGone(t, bdir)
			}()
			var srcs []string
			h := b.Handler(filebrowse.HandlerOptions{
				PageSize: 100,
				Image: func(r *http.Request, repoName, imageID string) (filebrowse.Source, error) {
					if repoName != "main" {
						return nil, fmt.Errorf("repository %q: %w", repoName, provider.ErrNotFound)
					}
					srcs = append(srcs, imageID)
					return filebrowse.BackupImage(repo, opener(repo), imageID), nil
				},
			})
			srv := httptest.NewServer(http.StripPrefix("/browse", h))
			defer srv.Close()
			base := srv.URL + "/browse/image/main/" + id + "/"
			checkSite(t, srv, base, "/browse/image/main/"+id+"/", tr)
		})
	}
}

// TestBrowseSnapshot browses a COW snapshot of a volume holding ext4,
// and the snapshot cannot be deleted while it is mounted.
func TestBrowseSnapshot(t *testing.T) {
	need(t, "mkfs.ext4")
	dir := t.TempDir()
	var tr tree
	img := makeFS(t, "ext4", dir, 64<<20, func(root string) { tr = fillTree(t, root, 250) })
	v, err := cow.Open("vol", img, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	p := cow.NewProvider()
	p.Add(v)
	reg := &provider.Registry{}
	reg.Register(p)
	snap, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	// The volume changes after the snapshot; the snapshot does not.
	if _, err := v.WriteAt(make([]byte, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	b, err := filebrowse.New(filebrowse.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	bdir := b.Dir()
	defer func() {
		b.Close()
		checkGone(t, bdir)
	}()
	h := b.Handler(filebrowse.HandlerOptions{PageSize: 100,
		Snapshot: func(r *http.Request, vol, id string) (filebrowse.Source, error) {
			return filebrowse.Snapshot(reg, vol, id), nil
		}})
	srv := httptest.NewServer(h)
	defer srv.Close()
	checkSite(t, srv, srv.URL+"/snapshot/vol/"+snap.ID+"/", "/snapshot/vol/"+snap.ID+"/", tr)

	if err := p.Delete(context.Background(), "vol", snap.ID); err == nil {
		t.Fatal("a snapshot being browsed was deleted")
	}
	if err := b.Drop(filebrowse.SnapshotKey("vol", snap.ID)); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete(context.Background(), "vol", snap.ID); err != nil {
		t.Fatalf("delete after Drop: %v", err)
	}
	res, body := get(t, srv.URL+"/snapshot/vol/"+snap.ID+"/?format=json")
	if res.StatusCode != http.StatusNotFound {
		t.Errorf("a deleted snapshot: %d %s, want 404", res.StatusCode, body)
	}
	res, body = get(t, srv.URL+"/snapshot/nosuchvol/s1/?format=json")
	if res.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "nosuchvol") {
		t.Errorf("an unknown volume: %d %s, want 404 naming it", res.StatusCode, body)
	}
}

// checkSite checks the handler's pages of one source whose root is at
// base (path rootPath on the server).
func checkSite(t *testing.T, srv *httptest.Server, base, rootPath string, tr tree) {
	// The root as JSON.
	res, body := get(t, base+"?format=json")
	if res.StatusCode != 200 {
		t.Fatalf("root: %d %s", res.StatusCode, body)
	}
	var page filebrowse.Page
	if err := json.Unmarshal(body, &page); err != nil {
		t.Fatal(err)
	}
	kinds := map[string]filebrowse.Entry{}
	for _, e := range page.Entries {
		kinds[e.Name] = e
	}
	for name, kind := range map[string]string{"hello.txt": "file", "big.bin": "file", "sub dir": "dir", "many": "dir", "link-out": "symlink", "link-up": "symlink"} {
		if kinds[name].Kind != kind {
			t.Errorf("root entry %q: %+v, want a %s", name, kinds[name], kind)
		}
	}
	if e := kinds["big.bin"]; e.Size != int64(len(tr.files["big.bin"])) {
		t.Errorf("big.bin size %d, want %d", e.Size, len(tr.files["big.bin"]))
	}
	if kinds["link-out"].Target != "/etc/passwd" {
		t.Errorf("link-out: %+v", kinds["link-out"])
	}

	// The root as HTML names its entries, escaped.
	res, body = get(t, base)
	if res.StatusCode != 200 || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("root HTML: %d %s", res.StatusCode, res.Header.Get("Content-Type"))
	}
	for _, want := range []string{`href="./hello.txt"`, `href="./sub%20dir/"`, "→ /etc/passwd", "?archive=zip"} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("root HTML lacks %s:\n%s", want, body)
		}
	}
	res, body = get(t, base+url.PathEscape("sub dir")+"/")
	if !bytes.Contains(body, []byte(`quote&#34;and;semi.txt`)) || !bytes.Contains(body, []byte("special file")) {
		t.Errorf("sub dir HTML: %d\n%s", res.StatusCode, body)
	}

	// /many a page at a time: every name once.
	seen := map[string]bool{}
	pages := 0
	for cursor := ""; ; pages++ {
		res, body := get(t, base+"many/?format=json&cursor="+cursor)
		if res.StatusCode != 200 {
			t.Fatalf("many, cursor %q: %d %s", cursor, res.StatusCode, body)
		}
		var p filebrowse.Page
		json.Unmarshal(body, &p)
		if len(p.Entries) > 100 {
			t.Fatalf("a page of %d entries, want at most 100", len(p.Entries))
		}
		for _, e := range p.Entries {
			if seen[e.Name] {
				t.Fatalf("%s listed twice", e.Name)
			}
			seen[e.Name] = true
		}
		if p.Next == "" {
			break
		}
		cursor = p.Next
	}
	if len(seen) != tr.many || pages != 2 {
		t.Errorf("many: %d names in %d pages, want %d in 3", len(seen), pages+1, tr.many)
	}
	res, _ = get(t, base+"many/?format=json&cursor=zzzz")
	if res.StatusCode != http.StatusBadRequest && res.StatusCode != 200 {
		t.Errorf("a made-up cursor: %d", res.StatusCode)
	}
	res, body = get(t, base+"many/?format=json&cursor=-1")
	if res.StatusCode != http.StatusBadRequest {
		t.Errorf("a bad cursor: %d %s, want 400", res.StatusCode, body)
	}

	// Downloads: checksums, sizes, names.
	for p, want := range tr.files {
		u := base + escapePath(p)
		res, body := get(t, u)
		if res.StatusCode != 200 {
			t.Errorf("download %s: %d %s", p, res.StatusCode, body)
			continue
		}
		if sha256.Sum256(body) != sha256.Sum256(want) {
			t.Errorf("download %s: checksum differs (%d bytes, want %d)", p, len(body), len(want))
		}
		if res.ContentLength != int64(len(want)) {
			t.Errorf("download %s: Content-Length %d, want %d", p, res.ContentLength, len(want))
		}
		if ct := res.Header.Get("Content-Type"); ct != "application/octet-stream" {
			t.Errorf("download %s: Content-Type %q", p, ct)
		}
		cd := res.Header.Get("Content-Disposition")
		_, params, err := mime.ParseMediaType(cd)
		if err != nil || params["filename"] != filepath.Base(p) {
			t.Errorf("download %s: Content-Disposition %q: %v %q", p, cd, err, params["filename"])
		}
	}
	res, body = get(t, base+"big.bin", "Range", "bytes=1000-1999")
	if res.StatusCode != http.StatusPartialContent || !bytes.Equal(body, tr.files["big.bin"][1000:2000]) {
		t.Errorf("range: %d, %d bytes", res.StatusCode, len(body))
	}

	// Folders as tar and zip.
	wantUnder := func(dir string) map[string]string {
		out := map[string]string{}
		for p, b := range tr.files {
			if rel, ok := strings.CutPrefix(p, dir); ok || dir == "" {
				if dir == "" {
					rel = p
				}
				out[rel] = string(b)
			}
		}
		for p, target := range tr.links {
			if rel, ok := strings.CutPrefix(p, dir); ok || dir == "" {
				if dir == "" {
					rel = p
				}
				out[rel] = "-> " + target
			}
		}
		return out
	}
	res, body = get(t, base+url.PathEscape("sub dir")+"/?archive=tar")
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "application/x-tar" {
		t.Fatalf("tar: %d %s", res.StatusCode, res.Header)
	}
	if got, want := readTar(t, body), wantUnder("sub dir/"); !equal(got, want) {
		t.Errorf("tar of /sub dir:\n got %v\nwant %v", keys(got), keys(want))
	}
	if cd := res.Header.Get("Content-Disposition"); !strings.Contains(cd, `sub dir.tar`) {
		t.Errorf("tar Content-Disposition %q", cd)
	}
	res, body = get(t, base+"?archive=zip")
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "application/zip" {
		t.Fatalf("zip: %d %s", res.StatusCode, res.Header)
	}
	got := readZip(t, body)
	want := wantUnder("")
	for i := range tr.many {
		want[fmt.Sprintf("many/f%06d", i)] = ""
	}
	if !equal(got, want) {
		t.Errorf("zip of /: %d entries, want %d:\n got %v\nwant %v", len(got), len(want), keys(got)[:10], keys(want)[:10])
	}

	// Ways out of the tree, and things never served.
	for _, c := range []struct {
		path string
		code int
	}{
		{"link-out", 200},                  // the link itself: its entry
		{"link-up/", http.StatusForbidden}, // through a link: never
		{"link-up/passwd", http.StatusForbidden},
		{"sub%20dir/link-dir/deep.txt", http.StatusForbidden},
		{"sub%20dir/link-in", 200},
		{"sub%20dir/fifo", 200},
		{"sub%20dir/fifo?download=1", 200},
		{"a%2F..%2F..%2F..%2Fetc%2Fpasswd", http.StatusBadRequest},
		{"..%2F..%2Fetc", http.StatusBadRequest},
		{"nosuch", http.StatusNotFound},
		{"hello.txt/", http.StatusConflict},
		{"?archive=rar", http.StatusBadRequest},
	} {
		res, body := get(t, base+c.path, "Accept", "application/json")
		if res.StatusCode != c.code {
			t.Errorf("GET %s: %d %s, want %d", c.path, res.StatusCode, body, c.code)
		}
		if c.code == 200 && res.Header.Get("Content-Type") != "application/json" {
			t.Errorf("GET %s: %s, want its entry as JSON", c.path, res.Header.Get("Content-Type"))
		}
	}
	// A link or a fifo is never downloaded, even asked for as HTML.
	for _, p := range []string{"link-out", "sub%20dir/fifo"} {
		res, body := get(t, base+p)
		if res.Header.Get("Content-Disposition") != "" || bytes.Contains(body, []byte("root:")) {
			t.Errorf("GET %s downloaded something: %s", p, body)
		}
	}
	// Paths with ".." sent as they are.
	for _, raw := range []string{rootPath + "../../../etc/passwd", rootPath + "sub%20dir/../../x", rootPath + "..%2f..%2fetc"} {
		code, resp := rawGet(t, srv, raw)
		if code == 200 || strings.Contains(resp, "root:") {
			t.Errorf("GET %s: %d\n%s", raw, code, resp)
		}
	}
}

func escapePath(p string) string {
	parts := strings.Split(p, "/")
	for i := range parts {
		parts[i] = url.PathEscape(parts[i])
	}
	return strings.Join(parts, "/")
}

func readTar(t *testing.T, b []byte) map[string]string {
	t.Helper()
	out := map[string]string{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("tar: %v", err)
		}
		switch h.Typeflag {
		case tar.TypeReg:
			c, _ := io.ReadAll(tr)
			out[h.Name] = string(c)
		case tar.TypeSymlink:
			out[h.Name] = "-> " + h.Linkname
		case tar.TypeDir:
		default:
			t.Errorf("tar entry %s of type %c", h.Name, h.Typeflag)
		}
	}
}

func readZip(t *testing.T, b []byte) map[string]string {
	t.Helper()
	zr, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatalf("zip: %v", err)
	}
	out := map[string]string{}
	for _, f := range zr.File {
		if f.Mode().IsDir() {
			continue
		}
		rc, err := f.Open()
		if err != nil {
			t.Fatal(err)
		}
		c, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatalf("zip %s: %v", f.Name, err)
		}
		if f.Mode()&os.ModeSymlink != 0 {
			out[f.Name] = "-> " + string(c)
		} else {
			out[f.Name] = string(c)
		}
	}
	return out
}

func equal(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	if len(out) < 10 {
		out = append(out, make([]string, 10-len(out))...)
	}
	return out
}

// TestBrowserBounds: at most MaxMounts mounts, the one unused longest
// goes for a new one, one in use is never torn down, and a Tree refuses
// "..", links and special files directly too.
func TestBrowserBounds(t *testing.T) {
	need(t, "mkfs.ext4")
	dir := t.TempDir()
	img := makeFS(t, "ext4", dir, 32<<20, func(root string) { fillTree(t, root, 3) })
	repo, id := testutil.BackupFile(t, dir, img, "vol")
	b, err := filebrowse.New(filebrowse.Options{Dir: dir, MaxMounts: 1})
	if err != nil {
		t.Fatal(err)
	}
	bdir := b.Dir()
	defer func() {
		b.Close()
		checkGone(t, bdir)
	}()
	ctx := context.Background()
	a := filebrowse.BackupImage(repo, opener(repo), id)
	a2 := filebrowse.BackupImage(repo+"/", opener(repo), id) // another key, the same image
	ta, err := b.Open(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if ta.FSType() != "ext4" {
		t.Errorf("fstype %q", ta.FSType())
	}
	if _, err := b.Open(ctx, a2); !errors.Is(err, filebrowse.ErrBusy) {
		t.Fatalf("a second source while the first is used: %v, want ErrBusy", err)
	}
	for p, want := range map[string]error{
		"../..":           filebrowse.ErrBadPath,
		"/a/../../b":      filebrowse.ErrBadPath,
		"link-up/x":       filebrowse.ErrSymlink,
		"sub dir/link-in": filebrowse.ErrSymlink,
		"sub dir/fifo":    filebrowse.ErrSpecial,
		"sub dir":         filebrowse.ErrIsDir,
		"nosuch":          filebrowse.ErrNotExist,
	} {
		if f, _, err := ta.Open(p); !errors.Is(err, want) {
			if f != nil {
				f.Close()
			}
			t.Errorf("Open(%q): %v, want %v", p, err, want)
		}
	}
	if _, err := ta.List(ctx, "link-up", "", 10); !errors.Is(err, filebrowse.ErrSymlink) {
		t.Errorf("List(link-up): %v, want ErrSymlink", err)
	}
	ta.Close()
	tb, err := b.Open(ctx, a2)
	if err != nil {
		t.Fatalf("a second source once the first is unused: %v", err)
	}
	if m := b.Mounts(); len(m) != 1 || m[0].Key != a2.Key() {
		t.Errorf("mounts %+v, want only the second", m)
	}
	tb.Close()
	if err := b.Drop(a2.Key()); err != nil {
		t.Fatal(err)
	}
	if m := b.Mounts(); len(m) != 0 {
		t.Errorf("mounts after Drop: %+v", m)
	}
}

// TestBrowserIdle: a mount no reader uses goes once it has been idle.
func TestBrowserIdle(t *testing.T) {
	need(t, "mkfs.ext4")
	dir := t.TempDir()
	img := makeFS(t, "ext4", dir, 32<<20, func(root string) { fillTree(t, root, 3) })
	repo, id := testutil.BackupFile(t, dir, img, "vol")
	b, err := filebrowse.New(filebrowse.Options{Dir: dir, Idle: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	bdir := b.Dir()
	defer func() {
		b.Close()
		checkGone(t, bdir)
	}()
	tr, err := b.Open(context.Background(), filebrowse.BackupImage(repo, opener(repo), id))
	if err != nil {
		t.Fatal(err)
	}
	f, _, err := tr.Open("hello.txt")
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if len(b.Mounts()) != 1 {
		t.Fatalf("mounts %+v, want the one in use", b.Mounts())
	}
	tr.Close()
	// Wait for the reaper to unmount all (no bound: a loaded machine
	// may be slow).
	for {
		mi, _ := os.ReadFile("/proc/self/mountinfo")
		if len(b.Mounts()) == 0 && !strings.Contains(string(mi), bdir) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if out, _ := exec.Command("losetup", "-a").CombinedOutput(); strings.Contains(string(out), bdir) {
		t.Errorf("an idle mount's loop device is still attached:\n%s", grepLines(string(out), bdir))
	}
}

// TestBrowserStale: what a process that died with a mount open left
// (a filesystem mount, its loop device, a dead FUSE mount) is torn down
// by the next Browser with CleanStale on the same directory.
func TestBrowserStale(t *testing.T) {
	if dir := os.Getenv("FILEBROWSE_CHILD_DIR"); dir != "" {
		// The child: mount, say so, wait to be killed.
		repo, id := os.Getenv("FILEBROWSE_CHILD_REPO"), os.Getenv("FILEBROWSE_CHILD_IMAGE")
		b, err := filebrowse.New(filebrowse.Options{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.Open(context.Background(), filebrowse.BackupImage(repo, opener(repo), id)); err != nil {
			t.Fatal(err)
		}
		fmt.Println("mounted")
		select {}
	}
	need(t, "mkfs.ext4", "fusermount3")
	dir := t.TempDir()
	img := makeFS(t, "ext4", dir, 32<<20, func(root string) { fillTree(t, root, 3) })
	repo, id := testutil.BackupFile(t, dir, img, "vol")
	bdir := filepath.Join(dir, "browse")
	child := exec.Command(os.Args[0], "-test.run", "^TestBrowserStale$")
	child.Env = append(os.Environ(), "FILEBROWSE_CHILD_DIR="+bdir, "FILEBROWSE_CHILD_REPO="+repo, "FILEBROWSE_CHILD_IMAGE="+id)
	child.Stderr = os.Stderr
	out, _ := child.StdoutPipe()
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if line != "mounted\n" {
		child.Process.Kill()
		child.Wait()
		t.Fatalf("the child said %q", line)
	}
	child.Process.Kill()
	child.Wait()
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Count(string(mi), bdir) != 2 {
		t.Fatalf("the dead child's mounts:\n%s", grepLines(string(mi), bdir))
	}
	b, err := filebrowse.New(filebrowse.Options{Dir: bdir, CleanStale: true})
	if err != nil {
		t.Fatal(err)
	}
	b.Close()
	mi, _ = os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), bdir) {
		t.Errorf("mounts left under %s:\n%s", bdir, grepLines(string(mi), bdir))
	}
	if out, _ := exec.Command("losetup", "-a").CombinedOutput(); strings.Contains(string(out), bdir) {
		t.Errorf("loop devices left over files under %s:\n%s", bdir, grepLines(string(out), bdir))
	}
	if ents, _ := os.ReadDir(bdir); len(ents) != 0 {
		t.Errorf("left in %s: %v", bdir, ents)
	}
}
