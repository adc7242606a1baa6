package filebrowse

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"mime"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"

	"umbra/internal/size"
	"umbra/provider"
)

//go:embed templates/*.html
var templateFS embed.FS

// templates are parsed on first use: the service's file browser needs
// them, and parsing them at init cost every command's start (the CLI's
// client commands too) ~0.7-3.5 ms (measured 2026-12-07).
var templates = sync.OnceValue(func() *template.Template {
	return template.Must(template.New("").Funcs(template.FuncMap{
		"size": size.Human,
		"time": func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05") },
		"esc":  url.PathEscape,
	}).ParseFS(templateFS, "templates/*.html"))
})

// HandlerOptions connect a Handler to the service.
type HandlerOptions struct {
	// Snapshot returns the source for snapshot id of volume vol, or an
	// error (one wrapping provider.ErrNotFound is a 404). The caller
	// authorizes the request here.
	Snapshot func(r *http.Request, vol, id string) (Source, error)
	// Image returns the source for backup image id of repository repo
	// (a name the caller gives its repositories), or an error.
	Image func(r *http.Request, repo, id string) (Source, error)
	// PageSize is how many entries a listing page shows (default 500;
	// a request asks for up to 5000 with ?limit=).
	PageSize int
}

// maxPage bounds ?limit=.
const maxPage = 5000

// Handler serves the Browser over HTTP, every route read-only (GET and
// HEAD). Mount it under a prefix with http.StripPrefix; its links are
// relative, so they work under any prefix:
//
//	/snapshot/{volume}/{snapshot}/{path...}
//	/image/{repo}/{image}/{path...}
//	/ (a page that says where to start)
//
// A directory's path ends in "/" (one without is redirected) and shows
// a page of its entries as HTML, or as JSON (a Page) with ?format=json
// or Accept: application/json; ?cursor= names the next page and ?limit=
// its size. ?archive=tar or ?archive=zip streams the directory. A file
// downloads (Range requests work); a symbolic link or special file
// shows its entry. Errors are HTML or JSON ({"error": "..."}) with the
// status that fits.
func (b *Browser) Handler(opts HandlerOptions) http.Handler {
	if opts.PageSize <= 0 {
		opts.PageSize = 500
	}
	h := &handler{b: b, opts: opts}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /snapshot/{vol}/{id}/{path...}", func(w http.ResponseWriter, r *http.Request) {
		if opts.Snapshot == nil {
			h.fail(w, r, fmt.Errorf("snapshots: %w", provider.ErrNotFound))
			return
		}
		src, err := opts.Snapshot(r, r.PathValue("vol"), r.PathValue("id"))
		h.serve(w, r, src, err)
	})
	mux.HandleFunc("GET /image/{repo}/{id}/{path...}", func(w http.ResponseWriter, r *http.Request) {
		if opts.Image == nil {
			h.fail(w, r, fmt.Errorf("backup images: %w", provider.ErrNotFound))
			return
		}
		src, err := opts.Image(r, r.PathValue("repo"), r.PathValue("id"))
		h.serve(w, r, src, err)
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		h.html(w, "index.html", nil)
	})
	mux.HandleFunc("GET /snapshot/{vol}/{id}", addSlash)
	mux.HandleFunc("GET /image/{repo}/{id}", addSlash)
	return mux
}

type handler struct {
	b    *Browser
	opts HandlerOptions
}

// addSlash sends a source's root to its directory URL.
func addSlash(w http.ResponseWriter, r *http.Request) {
	redirectDir(w, r)
}

// redirectDir redirects to the request's path with a "/" added, by a
// relative reference (the handler does not know its prefix).
func redirectDir(w http.ResponseWriter, r *http.Request) {
	segs := strings.Split(r.URL.EscapedPath(), "/")
	to := "./" + segs[len(segs)-1] + "/"
	if r.URL.RawQuery != "" {
		to += "?" + r.URL.RawQuery
	}
	w.Header().Set("Location", to)
	w.WriteHeader(http.StatusMovedPermanently)
}

