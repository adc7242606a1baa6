package web_test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	cdpbrowser "github.com/chromedp/cdproto/browser"
	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"umbra/api/umbrav1"
	"umbra/backup"
	"umbra/internal/testutil"
	"umbra/jobs"
	"umbra/service"
	"umbra/web"
)

// The tokens of the test identities.
const (
	adminToken    = "admin-token-0123456789"
	operatorToken = "operator-token-0123456789"
	viewerToken   = "viewer-token-0123456789"
)

// clock is the console's injected clock: sessions expire when a test
// moves it, not when time passes.
type clock struct {
	mu sync.Mutex // guards t
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// console is a running service with the web console on HTTPS.
type console struct {
	url   string
	cfg   service.Config
	clock *clock
	api   umbrav1.UmbraClient // the unix socket: admin
	repo  string
	pki   *testutil.PKI
}

const (
	idleTimeout = 10 * time.Minute
	maxAge      = 30 * time.Minute
)

// restoreName is a file in the volume's filesystem, and restoreData its
// content: the file browser's test downloads it.
const restoreName = "restore-me.bin"

func restoreData() []byte {
	b := make([]byte, 300<<10+7)
	x := uint32(1)
	for i := range b {
		x = x*1664525 + 1013904223
		b[i] = byte(x >> 24)
	}
	return b
}

// startConsole runs a service of one small volume (ext4 holding
// docs/restore-me.bin), with a backup repository holding one image of
// it, and its console on 127.0.0.1 over HTTPS.
func startConsole(t *testing.T) *console {
	t.Helper()
	dir := t.TempDir()
	vol := filepath.Join(dir, "vol.img")
	// An ext4 filesystem holding restoreFile, for the file browser.
	testutil.Need(t, "mkfs.ext4")
	files := filepath.Join(dir, "files")
	os.MkdirAll(filepath.Join(files, "docs"), 0o755)
	if err := os.WriteFile(filepath.Join(files, "docs", restoreName), restoreData(), 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.SparseFile(t, vol, 4<<20)
	testutil.Run(t, "mkfs.ext4", "-q", "-d", files, vol)
	tokens := filepath.Join(dir, "tokens")
	if err := os.WriteFile(tokens, []byte(fmt.Sprintf("token %s admin alice\ntoken %s operator otto\ntoken %s viewer vera\ncert backup-host viewer\n", adminToken, operatorToken, viewerToken)), 0o600); err != nil {
		t.Fatal(err)
	}
	pki := testutil.NewPKI(t)
	certFile, keyFile, caFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "ca.pem")
	testutil.WritePEM(t, pki.Issue(t, "umbra", true), certFile, keyFile)
	pki.WriteCA(t, caFile)
	repo := filepath.Join(dir, "repo")
	r, err := backup.Init(repo)
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	clk := &clock{t: time.Date(2026, 12, 7, 9, 0, 0, 0, time.UTC)}
	cfg := service.Config{
		StateDir:  filepath.Join(dir, "state"),
		NBD:       service.NBDConfig{Socket: filepath.Join(dir, "run", "nbd.sock")},
		APISocket: filepath.Join(dir, "run", "umbra.sock"),
		Volumes:   []service.VolumeConfig{{Name: "vol", Path: vol, MaxStorage: "8M"}},
		API:       service.APIConfig{TLSCert: certFile, TLSKey: keyFile, ClientCA: caFile, Tokens: tokens},
		Web: service.WebConfig{Listen: "127.0.0.1:0", IdleTimeout: idleTimeout.String(), MaxAge: maxAge.String(),
			Repositories: []web.Repository{{Location: repo}}},
		Jobs:   []jobs.Def{{Name: "timeline", Kind: "snapshot", Schedule: "*-01-01 00:00", CatchUp: new(false), Volumes: []string{"vol"}, Keep: jobs.Keep{Daily: 7}}},
		Clock:  clk.Now,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	svc, err := service.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("Run: %v", err)
		}
		svc.Close()
	})
	// Run binds the web listener before the API socket, which it binds last.
	for {
		select {
		case err := <-runErr:
			t.Fatalf("Run returned before serving: %v", err)
		default:
		}
		if _, err := os.Stat(cfg.APISocket); err == nil && svc.WebAddr() != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+cfg.APISocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &console{url: "https://" + svc.WebAddr().String(), cfg: cfg, clock: clk, api: umbrav1.NewUmbraClient(conn), repo: repo, pki: pki}
	if _, err := c.api.Backup(context.Background(), &umbrav1.BackupRequest{Volumes: []string{"vol"}, Repo: repo}); err != nil {
		t.Fatalf("backup: %v", err)
	}
	return c
}

