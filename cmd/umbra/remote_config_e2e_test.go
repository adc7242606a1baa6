package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"

	"umbra/api"
	"umbra/internal/testutil"
	umbrasvc "umbra/service"
)

// TestServeAPIFromConfig: the TCP API, the audit log and the metrics
// listener configured in the TOML file; a TOML tokens file; the CLI with
// UMBRA_TOKEN and with a client certificate.
func TestServeAPIFromConfig(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewPKI(t)
	ca.WriteCA(t, filepath.Join(dir, "ca.pem"))
	testutil.WritePEM(t, ca.Issue(t, "umbra", true), filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key"))
	testutil.WritePEM(t, ca.Issue(t, "backup-host", false), filepath.Join(dir, "client.pem"), filepath.Join(dir, "client.key"))
	tokens := filepath.Join(dir, "tokens.toml")
	os.WriteFile(tokens, []byte("[[token]]\ntoken = \"op-token-0123456789abcdef\"\nrole = \"operator\"\nname = \"ops\"\n\n"+
		"[[cert]]\ncn = \"backup-host\"\nrole = \"admin\"\n"), 0o600)
	apiAddr, metricsAddr := freePort(t), freePort(t)
	auditLog := filepath.Join(dir, "audit", "api.log")
	os.Mkdir(filepath.Dir(auditLog), 0o700)
	config := filepath.Join(dir, "umbra.toml")
	os.WriteFile(config, fmt.Appendf(nil, "metrics_listen = %q\naudit_log = %q\n\n[api]\nlisten = %q\ntls_cert = %q\ntls_key = %q\nclient_ca = %q\ntokens = %q\n",
		metricsAddr, auditLog, apiAddr, filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key"), filepath.Join(dir, "ca.pem"), tokens), 0o600)
	startService(t, dir, []string{"a"}, "--config", config)

	remote := func(env []string, args ...string) (string, int) {
		cmd := exec.Command(umbraBin, append([]string{"--api", apiAddr, "--ca", filepath.Join(dir, "ca.pem")}, args...)...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return string(out), 0
	}
	snapshots := func() string {
		resp, err := http.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		m := regexp.MustCompile(`(?m)^umbra_snapshots\{volume="a"\} (\S+)$`).FindStringSubmatch(string(b))
		if m == nil {
			t.Fatalf("no umbra_snapshots for volume a in:\n%s", b)
		}
		return m[1]
	}
	token := []string{"UMBRA_TOKEN=op-token-0123456789abcdef"}
	cert := []string{"--cert", filepath.Join(dir, "client.pem"), "--key", filepath.Join(dir, "client.key")}

	if n := snapshots(); n != "0" {
		t.Fatalf("%s snapshots before any was made", n)
	}
	if out, code := remote(nil, "volume", "list"); code != 5 || !strings.Contains(out, "token") {
		t.Fatalf("no credentials: exit %d %s, want 5 and a hint", code, out)
	}
	if out, code := remote(token, "snapshot", "create", "a", "--id", "c1"); code != 0 {
		t.Fatalf("operator (UMBRA_TOKEN) create: exit %d %s", code, out)
	}
	if n := snapshots(); n != "1" {
		t.Errorf("%s snapshots after create, want 1", n)
	}
	if out, code := remote(token, "snapshot", "delete", "a", "c1"); code != 5 {
		t.Fatalf("operator delete: exit %d %s, want 5", code, out)
	}
	if out, code := remote(nil, append(cert, "snapshot", "delete", "a", "c1")...); code != 0 {
		t.Fatalf("admin (client certificate) delete: exit %d %s", code, out)
	}
	if n := snapshots(); n != "0" {
		t.Errorf("%s snapshots after delete, want 0", n)
	}
	out, err := exec.Command(umbraBin, "--token", "op-token-0123456789abcdef", "volume", "list").CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "--api") {
		t.Errorf("--token without --api: %v %s, want exit 2 naming --api", err, out)
	}

	b, err := os.ReadFile(auditLog)
	if err != nil {
		t.Fatalf("audit_log of the config: %v", err)
	}
	for _, want := range []string{
		`"who":"ops","addr":"127.0.0.1:[0-9]+","role":"operator","method":"/umbra.v1.Umbra/CreateSnapshotSet".*"result":"OK"`,
		`"who":"ops",.*"method":"/umbra.v1.Umbra/DeleteSnapshots".*"result":"PermissionDenied"`,
		`"who":"cert:backup-host",.*"role":"admin","method":"/umbra.v1.Umbra/DeleteSnapshots".*"result":"OK"`,
		`"who":"anonymous",.*"result":"Unauthenticated"`,
	} {
		if !regexp.MustCompile(want).Match(b) {
			t.Errorf("no audit line matching %s in:\n%s", want, b)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "state", "audit.log")); err == nil {
		t.Errorf("the default audit log was written although the config names another")
	}
}

// TestServeAPIRefusals: a TCP API that would be unsafe or is half
// configured is refused before anything is opened, with a clear error.
func TestServeAPIRefusals(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewPKI(t)
	cert, key := filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key")
	testutil.WritePEM(t, ca.Issue(t, "umbra", true), cert, key)
	open := filepath.Join(dir, "tokens-0644")
	os.WriteFile(open, []byte("op-token-0123456789abcdef operator ops\n"), 0o644)
	os.Chmod(open, 0o644)
	empty := filepath.Join(dir, "tokens-empty")
	os.WriteFile(empty, []byte("# nobody\n"), 0o600)
	img := filepath.Join(dir, "a.img")
	testutil.SparseFile(t, img, 1<<20)
	listen := []string{"--api-listen", "127.0.0.1:0", "--api-tls-cert", cert, "--api-tls-key", key}
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"world-readable tokens", append(listen, "--api-tokens", open), "chmod 600 " + open},
		{"no identities", append(listen, "--api-tokens", empty), "has no identities"},
		{"no tokens file", listen, "requires --api-tls-cert, --api-tls-key and --api-tokens"},
		{"no certificate", []string{"--api-listen", "127.0.0.1:0", "--api-tokens", empty}, "requires --api-tls-cert"},
		{"tokens without listen", []string{"--api-tokens", open}, "give --api-listen"},
		{"negative NBD connections", []string{"--nbd-max-connections", "-1"}, "--nbd-max-connections -1"},
		{"NBD client CA without listen", []string{"--nbd-tls-client-ca", cert}, "give --nbd-listen"},
		{"NBD client CA not PEM", []string{"--nbd-listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key, "--nbd-tls-client-ca", empty}, "no PEM certificate"},
	} {
		t.Run(c.name, func(t *testing.T) {
			nbdSock := filepath.Join(dir, "nbd.sock")
			ctx, cancel := context.WithTimeout(context.Background(), testutil.HangGuard)
			defer cancel()
			args := append([]string{"serve", "--state-dir", filepath.Join(dir, "state"), "--nbd-socket", nbdSock,
				"--api-socket", filepath.Join(dir, "api.sock"), "--volume", "a=" + img}, c.args...)
			out, err := exec.CommandContext(ctx, umbraBin, args...).CombinedOutput()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), c.want) {
				t.Fatalf("%v: %v\n%s\nwant exit 2 saying %q", c.args, err, out, c.want)
			}
			if _, err := os.Stat(nbdSock); err == nil {
				t.Errorf("the NBD socket was made before the refusal")
			}
		})
	}
}

// TestDeployExamples: deploy/umbra.toml and deploy/tokens.example parse,
// their commented-out settings included.
func TestDeployExamples(t *testing.T) {
	setting := regexp.MustCompile(`(?m)^# (\[\[?[a-z.]+\]\]?|[a-z_]+ = .*)$`)
	uncomment := func(b []byte) []byte { return setting.ReplaceAll(b, []byte("$1")) }

	b, err := os.ReadFile("../../deploy/umbra.toml")
	if err != nil {
		t.Fatal(err)
	}
	for _, text := range [][]byte{b, uncomment(b)} {
		var cfg umbrasvc.Config
		md, err := toml.Decode(string(text), &cfg)
		if err != nil {
			t.Fatalf("deploy/umbra.toml: %v\n%s", err, text)
		}
		if und := md.Undecoded(); len(und) > 0 {
			t.Errorf("deploy/umbra.toml: keys umbra serve does not know: %v", und)
		}
		if len(cfg.Volumes) != 1 {
			t.Errorf("deploy/umbra.toml: %d volumes", len(cfg.Volumes))
		}
	}

	b, err = os.ReadFile("../../deploy/tokens.example")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	lines, tomlForm := filepath.Join(dir, "tokens"), filepath.Join(dir, "tokens.toml")
	os.WriteFile(lines, b, 0o600)
	os.WriteFile(tomlForm, uncomment(regexp.MustCompile(`(?s)^.*# The same as TOML[^\n]*\n[^\n]*\n`).ReplaceAll(b, nil)), 0o600)
	for _, f := range []string{lines, tomlForm} {
		if _, err := api.LoadIdentities(f); err != nil {
			t.Errorf("deploy/tokens.example: %v", err)
		}
	}
}