func wantJSON(r *http.Request) bool {
	if r.URL.Query().Get("format") == "json" {
		return true
	}
	a := r.Header.Get("Accept")
	return strings.Contains(a, "application/json") && !strings.Contains(a, "text/html")
}

func (h *handler) serve(w http.ResponseWriter, r *http.Request, src Source, err error) {
	w.Header().Set("Cache-Control", "private, no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if err != nil {
		h.fail(w, r, err)
		return
	}
	rawPath := r.PathValue("path")
	// The mux has cleaned the path already when it came from a browser;
	// a ".." that reaches here was sent on purpose and is refused, not
	// cleaned away.
	if strings.Contains(r.URL.Path, "/../") || strings.HasSuffix(r.URL.Path, "/..") {
		h.fail(w, r, fmt.Errorf("%q: %w: '..' may not leave a directory", r.URL.Path, ErrBadPath))
		return
	}
	p, err := Clean(rawPath)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	t, err := h.b.Open(r.Context(), src)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	defer t.Close()
	e, err := t.Stat(p)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	dirURL := rawPath == "" || strings.HasSuffix(rawPath, "/")
	switch {
	case e.Kind == KindDir && !dirURL:
		redirectDir(w, r)
	case e.Kind == KindDir:
		switch a := r.URL.Query().Get("archive"); a {
		case "":
			h.list(w, r, t, e)
		case "tar", "zip":
			h.archive(w, r, t, e, a)
		default:
			h.fail(w, r, fmt.Errorf("archive %q: %w: want tar or zip", a, ErrBadPath))
		}
	case dirURL && e.Kind == KindSymlink:
		h.fail(w, r, fmt.Errorf("%s: %w (it points to %q)", p, ErrSymlink, e.Target))
	case dirURL:
		h.fail(w, r, fmt.Errorf("%s: %w", p, ErrNotDir))
	case e.Kind == KindFile && !wantJSON(r):
		h.download(w, r, t, p)
	default:
		h.entry(w, r, t, e)
	}
}

// download sends a file.
func (h *handler) download(w http.ResponseWriter, r *http.Request, t *Tree, p string) {
	f, e, err := t.Open(p)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", disposition(e.Name))
	http.ServeContent(w, r, "", e.ModTime, f)
}

// disposition is an attachment header naming file name (RFC 6266,
// with RFC 5987 encoding for names that are not plain ASCII).
func disposition(name string) string {
	if v := mime.FormatMediaType("attachment", map[string]string{"filename": name}); v != "" {
		return v
	}
	// Not valid UTF-8 (a filesystem name is bytes): percent-encode it.
	return "attachment; filename*=UTF-8''" + url.PathEscape(name)
}

// archive streams directory e as tar or zip.
func (h *handler) archive(w http.ResponseWriter, r *http.Request, t *Tree, e Entry, kind string) {
	name := e.Name
	if e.Path == "/" {
		name = sourceName(t.Source())
	}
	w.Header().Set("Content-Disposition", disposition(name+"."+kind))
	var err error
	if kind == "tar" {
		w.Header().Set("Content-Type", "application/x-tar")
		err = t.WriteTar(r.Context(), w, e.Path)
	} else {
		w.Header().Set("Content-Type", "application/zip")
		err = t.WriteZip(r.Context(), w, e.Path)
	}
	if err != nil && r.Context().Err() == nil {
		// Headers are gone: the archive is cut short, which the client
		// sees as a truncated download; the log says why.
		h.b.log.Error("file browser archive", "source", t.Source().String(), "dir", e.Path, "err", err)
		panic(http.ErrAbortHandler)
	}
}

// sourceName is a file name for the root of a source.
func sourceName(s Source) string {
	parts := strings.Split(s.Key(), "\x00")
	n := strings.Join(parts[1:], "-")
	n = strings.Map(func(c rune) rune {
		if c == '/' || c == '\\' || c < ' ' {
			return '_'
		}
		return c
	}, n)
	return strings.Trim(n, "_.")
}