// browser starts headless Chromium for the test; each context from
// user is a separate browser profile (its own cookies).
type browser struct {
	ctx context.Context
}

func newBrowser(t *testing.T) *browser {
	t.Helper()
	path, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("chromium is not installed: apt-get install chromium (scripts/test installs it)")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(path), chromedp.NoSandbox,
		chromedp.Flag("ignore-certificate-errors", true), chromedp.WindowSize(1280, 800))
	// A bound for a browser that hangs, not a timing assertion.
	tctx, tcancel := context.WithTimeout(context.Background(), 10*time.Minute)
	actx, acancel := chromedp.NewExecAllocator(tctx, opts...)
	bctx, bcancel := chromedp.NewContext(actx)
	if err := chromedp.Do(bctx); err != nil {
		bcancel()
		acancel()
		tcancel()
		t.Fatalf("start chromium: %v", err)
	}
	t.Cleanup(func() { bcancel(); acancel(); tcancel() })
	return &browser{ctx: bctx}
}

// user opens a new browser profile.
func (b *browser) user(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := chromedp.NewContext(b.ctx, chromedp.WithNewBrowserContext())
	t.Cleanup(cancel)
	return ctx
}

func do(t *testing.T, ctx context.Context, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(ctx, steps...); err != nil {
		t.Fatal(err)
	}
}

func run[T any](t *testing.T, ctx context.Context, a chromedp.Action[T]) T {
	t.Helper()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// poll waits until the expression is true (for as long as the test runs).
func poll(expr string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		_, err := chromedp.Poll[bool](expr, chromedp.WithPollingTimeout(0))(ctx, t)
		return err
	})
}

// login logs in with token from the login page.
func (c *console) login(t *testing.T, ctx context.Context, token string) {
	t.Helper()
	do(t, ctx, chromedp.Navigate(c.url+"/"), chromedp.WaitVisible(chromedp.ID("token")),
		chromedp.SendKeys(chromedp.ID("token"), token), chromedp.Click(chromedp.ID("login")), chromedp.WaitVisible(chromedp.ID("who")))
}

// screenshot writes docs/screenshots/NAME.png when UMBRA_SCREENSHOTS is
// set.
func screenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	if os.Getenv("UMBRA_SCREENSHOTS") == "" {
		return
	}
	png := run(t, ctx, chromedp.FullScreenshot(100))
	if err := os.WriteFile(filepath.Join("..", "docs", "screenshots", name+".png"), png, 0o644); err != nil {
		t.Fatal(err)
	}
}

func (c *console) snapshots(t *testing.T) []string {
	t.Helper()
	resp, err := c.api.ListSnapshots(context.Background(), &umbrav1.ListSnapshotsRequest{Volume: "vol"})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, s := range resp.GetSnapshots() {
		ids = append(ids, s.GetId())
	}
	return ids
}

