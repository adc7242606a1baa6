package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/backup"
	"umbra/internal/testutil"
)

// cliEnv runs the CLI without a service, with extra environment.
func cliEnv(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(umbraBin, args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return stdout.String(), stderr.String(), ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), 0
}

// copySource makes an unencrypted repository with an image of each of
// two volumes of random data, and returns it with the images' data.
func copySource(t *testing.T, dir string) (string, map[string][]byte) {
	t.Helper()
	loc := filepath.Join(dir, "src")
	repo, err := backup.Init(loc)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	r := rand.New(rand.NewPCG(51, 52))
	data := map[string][]byte{}
	for _, vol := range []string{"a", "b"} {
		b := make([]byte, 8<<20)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		x, _, err := repo.Backup(t.Context(), bytesSource(b), backup.Options{Volume: vol})
		if err != nil {
			t.Fatal(err)
		}
		data[x.ID] = b
	}
	return loc, data
}

type bytesSource []byte

func (b bytesSource) ReadAt(p []byte, off int64) (int, error) { return copy(p, b[off:]), nil }
func (b bytesSource) Size() int64                             { return int64(len(b)) }

// restoresAs restores each image from repo through the CLI and compares.
func restoresAs(t *testing.T, env []string, repo string, data map[string][]byte, ids ...string) {
	t.Helper()
	for _, id := range ids {
		out := filepath.Join(t.TempDir(), "out.img")
		if so, se, code := cliEnv(t, env, "restore", id, "--repo", repo, "--to", out); code != 0 {
			t.Fatalf("restore %s from %s: exit %d\n%s%s", id, repo, code, so, se)
		}
		if b, _ := os.ReadFile(out); !bytes.Equal(b, data[id]) {
			t.Fatalf("image %s restores from %s different from the source", id, repo)
		}
	}
}

// TestCLICopyKilled: `umbra copy` into an encrypted repository killed
// with SIGKILL at one of its first progress reports, twice, leaves
// only whole images there (verify passes after each kill); a last run
// completes without anyone removing the killed runs' locks, and every
// image restores from the target as it was.
func TestCLICopyKilled(t *testing.T) {
	dir := t.TempDir()
	src, data := copySource(t, dir)
	dst := filepath.Join(dir, "dst")
	env := []string{"UMBRA_TO_PASSWORD=target secret"}
	var ids []string
	for id := range data {
		ids = append(ids, id)
	}
	// Bad input: a clear error, in JSON too, and nothing created.
	if _, se, code := cliEnv(t, env, "copy", "--from", src, "--to", dst, "--all", "--json"); code != 3 || !strings.Contains(se, `"code":3`) || !strings.Contains(se, "--init") {
		t.Fatalf("copy into a missing repository: exit %d %s", code, se)
	}
	if _, se, code := cliEnv(t, env, "copy", "--from", src, "--to", dst, "--init"); code != 2 || !strings.Contains(se, "--all") {
		t.Fatalf("copy of nothing: exit %d %s", code, se)
	}
	if _, err := os.Stat(dst); err == nil {
		t.Fatal("a refused copy created the target")
	}
	kills := 0
	for attempt := 0; ; attempt++ {
		if attempt == 20 {
			t.Fatal("20 attempts were all killed before they completed")
		}
		cmd := exec.Command(umbraBin, "copy", "--from", src, "--to", dst, "--init", "--all", "--json")
		cmd.Env = append(os.Environ(), env...)
		stderr, _ := cmd.StderrPipe()
		var stdout bytes.Buffer
		cmd.Stdout = &stdout
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(stderr)
		killed := false
		at := 1 + rand.IntN(3) // killed at a random progress report of the first two attempts
		for seen := 0; sc.Scan(); {
			var ev struct{ Event string }
			if json.Unmarshal(sc.Bytes(), &ev) == nil && ev.Event == "progress" && attempt < 2 {
				if seen++; seen < at {
					continue
				}
				cmd.Process.Kill()
				killed = true
				break
			}
		}
		for sc.Scan() {
		}
		err := cmd.Wait()
		if !killed || err == nil {
			if err != nil {
				t.Fatalf("copy: %v", err)
			}
			var st backup.CopyStats
			if err := json.Unmarshal(stdout.Bytes(), &st); err != nil || !st.Rehashed || len(st.Images) != 2 {
				t.Fatalf("copy --json: %s (%v)", stdout.String(), err)
			}
			t.Logf("completed after %d kills: %d chunks copied, %d were there", kills, st.ChunksCopied, st.ChunksPresent)
			break
		}
		kills++
		// Whatever the target lists is whole.
		so, se, code := cliEnv(t, env, "verify", "--repo", dst, "--password-file", writePw(t, "target secret"), "--json")
		if code != 0 {
			t.Fatalf("verify after a kill: exit %d\n%s%s", code, so, se)
		}
	}
	restoresAs(t, []string{"UMBRA_PASSWORD=target secret"}, dst, data, ids...)
	// Again: nothing to move.
	so, se, code := cliEnv(t, env, "copy", "--from", src, "--to", dst, "--all")
	if code != 0 || strings.Count(so, "present") != 2 {
		t.Fatalf("copy again: exit %d\n%s%s", code, so, se)
	}
}

func writePw(t *testing.T, pw string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(p, []byte(pw+"\n"), 0o600)
	return p
}

// TestCLICopyS3: `umbra copy --init` into versitygw; the images restore
// from there.
func TestCLICopyS3(t *testing.T) {
	dir := t.TempDir()
	src, data := copySource(t, dir)
	v := testutil.StartS3(t)
	dst := v.Location("copy")
	so, se, code := cliEnv(t, v.Env(), "copy", "--from", src, "--to", dst, "--init", "--volume", "a", "--json")
	if code != 0 {
		t.Fatalf("copy into S3: exit %d\n%s%s", code, so, se)
	}
	var st backup.CopyStats
	if err := json.Unmarshal([]byte(so), &st); err != nil || st.Rehashed || len(st.Images) != 1 || st.Images[0].Result != "copied" || st.BytesRead != st.BytesCopied {
		t.Fatalf("copy --json: %s (%v)", so, err)
	}
	restoresAs(t, v.Env(), dst, data, st.Images[0].ID)
}