type crumb struct {
	Name string
	Href string
}

// crumbs are the links from the source's root to the directory p (its
// URL ends in "/"), relative to that URL.
func crumbs(p string) []crumb {
	names, _ := clean(p)
	out := []crumb{{Name: "/", Href: strings.Repeat("../", len(names))}}
	if out[0].Href == "" {
		out[0].Href = "./"
	}
	for i, n := range names {
		href := strings.Repeat("../", len(names)-1-i)
		if href == "" {
			href = "./"
		}
		out = append(out, crumb{Name: n, Href: href})
	}
	return out
}

type listView struct {
	Source   string
	FSType   string
	Page     *Page
	Crumbs   []crumb
	Next     string
	First    bool
	Limit    int
	Entry    *Entry
	Up       string
	EntryURL func(Entry) string
}

func (h *handler) list(w http.ResponseWriter, r *http.Request, t *Tree, e Entry) {
	q := r.URL.Query()
	limit := h.opts.PageSize
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n <= 0 || n > maxPage {
			h.fail(w, r, fmt.Errorf("limit %q: %w: want 1 to %d", l, ErrBadPath, maxPage))
			return
		}
		limit = n
	}
	page, err := t.List(r.Context(), e.Path, q.Get("cursor"), limit)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if wantJSON(r) {
		writeJSON(w, http.StatusOK, page)
		return
	}
	v := listView{Source: t.Source().String(), FSType: t.FSType(), Page: page, Crumbs: crumbs(e.Path), First: q.Get("cursor") == "", Limit: limit}
	if page.Next != "" {
		nq := url.Values{"cursor": {page.Next}}
		if q.Get("limit") != "" {
			nq.Set("limit", q.Get("limit"))
		}
		v.Next = "?" + nq.Encode()
	}
	h.html(w, "list.html", v)
}

func (h *handler) entry(w http.ResponseWriter, r *http.Request, t *Tree, e Entry) {
	if wantJSON(r) {
		writeJSON(w, http.StatusOK, e)
		return
	}
	dir := path.Dir(e.Path)
	h.html(w, "entry.html", listView{Source: t.Source().String(), FSType: t.FSType(), Entry: &e, Crumbs: crumbs(dir), Up: "./"})
}

func (h *handler) html(w http.ResponseWriter, name string, v any) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'self'")
	if err := templates().ExecuteTemplate(w, name, v); err != nil {
		h.b.log.Error("file browser page", "template", name, "err", err)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.Encode(v)
}

// status is the HTTP status for err.
func status(err error) int {
	switch {
	case errors.Is(err, ErrBadPath), errors.Is(err, ErrBadCursor), errors.Is(err, provider.ErrBadID):
		return http.StatusBadRequest
	case errors.Is(err, ErrSymlink), errors.Is(err, ErrSpecial), errors.Is(err, ErrForbidden):
		return http.StatusForbidden
	case errors.Is(err, ErrNotExist), errors.Is(err, provider.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, ErrNotDir), errors.Is(err, ErrIsDir):
		return http.StatusConflict
	case errors.Is(err, ErrNoFilesystem):
		return http.StatusUnprocessableEntity
	case errors.Is(err, ErrBusy), errors.Is(err, ErrClosed):
		return http.StatusServiceUnavailable
	case errors.Is(err, context.Canceled):
		return 499
	}
	return http.StatusInternalServerError
}

func (h *handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	code := status(err)
	if code == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "5")
	}
	if code >= 500 {
		h.b.log.Error("file browser", "url", r.URL.String(), "err", err)
	}
	if wantJSON(r) {
		writeJSON(w, code, map[string]string{"error": err.Error()})
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
	w.WriteHeader(code)
	templates().ExecuteTemplate(w, "error.html", map[string]any{"Status": code, "Text": http.StatusText(code), "Err": err.Error()})
}