func auditLines(t *testing.T, c *console) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(c.cfg.StateDir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for line := range strings.Lines(string(b)) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

// TestConsole drives the console in Chromium against a real service.
func TestConsole(t *testing.T) {
	b := newBrowser(t)
	c := startConsole(t)

	t.Run("SnapshotOnTimeline", func(t *testing.T) {
		ctx := b.user(t)
		do(t, ctx, chromedp.Navigate(c.url+"/"), chromedp.WaitVisible(chromedp.ID("token")))
		screenshot(t, ctx, "login")
		c.login(t, ctx, operatorToken)
		if who := run(t, ctx, chromedp.Text(chromedp.ID("who"))); !strings.Contains(who, "otto") || !strings.Contains(who, "operator") {
			t.Fatalf("logged in as %q, want otto (operator)", who)
		}
		do(t, ctx, chromedp.WaitVisible(chromedp.CSS(`#volumes tr[data-volume="vol"]`)))
		row := run(t, ctx, chromedp.Text(chromedp.CSS(`#volumes tr[data-volume="vol"]`)))
		if !strings.Contains(row, "of 8.0 MiB") || strings.Contains(row, "never") {
			t.Errorf("overview row of vol: %q, want its storage limit and a last backup", row)
		}
		screenshot(t, ctx, "overview")
		do(t, ctx, chromedp.Click(chromedp.CSS(`#volumes a[href="/volumes/vol"]`)), chromedp.WaitVisible(chromedp.ID("create")),
			chromedp.SendKeys(chromedp.ID("snap-id"), "web1"), chromedp.Submit(chromedp.ID("create")),
			chromedp.WaitVisible(chromedp.ID("flash")))
		if msg := run(t, ctx, chromedp.Text(chromedp.ID("flash"))); !strings.Contains(msg, "Snapshot web1 created") {
			t.Fatalf("after create: %q", msg)
		}
		do(t, ctx, chromedp.WaitVisible(chromedp.CSS(`#timeline li[data-id="web1"]`)))
		if ids := c.snapshots(t); !strings.Contains(strings.Join(ids, " "), "web1") {
			t.Fatalf("snapshots %v, want web1", ids)
		}
		screenshot(t, ctx, "volume")
		do(t, ctx, chromedp.Navigate(c.url+"/writers"), chromedp.WaitVisible(chromedp.ID("writers")))
		screenshot(t, ctx, "writers")
		do(t, ctx, chromedp.Navigate(c.url+"/repositories"), chromedp.WaitVisible(chromedp.CSS(`.repo`)))
		repoText := run(t, ctx, chromedp.Text(chromedp.CSS(`.repo`)))
		if !strings.Contains(repoText, "1 of 1 volume") {
			t.Errorf("repositories page: %q, want the one image", repoText)
		}
		// Verify with progress: the task page polls until it is done.
		do(t, ctx, chromedp.Click(chromedp.CSS(`form[action="/repositories/0/verify"] button`)),
			chromedp.WaitVisible(chromedp.CSS(`#task[data-state="done"]`)))
		if st := run(t, ctx, chromedp.Text(chromedp.ID("task-state"))); !strings.Contains(st, "1 good images") {
			t.Errorf("verify task: %q", st)
		}
		screenshot(t, ctx, "task")
		do(t, ctx, chromedp.Navigate(c.url+"/repositories"), chromedp.WaitVisible(chromedp.CSS(`.repo`)))
		screenshot(t, ctx, "repositories")
		// An operator may not prune: the form is not offered.
		if n := run(t, ctx, chromedp.Evaluate[int](`document.querySelectorAll('form.prune').length`)); n != 0 {
			t.Errorf("an operator is offered %d prune forms", n)
		}
	})

	t.Run("LiveEvents", func(t *testing.T) {
		ctx := b.user(t)
		c.login(t, ctx, viewerToken)
		do(t, ctx, chromedp.Navigate(c.url+"/events"), chromedp.WaitVisible(chromedp.ID("events-state")),
			poll(`document.getElementById('events-state').textContent.startsWith('Connected')`))
		if _, err := c.api.CreateSnapshotSet(context.Background(), &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"vol"}, Id: "live1"}); err != nil {
			t.Fatal(err)
		}
		do(t, ctx, poll(`[...document.querySelectorAll('#events li')].some(li => li.textContent.includes('snapshot_created') && li.textContent.includes('vol@live1'))`))
		screenshot(t, ctx, "events")
	})

	t.Run("ViewerRefusedDelete", func(t *testing.T) {
		if _, err := c.api.CreateSnapshotSet(context.Background(), &umbrav1.CreateSnapshotSetRequest{Volumes: []string{"vol"}, Id: "keep1"}); err != nil {
			t.Fatal(err)
		}
		ctx := b.user(t)
		c.login(t, ctx, viewerToken)
		do(t, ctx, chromedp.Navigate(c.url+"/volumes/vol"), chromedp.WaitVisible(chromedp.ID("delete-keep1")))
		if n := run(t, ctx, chromedp.Evaluate[int](`document.querySelectorAll('#create').length`)); n != 0 {
			t.Errorf("a viewer is offered the create form")
		}
		do(t, ctx, chromedp.Click(chromedp.ID("delete-keep1")), chromedp.WaitVisible(chromedp.CSS(`#flash.error`)))
		msg := run(t, ctx, chromedp.Text(chromedp.ID("flash")))
		if !strings.Contains(msg, "vera (viewer) may not call") || !strings.Contains(msg, "admin role") {
			t.Fatalf("viewer's delete: %q, want a refusal that names the role it needs", msg)
		}
		if ids := strings.Join(c.snapshots(t), " "); !strings.Contains(ids, "keep1") {
			t.Fatalf("snapshots %s: keep1 was deleted", ids)
		}
		var found bool
		for _, l := range auditLines(t, c) {
			if l["who"] == "vera" && l["method"] == "/umbra.v1.Umbra/DeleteSnapshots" && l["result"] == "PermissionDenied" && strings.HasPrefix(fmt.Sprint(l["addr"]), "web 127.0.0.1:") {
				found = true
			}
		}
		if !found {
			t.Fatalf("no audit line of vera's refused delete in %v", auditLines(t, c))
		}
	})

	t.Run("CSRF", func(t *testing.T) {
		ctx := b.user(t)
		c.login(t, ctx, adminToken)
		do(t, ctx, chromedp.Navigate(c.url+"/volumes/vol"), chromedp.WaitVisible(chromedp.ID("create")))
		post := func(id, token string) int {
			hdr := ""
			if token != "" {
				hdr = fmt.Sprintf(`, headers: {'X-CSRF-Token': %q}`, token)
			}
			js := fmt.Sprintf(`fetch('/volumes/vol/snapshots', {method: 'POST', credentials: 'same-origin', body: new URLSearchParams({id: %q})%s}).then(r => r.status)`, id, hdr)
			return run(t, ctx, chromedp.Evaluate[int](js, chromedp.EvalAwaitPromise))
		}
		if st := post("csrf-none", ""); st != http.StatusForbidden {
			t.Errorf("POST without a CSRF token: %d, want 403", st)
		}
		if st := post("csrf-wrong", "not-the-token"); st != http.StatusForbidden {
			t.Errorf("POST with a wrong CSRF token: %d, want 403", st)
		}
		tok := run(t, ctx, chromedp.Evaluate[string](`document.querySelector('main').dataset.csrf`))
		if st := post("csrf-right", tok); st != http.StatusOK {
			t.Errorf("POST with the session's CSRF token: %d, want 200 (after the redirect)", st)
		}
		// Another site's form, posted by the same browser.
		evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, `<!doctype html><form method="post" action="%s/volumes/vol/snapshots"><input name="id" value="csrf-site"></form><script>document.forms[0].submit()</script>`, c.url)
		}))
		defer evil.Close()
		do(t, ctx, chromedp.Navigate(evil.URL), chromedp.WaitVisible(chromedp.CSS(`#error, #token`)))
		ids := strings.Join(c.snapshots(t), " ")
		if strings.Contains(ids, "csrf-none") || strings.Contains(ids, "csrf-wrong") || strings.Contains(ids, "csrf-site") || !strings.Contains(ids, "csrf-right") {
			t.Fatalf("snapshots %s: want only csrf-right of the four", ids)
		}
	})

	t.Run("SessionExpires", func(t *testing.T) {
		ctx := b.user(t)
		c.login(t, ctx, operatorToken)
		cookies := run(t, ctx, chromedp.Action[*network.GetCookiesResult](func(ctx context.Context, tg *chromedp.Target) (*network.GetCookiesResult, error) {
			r, err := cdp.Call(ctx, tg, network.GetCookies, network.GetCookiesParams{})
			return &r, err
		}))
		var sess *network.Cookie
		for _, ck := range cookies.Cookies {
			if ck.Name == "umbra_session" {
				sess = ck
			}
		}
		if sess == nil || !sess.HTTPOnly || !sess.Secure || sess.SameSite != network.CookieSameSiteStrict || sess.Session {
			t.Fatalf("session cookie %+v: want HttpOnly, Secure, SameSite=Strict, expiring", sess)
		}
		// Idle: unused for the idle timeout.
		c.clock.Advance(idleTimeout)
		do(t, ctx, chromedp.Navigate(c.url+"/volumes/vol"), chromedp.WaitVisible(chromedp.ID("expired")))
		if msg := run(t, ctx, chromedp.Text(chromedp.ID("expired"))); !strings.Contains(msg, "without use") {
			t.Errorf("after the idle timeout: %q", msg)
		}
		// Its maximum age: in use all along, and ended all the same.
		c.login(t, ctx, operatorToken)
		step := idleTimeout - time.Minute
		for used := time.Duration(0); used+step < maxAge; used += step {
			c.clock.Advance(step)
			do(t, ctx, chromedp.Navigate(c.url+"/"), chromedp.WaitVisible(chromedp.ID("who")))
		}
		c.clock.Advance(step)
		do(t, ctx, chromedp.Navigate(c.url+"/"), chromedp.WaitVisible(chromedp.ID("expired")))
		if msg := run(t, ctx, chromedp.Text(chromedp.ID("expired"))); !strings.Contains(msg, "maximum age") {
			t.Errorf("after the maximum age: %q", msg)
		}
		// Logged in again, the login page sends the user where they were going.
		do(t, ctx, chromedp.SendKeys(chromedp.ID("token"), operatorToken), chromedp.Click(chromedp.ID("login")), chromedp.WaitVisible(chromedp.ID("volumes")))
	})

	t.Run("Phone", func(t *testing.T) {
		ctx := b.user(t)
		c.login(t, ctx, adminToken)
		do(t, ctx, chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile), chromedp.Navigate(c.url+"/volumes/vol"), chromedp.WaitVisible(chromedp.ID("create")))
		// Nothing wider than the screen: no sideways scrolling.
		if w := run(t, ctx, chromedp.Evaluate[int](`document.documentElement.scrollWidth`)); w > 390 {
			t.Errorf("the volume page is %d px wide on a 390 px phone", w)
		}
		screenshot(t, ctx, "phone-volume")
	})

	t.Run("ClientCertificate", func(t *testing.T) {
		get := func(cn string) (*http.Response, string) {
			cert := c.pki.Issue(t, cn, false)
			hc := &http.Client{
				Transport:     &http.Transport{TLSClientConfig: &tls.Config{RootCAs: c.pki.Pool, Certificates: []tls.Certificate{cert}}},
				CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
			}
			defer hc.CloseIdleConnections()
			resp, err := hc.Get(c.url + "/")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			return resp, string(body)
		}
		resp, body := get("backup-host")
		if resp.StatusCode != http.StatusOK || !strings.Contains(body, "cert:backup-host") || !strings.Contains(body, "(viewer)") {
			t.Fatalf("a known client certificate: %s, want the overview as cert:backup-host (viewer)", resp.Status)
		}
		resp, _ = get("stranger")
		if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(resp.Header.Get("Location"), "/login") {
			t.Fatalf("an unknown client certificate: %s %s, want the login page", resp.Status, resp.Header.Get("Location"))
		}
		var found bool
		for _, l := range auditLines(t, c) {
			if l["who"] == "cert:stranger" && l["method"] == "/umbra.web/Login" && l["result"] == "Unauthenticated" {
				found = true
			}
		}
		if !found {
			t.Errorf("no audit line of the refused certificate")
		}
	})

	t.Run("BrowseImage", func(t *testing.T) {
		testutil.NeedRoot(t)
		testutil.NeedFUSE(t)
		ctx := b.user(t)
		c.login(t, ctx, operatorToken)
		do(t, ctx, chromedp.Navigate(c.url+"/repositories"), chromedp.WaitVisible(chromedp.CSS(`.repo a.browse`)),
			chromedp.Click(chromedp.CSS(`.repo a.browse`)), chromedp.WaitVisible(chromedp.CSS(`a[href="./docs/"]`)),
			chromedp.Click(chromedp.CSS(`a[href="./docs/"]`)), chromedp.WaitVisible(chromedp.CSS(`a[href="./`+restoreName+`"]`)))
		screenshot(t, ctx, "browse")
		// Download the file as a person would: a click, into a directory.
		dl := t.TempDir()
		progress := chromedp.Events(ctx, cdpbrowser.DownloadProgress)
		events := true
		do(t, ctx, chromedp.Func(func(ctx context.Context, _ *chromedp.Target) error {
			_, err := chromedp.Call(ctx, cdpbrowser.SetDownloadBehavior, cdpbrowser.SetDownloadBehaviorParams{
				Behavior: cdpbrowser.SetDownloadBehaviorBehaviorAllowAndName, DownloadPath: dl, EventsEnabled: &events,
				BrowserContextID: chromedp.FromContext(ctx).BrowserContextID})
			return err
		}), chromedp.Click(chromedp.CSS(`a[href="./`+restoreName+`"]`)))
		var got []byte
		for ev, err := range progress {
			if err != nil {
				t.Fatal(err)
			}
			if ev.State == cdpbrowser.DownloadProgressStateCanceled {
				t.Fatal("the download was cancelled")
			}
			if ev.State == cdpbrowser.DownloadProgressStateCompleted {
				if got, err = os.ReadFile(filepath.Join(dl, ev.GUID)); err != nil {
					t.Fatal(err)
				}
				break
			}
		}
		if sha256.Sum256(got) != sha256.Sum256(restoreData()) {
			t.Fatalf("downloaded %d bytes whose checksum differs from the file's (%d bytes)", len(got), len(restoreData()))
		}
	})

	t.Run("BrowseRefusedToViewer", func(t *testing.T) {
		ctx := b.user(t)
		c.login(t, ctx, viewerToken)
		do(t, ctx, chromedp.Navigate(c.url+"/browse/"), chromedp.WaitVisible(chromedp.ID("browse-start")))
		do(t, ctx, chromedp.Navigate(c.url+"/browse/snapshot/vol/web1/"), chromedp.WaitVisible(chromedp.CSS(`[role="alert"]`)))
		if msg := run(t, ctx, chromedp.Text(chromedp.CSS(`[role="alert"]`))); !strings.Contains(msg, "operator") {
			t.Errorf("a viewer browsing a snapshot: %q, want a refusal naming the role", msg)
		}
	})

	t.Run("Jobs", func(t *testing.T) {
		ctx := b.user(t)
		c.login(t, ctx, operatorToken)
		do(t, ctx, chromedp.Navigate(c.url+"/jobs"), chromedp.WaitVisible(chromedp.CSS(`#jobs tr[data-job="timeline"]`)),
			chromedp.Click(chromedp.ID("run-timeline")), chromedp.WaitVisible(chromedp.ID("flash")))
		if msg := run(t, ctx, chromedp.Text(chromedp.ID("flash"))); !strings.Contains(msg, "Job timeline started") {
			t.Fatalf("run now: %q", msg)
		}
		// Wait for the run to end, by its state.
		for {
			h, err := c.api.JobHistory(context.Background(), &umbrav1.JobHistoryRequest{Name: "timeline"})
			if err != nil {
				t.Fatal(err)
			}
			if runs := h.GetRuns(); len(runs) > 0 && runs[0].GetResult() != "running" {
				if runs[0].GetResult() != "success" {
					t.Fatalf("the run: %v", runs[0])
				}
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		do(t, ctx, chromedp.Navigate(c.url+"/jobs"), chromedp.WaitVisible(chromedp.ID("history")))
		if h := run(t, ctx, chromedp.Text(chromedp.ID("history"))); !strings.Contains(h, "timeline #1") || !strings.Contains(h, "success") {
			t.Errorf("history: %q, want timeline #1 success", h)
		}
		screenshot(t, ctx, "jobs")
		do(t, ctx, chromedp.Navigate(c.url+"/"), chromedp.WaitVisible(chromedp.CSS(`#volumes tr[data-volume="vol"]`)))
		if row := run(t, ctx, chromedp.Text(chromedp.CSS(`#volumes tr[data-volume="vol"]`))); !strings.Contains(row, "timeline: success") {
			t.Errorf("overview row of vol: %q, want its job's state", row)
		}
	})

	t.Run("AddRemoveJob", func(t *testing.T) {
		ctx := b.user(t)
		c.login(t, ctx, operatorToken)
		do(t, ctx, chromedp.Navigate(c.url+"/jobs"), chromedp.WaitVisible(chromedp.ID("add-job")))
		if n := run(t, ctx, chromedp.Evaluate[int](`document.querySelectorAll('#remove-timeline').length`)); n != 0 {
			t.Errorf("the config file's job is offered for removal")
		}
		// A schedule that does not parse: the form comes back with the
		// reason, naming the field, and what was typed.
		do(t, ctx, chromedp.SendKeys(chromedp.ID("job-name"), "weekly-verify"), chromedp.SetValue(chromedp.ID("job-kind"), "verify"),
			chromedp.SendKeys(chromedp.ID("job-schedule"), "every blue moon"), chromedp.SendKeys(chromedp.ID("job-repo"), c.repo),
			chromedp.SendKeys(chromedp.ID("job-more"), "reverify_days = 30"),
			chromedp.Click(chromedp.ID("add-job-submit")), chromedp.WaitVisible(chromedp.ID("add-job-error")))
		if msg := run(t, ctx, chromedp.Text(chromedp.ID("add-job-error"))); !strings.Contains(msg, "job weekly-verify: schedule:") {
			t.Fatalf("a bad schedule: %q, want the job and the field named", msg)
		}
		if v := run(t, ctx, chromedp.Value(chromedp.ID("job-more"))); v != "reverify_days = 30" {
			t.Errorf("the refused form lost what was typed: other keys %q", v)
		}
		if v := run(t, ctx, chromedp.Value(chromedp.ID("job-kind"))); v != "verify" {
			t.Errorf("the refused form lost its kind: %q", v)
		}
		list, err := c.api.ListJobs(context.Background(), &umbrav1.ListJobsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if len(list.GetJobs()) != 1 {
			t.Fatalf("jobs after a refused add: %v", list.GetJobs())
		}
		// Without the session's CSRF token: refused, nothing added.
		js := fmt.Sprintf(`fetch('/jobs', {method: 'POST', credentials: 'same-origin', body: new URLSearchParams({name: 'csrf-job', kind: 'verify', schedule: 'daily', repo: %q})}).then(r => r.status)`, c.repo)
		if st := run(t, ctx, chromedp.Evaluate[int](js, chromedp.EvalAwaitPromise)); st != http.StatusForbidden {
			t.Errorf("add without a CSRF token: %d, want 403", st)
		}
		do(t, ctx, chromedp.SetValue(chromedp.ID("job-schedule"), "*-01-01 00:00"),
			chromedp.Click(chromedp.ID("add-job-submit")), chromedp.WaitVisible(chromedp.CSS(`#jobs tr[data-job="weekly-verify"]`)))
		if msg := run(t, ctx, chromedp.Text(chromedp.ID("flash"))); !strings.Contains(msg, "Job weekly-verify added") {
			t.Fatalf("after add: %q", msg)
		}
		j, err := c.api.GetJob(context.Background(), &umbrav1.GetJobRequest{Name: "weekly-verify"})
		if err != nil || j.GetSource() != "api" || j.GetKind() != "verify" || j.GetRepo() != c.repo {
			t.Fatalf("the added job: %v, %v", j, err)
		}
		if list, _ := c.api.ListJobs(context.Background(), &umbrav1.ListJobsRequest{}); len(list.GetJobs()) != 2 {
			t.Fatalf("jobs: %v, want timeline and weekly-verify (the CSRF-less post added none)", list.GetJobs())
		}
		do(t, ctx, chromedp.Click(chromedp.ID("remove-weekly-verify")), chromedp.WaitVisible(chromedp.ID("flash")),
			chromedp.WaitNotPresent(chromedp.CSS(`#jobs tr[data-job="weekly-verify"]`)))
		if msg := run(t, ctx, chromedp.Text(chromedp.ID("flash"))); !strings.Contains(msg, "Job weekly-verify removed") {
			t.Fatalf("after remove: %q", msg)
		}
		if _, err := c.api.GetJob(context.Background(), &umbrav1.GetJobRequest{Name: "weekly-verify"}); status.Code(err) != codes.NotFound {
			t.Fatalf("the removed job: %v, want NotFound", err)
		}
		// Audited as the CLI's jobs add and remove are.
		var refused, added, removed bool
		for _, l := range auditLines(t, c) {
			req := fmt.Sprint(l["request"])
			if l["who"] != "otto" || !strings.Contains(req, "weekly-verify") || !strings.HasPrefix(fmt.Sprint(l["addr"]), "web 127.0.0.1:") {
				continue
			}
			switch {
			case l["method"] == "/umbra.v1.Umbra/AddJob" && l["result"] == "InvalidArgument":
				refused = true
			case l["method"] == "/umbra.v1.Umbra/AddJob" && l["result"] == "OK":
				added = true
			case l["method"] == "/umbra.v1.Umbra/RemoveJob" && l["result"] == "OK":
				removed = true
			}
		}
		if !refused || !added || !removed {
			t.Fatalf("audit of the refused add %v, the add %v, the remove %v in %v", refused, added, removed, auditLines(t, c))
		}
		// A viewer is not offered the form.
		vctx := b.user(t)
		c.login(t, vctx, viewerToken)
		do(t, vctx, chromedp.Navigate(c.url+"/jobs"), chromedp.WaitVisible(chromedp.ID("jobs")))
		if n := run(t, vctx, chromedp.Evaluate[int](`document.querySelectorAll('#add-job').length`)); n != 0 {
			t.Errorf("a viewer is offered the add form")
		}
	})
}

// TestListenNeedsTLSOffLoopback: plain HTTP is refused on an address
// other than a unix socket or the loopback, with what to do; allowed
// there and anywhere with TLS.
func TestListenNeedsTLSOffLoopback(t *testing.T) {
	for _, tc := range []struct {
		addr string
		tls  bool
		ok   bool
	}{
		{"127.0.0.1:8080", false, true}, {"[::1]:8080", false, true}, {"localhost:8080", false, true},
		{"unix:/run/umbra/web.sock", false, true}, {"0.0.0.0:8443", false, false}, {"192.0.2.7:8443", false, false},
		{":8443", false, false}, {"0.0.0.0:8443", true, true}, {"unix:", false, false}, {"8443", true, false},
	} {
		err := web.CheckListen(tc.addr, tc.tls)
		if (err == nil) != tc.ok {
			t.Errorf("CheckListen(%q, tls %v): %v, want ok %v", tc.addr, tc.tls, err, tc.ok)
		}
		if err != nil && !tc.ok && !tc.tls && strings.Contains(tc.addr, ":8443") && !strings.Contains(err.Error(), "--api-tls-cert") {
			t.Errorf("CheckListen(%q): %v does not say to give a certificate", tc.addr, err)
		}
	}
	// The service refuses it before it opens anything.
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	os.WriteFile(tokens, []byte("token "+viewerToken+" viewer vera\n"), 0o600)
	cfg := service.Config{StateDir: filepath.Join(dir, "state"), NBD: service.NBDConfig{Socket: filepath.Join(dir, "nbd.sock")},
		APISocket: filepath.Join(dir, "api.sock"), Volumes: []service.VolumeConfig{{Name: "v", Path: filepath.Join(dir, "v.img")}},
		API: service.APIConfig{Tokens: tokens}, Web: service.WebConfig{Listen: "0.0.0.0:8443"}}
	_, err := service.New(context.Background(), cfg)
	var ce service.ConfigError
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "needs TLS") {
		t.Fatalf("service with --web-listen 0.0.0.0:8443 and no certificate: %v, want a ConfigError that asks for TLS", err)
	}
	if _, err := os.Stat(cfg.StateDir); !os.IsNotExist(err) {
		t.Errorf("the refused service made its state directory (%v)", err)
	}
	cfg.Web.Listen, cfg.API.Tokens = "127.0.0.1:0", ""
	if _, err := service.New(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "--api-tokens") {
		t.Fatalf("console without a tokens file: %v, want a refusal that asks for --api-tokens", err)
	}
}

// TestConsoleUnixSocket: plain HTTP on a unix socket; the session
// cookie is not Secure there (no TLS), the rest is the same.
func TestConsoleUnixSocket(t *testing.T) {
	dir := t.TempDir()
	vol := testutil.SparseFile(t, filepath.Join(dir, "vol.img"), 4<<20)
	tokens := filepath.Join(dir, "tokens")
	os.WriteFile(tokens, []byte("token "+operatorToken+" operator otto\n"), 0o600)
	sock := filepath.Join(dir, "web.sock")
	cfg := service.Config{StateDir: filepath.Join(dir, "state"), NBD: service.NBDConfig{Socket: filepath.Join(dir, "run", "nbd.sock")},
		APISocket: filepath.Join(dir, "run", "api.sock"), Volumes: []service.VolumeConfig{{Name: "vol", Path: vol}},
		API: service.APIConfig{Tokens: tokens}, Web: service.WebConfig{Listen: "unix:" + sock},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	svc, err := service.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- svc.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("Run: %v", err)
		}
		svc.Close()
		if _, err := os.Stat(sock); !os.IsNotExist(err) {
			t.Errorf("the web socket is left behind (%v)", err)
		}
	}()
	for svc.WebAddr() == nil {
		select {
		case err := <-runErr:
			t.Fatalf("Run returned before serving: %v", err)
		default:
		}
		time.Sleep(10 * time.Millisecond)
	}
	hc := &http.Client{
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	resp, err := hc.PostForm("http://umbra/login", url.Values{"token": {operatorToken}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	var sess *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == "umbra_session" {
			sess = c
		}
	}
	if resp.StatusCode != http.StatusSeeOther || sess == nil || !sess.HttpOnly || sess.Secure || sess.SameSite != http.SameSiteStrictMode || sess.MaxAge <= 0 {
		t.Fatalf("login on the unix socket: %s, cookie %+v", resp.Status, sess)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://umbra/volumes/vol", nil)
	req.AddCookie(sess)
	resp, err = hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "Volume vol") {
		t.Fatalf("volume page on the unix socket: %s", resp.Status)
	}
	req, _ = http.NewRequest(http.MethodGet, "http://umbra/jobs", nil)
	req.AddCookie(sess)
	if resp, err = hc.Do(req); err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "Jobs are not configured") {
		t.Fatalf("jobs page of a service without jobs: %s", body)
	}
}
