package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"umbra/internal/testutil"
)

// jobRun is a run as `umbra jobs history --json` gives it.
type jobRun struct {
	Job     string    `json:"job"`
	Seq     int       `json:"seq"`
	Trigger string    `json:"trigger"`
	Result  string    `json:"result"`
	Start   time.Time `json:"start"`
	End     time.Time `json:"end"`
	Bytes   int64     `json:"bytes"`
	Error   string    `json:"error"`
	Detail  string    `json:"detail"`
}

func (s *service) history(job string) []jobRun {
	s.t.Helper()
	var h struct {
		Runs []jobRun `json:"runs"`
	}
	if err := json.Unmarshal([]byte(s.ok("jobs", "history", job, "--limit", "0", "--json")), &h); err != nil {
		s.t.Fatal(err)
	}
	return h.Runs
}

// waitRuns polls the job's history until cond holds, for at most two
// minutes (schedules run every two seconds: this is no timing margin,
// only a bound on a test that hangs).
func (s *service) waitRuns(job, what string, cond func([]jobRun) bool) []jobRun {
	s.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		runs := s.history(job)
		if cond(runs) {
			return runs
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("job %s: %s did not happen; history:\n%+v", job, what, runs)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func count(runs []jobRun, f func(jobRun) bool) int {
	n := 0
	for _, r := range runs {
		if f(r) {
			n++
		}
	}
	return n
}

func writeConfig(t *testing.T, dir, text string) string {
	t.Helper()
	path := filepath.Join(dir, "umbra.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestJobsTimelineAndBackup runs a snapshot timeline of two volumes and
// a backup job with prune into a local repository, every two seconds,
// and drives the jobs through the CLI.
func TestJobsTimelineAndBackup(t *testing.T) {
	dir := t.TempDir()
	repo := filepath.Join(dir, "repo")
	cfg := writeConfig(t, dir, `
[[job]]
name = "tl"
kind = "snapshot"
schedule = "*:*:0/2"
volumes = ["a", "b"]
[job.keep]
hourly = 2
min_age = "0s"

[[job]]
name = "nightly"
kind = "backup"
schedule = "*:*:0/2"
volumes = ["a"]
repo = "`+repo+`"
disabled = true
[job.keep]
last = 2
`)
	s := startService(t, dir, []string{"a", "b"}, "--config", cfg)
	s.ok("repo", "init", "--repo", repo)

	// The timeline: every run takes a set of a and b, and retention
	// keeps the oldest snapshot of each of the last two hours.
	s.waitRuns("tl", "four successful runs", func(r []jobRun) bool {
		return count(r, func(r jobRun) bool { return r.Result == "success" }) >= 4
	})
	s.ok("jobs", "disable", "tl")
	runs := s.history("tl")
	if n := count(runs, func(r jobRun) bool { return r.Result != "success" && r.Result != "running" }); n > 0 {
		t.Fatalf("timeline runs that went wrong:\n%+v", runs)
	}
	s.waitRuns("tl", "the last run to end", func(r []jobRun) bool { return r[0].Result != "running" })
	l := s.list()
	perVol := map[string]int{}
	for _, sn := range l.Snapshots {
		if !strings.HasPrefix(sn.ID, "tl-") || !sn.Persistent {
			t.Fatalf("unexpected snapshot %+v", sn)
		}
		perVol[sn.Volume]++
	}
	if perVol["a"] < 1 || perVol["a"] > 2 || perVol["a"] != perVol["b"] {
		t.Fatalf("after %d runs with hourly = 2 the timeline keeps %v snapshots", len(runs), perVol)
	}

	// The backup job, disabled in the file, is enabled through the CLI;
	// a manual run waits for its result.
	if out, code := s.umbra("jobs", "run", "nightly", "--json"); code != 1 || !strings.Contains(out, "disabled") || !strings.Contains(out, `"code":1`) {
		t.Fatalf("run of a disabled job: exit %d\n%s", code, out)
	}
	s.ok("jobs", "enable", "nightly")
	s.waitRuns("nightly", "three successful backups", func(r []jobRun) bool {
		return count(r, func(r jobRun) bool { return r.Result == "success" }) >= 3
	})
	s.ok("jobs", "disable", "nightly")
	runs = s.waitRuns("nightly", "the last run to end", func(r []jobRun) bool { return r[0].Result != "running" })
	if !strings.Contains(runs[0].Detail, "prune kept 2") {
		t.Fatalf("backup runs:\n%+v", runs)
	}
	var images []struct {
		Volume string `json:"volume"`
	}
	json.Unmarshal([]byte(s.ok("images", "list", "--repo", repo, "--json")), &images)
	if len(images) != 2 {
		t.Fatalf("prune with keep last = 2 left %d images", len(images))
	}

	// list, show and the errors, as text and JSON.
	var jl struct {
		Jobs []struct {
			Name        string  `json:"name"`
			Enabled     bool    `json:"enabled"`
			Last        *jobRun `json:"last"`
			LastSuccess string  `json:"last_success"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(s.ok("jobs", "list", "--json")), &jl); err != nil || len(jl.Jobs) != 2 {
		t.Fatalf("jobs list --json: %v %+v", err, jl)
	}
	for _, j := range jl.Jobs {
		if j.Enabled || j.Last == nil || j.Last.Result != "success" || j.LastSuccess == "" {
			t.Fatalf("jobs list: %+v", j)
		}
	}
	if out := s.ok("jobs", "list"); !strings.Contains(out, "LAST SUCCESS") || !strings.Contains(out, "nightly") {
		t.Fatalf("jobs list:\n%s", out)
	}
	if out := s.ok("jobs", "show", "nightly"); !strings.Contains(out, `repo = "`+repo+`"`) || !strings.Contains(out, "last = 2") {
		t.Fatalf("jobs show:\n%s", out)
	}
	if out, code := s.umbra("jobs", "show", "nope", "--json"); code != 3 || !strings.Contains(out, `"code":3`) {
		t.Fatalf("show of a missing job: exit %d\n%s", code, out)
	}
	if out, code := s.umbra("jobs", "history", "nope"); code != 3 {
		t.Fatalf("history of a missing job: exit %d\n%s", code, out)
	}
	audit, _ := os.ReadFile(filepath.Join(dir, "state", "audit.log"))
	if !strings.Contains(string(audit), `"method":"/umbra.v1.Umbra/SetJobEnabled","request":{"name":"nightly","enabled":true}`) {
		t.Fatalf("enable is not in the audit log:\n%s", audit)
	}
}

// TestJobsVerifyAlerts has a verify job find a flipped bit in a pack,
// mark the image damaged in the repository (`umbra images list` shows
// it) and alert a webhook receiver and an exec hook.
func TestJobsVerifyAlerts(t *testing.T) {
	dir := t.TempDir()
	repo := filepath.Join(dir, "repo")
	got := make(chan map[string]any, 16)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var m map[string]any
		b, _ := io.ReadAll(r.Body)
		json.Unmarshal(b, &m)
		got <- m
	}))
	defer hook.Close()
	out := filepath.Join(dir, "alert.json")
	script := filepath.Join(dir, "alert.sh")
	os.WriteFile(script, []byte("#!/bin/sh\n{ echo \"$UMBRA_JOB $UMBRA_RESULT\"; cat; } > "+out+".tmp && mv "+out+".tmp "+out+"\n"), 0o755)
	cfg := writeConfig(t, dir, `
[notify]
webhook = "`+hook.URL+`/umbra"
exec = ["`+script+`"]

[[job]]
name = "vf"
kind = "verify"
schedule = "*:*:0/2"
repo = "`+repo+`"
disabled = true
`)
	data := make([]byte, 16<<20) // a volume with data: the backup stores packs
	for i := range data {
		data[i] = byte(i * 7 / 4096)
	}
	os.WriteFile(filepath.Join(dir, "a.img"), data, 0o600)
	s := startService(t, dir, []string{"a"}, "--config", cfg)
	s.ok("repo", "init", "--repo", repo)
	s.ok("backup", "a", "--repo", repo)
	testutil.DamageFirstPack(t, repo, func(n int) int { return n / 2 }, 0x04)
	s.ok("jobs", "enable", "vf")
	select {
	case m := <-got:
		if m["event"] != "job_failed" || m["job"] != "vf" || m["result"] != "failed" || !strings.Contains(m["error"].(string), "damaged") || m["version"] != 1.0 {
			t.Fatalf("webhook got %v", m)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the webhook got no alert")
	}
	s.ok("jobs", "disable", "vf")
	var images []struct {
		ID       string `json:"id"`
		Verified *struct {
			Time   time.Time `json:"time"`
			Result string    `json:"result"`
		} `json:"verified"`
	}
	if err := json.Unmarshal([]byte(s.ok("images", "list", "--repo", repo, "--json")), &images); err != nil {
		t.Fatal(err)
	}
	if len(images) != 1 || images[0].Verified == nil || images[0].Verified.Result != "damaged" || images[0].Verified.Time.IsZero() {
		t.Fatalf("images list after the verify: %+v", images)
	}
	if out := s.ok("images", "list", "--repo", repo); !strings.Contains(out, "VERIFIED") || !strings.Contains(out, " damaged") {
		t.Fatalf("images list after the verify:\n%s", out)
	}
	s.waitRuns("vf", "the exec hook's output", func([]jobRun) bool { _, err := os.Stat(out); return err == nil })
	a, _ := os.ReadFile(out)
	if line, body, _ := strings.Cut(string(a), "\n"); line != "vf failed" || !strings.Contains(body, `"job":"vf"`) {
		t.Fatalf("exec hook got:\n%s", a)
	}
}

// TestJobsKillCatchUp kills the service with -9 in the middle of a run
// (a writer hook holds it at freeze), leaves it down across two of the
// job's elapses, and starts it again: the killed run is recorded as
// interrupted, the missed elapses are caught up by one run, and no
// run is recorded twice.
func TestJobsKillCatchUp(t *testing.T) {
	dir := t.TempDir()
	hooks := filepath.Join(dir, "hooks")
	os.Mkdir(hooks, 0o755)
	block, started := filepath.Join(dir, "block"), filepath.Join(dir, "started")
	os.WriteFile(filepath.Join(hooks, "hold"), []byte(`#!/bin/sh
[ "$1" = freeze ] || exit 0
touch `+started+`
while [ -e `+block+` ]; do sleep 0.1; done
`), 0o755)
	os.WriteFile(block, nil, 0o600)
	cfg := writeConfig(t, dir, `
[[job]]
name = "tl"
kind = "snapshot"
schedule = "*:*:0/2"
volumes = ["a"]
writers = true
[job.keep]
hourly = 2
min_age = "0s"
`)
	s := startService(t, dir, []string{"a"}, "--config", cfg, "--hooks-dir", hooks)
	s.waitRuns("tl", "a run held at freeze", func([]jobRun) bool { _, err := os.Stat(started); return err == nil })
	before := s.history("tl")
	s.kill9()
	os.Remove(block) // the hook exits; later runs pass through it
	if len(before) == 0 || before[0].Result != "running" {
		t.Fatalf("history before the kill:\n%+v", before)
	}
	// Down across two elapses: wait until the clock is past them.
	for time.Now().Before(before[0].Start.Add(5 * time.Second)) {
		time.Sleep(100 * time.Millisecond)
	}
	s.start()
	runs := s.waitRuns("tl", "the catch-up run", func(r []jobRun) bool {
		return count(r, func(r jobRun) bool { return r.Trigger == "catch-up" && r.Result == "success" }) > 0
	})
	s.ok("jobs", "disable", "tl")
	runs = s.waitRuns("tl", "the last run to end", func(r []jobRun) bool { return r[0].Result != "running" })
	seen := map[int]bool{}
	for _, r := range runs {
		if seen[r.Seq] {
			t.Fatalf("run %d recorded twice:\n%+v", r.Seq, runs)
		}
		seen[r.Seq] = true
	}
	var killed *jobRun
	for i := range runs {
		if runs[i].Seq == before[0].Seq {
			killed = &runs[i]
		}
	}
	if killed == nil || killed.Result != "interrupted" || killed.End.IsZero() || !strings.Contains(killed.Error, "killed") {
		t.Fatalf("the killed run: %+v", killed)
	}
	if n := count(runs, func(r jobRun) bool { return r.Trigger == "catch-up" }); n != 1 {
		t.Fatalf("%d catch-up runs, want 1:\n%+v", n, runs)
	}
	// The catch-up is the first run after the restart.
	for _, r := range runs {
		if r.Seq > killed.Seq && r.Seq < runs[len(runs)-1].Seq && r.Trigger == "catch-up" && r.Seq != killed.Seq+1 {
			t.Fatalf("the catch-up is run %d, not the first after the restart:\n%+v", r.Seq, runs)
		}
	}
}

// TestJobsBadConfig: a job on a volume the service does not serve, or
// with a bad key, stops `umbra serve` at start with exit 2, naming the
// job and the key.
func TestJobsBadConfig(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ job, want string }{
		{"name = \"tl\"\nkind = \"snapshot\"\nschedule = \"hourly\"\nvolumes = [\"nope\"]\n[job.keep]\nhourly = 1\n", "job tl: volumes: \\\"nope\\\" is not a volume"},
		{"name = \"tl\"\nkind = \"snapshot\"\nschedule = \"Mon..Fry\"\nvolumes = [\"a\"]\n[job.keep]\nhourly = 1\n", "job tl: schedule:"},
	} {
		cfg := writeConfig(t, dir, "[[job]]\n"+c.job)
		img := filepath.Join(dir, "a.img")
		os.WriteFile(img, make([]byte, 1<<20), 0o600)
		// A service that starts anyway is stopped by the hang guard.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		cmd := exec.CommandContext(ctx, umbraBin, "serve", "--state-dir", filepath.Join(dir, "state"), "--nbd-socket", filepath.Join(dir, "nbd.sock"),
			"--api-socket", filepath.Join(dir, "api.sock"), "--config", cfg, "--volume", "a="+img, "--json")
		b, _ := cmd.CombinedOutput()
		cancel()
		out, code := string(b), cmd.ProcessState.ExitCode()
		if code != 2 || !strings.Contains(out, c.want) {
			t.Fatalf("serve with a bad job: exit %d, want 2 and %q:\n%s", code, c.want, out)
		}
	}
}

// TestJobsAddRemove defines a job through the CLI, sees it run, keeps
// it over a restart and removes it; a config job's name is refused.
func TestJobsAddRemove(t *testing.T) {
	dir := t.TempDir()
	cfg := writeConfig(t, dir, "[[job]]\nname = \"cfg\"\nkind = \"snapshot\"\nschedule = \"hourly\"\nvolumes = [\"a\"]\ndisabled = true\n[job.keep]\nhourly = 1\n")
	def := filepath.Join(dir, "quick.toml")
	os.WriteFile(def, []byte("[[job]]\nkind = \"snapshot\"\nschedule = \"*:*:0/2\"\nvolumes = [\"a\"]\n[job.keep]\nhourly = 2\nmin_age = \"0s\"\n"), 0o600)
	s := startService(t, dir, []string{"a"}, "--config", cfg)
	if out, code := s.umbra("jobs", "add", "cfg", "--from-file", def, "--json"); code != 1 || !strings.Contains(out, "defined in the config file: edit it there") || !strings.Contains(out, `"code":1`) {
		t.Fatalf("add of a config job's name: exit %d\n%s", code, out)
	}
	s.ok("jobs", "add", "quick", "--from-file", def, "--json")
	s.waitRuns("quick", "a successful run", func(r []jobRun) bool {
		return count(r, func(r jobRun) bool { return r.Result == "success" }) > 0
	})
	sources := func() string {
		var l struct {
			Jobs []struct{ Name, Source string }
		}
		if err := json.Unmarshal([]byte(s.ok("jobs", "list", "--json")), &l); err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, j := range l.Jobs {
			out = append(out, j.Name+"="+j.Source)
		}
		return strings.Join(out, " ")
	}
	if got := sources(); got != "cfg=config quick=api" {
		t.Fatalf("jobs: %s", got)
	}
	s.stop()
	s.start()
	if got := sources(); got != "cfg=config quick=api" {
		t.Fatalf("jobs after a restart: %s", got)
	}
	s.ok("jobs", "disable", "quick")
	s.waitRuns("quick", "the last run to end", func(r []jobRun) bool { return r[0].Result != "running" })
	s.ok("jobs", "remove", "quick", "--json")
	if got := sources(); got != "cfg=config" {
		t.Fatalf("jobs after remove: %s", got)
	}
	if out, code := s.umbra("jobs", "remove", "cfg", "--json"); code != 1 || !strings.Contains(out, "edit it there") {
		t.Fatalf("remove of a config job: exit %d\n%s", code, out)
	}
}
