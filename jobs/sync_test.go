package jobs

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"umbra/backup"
	"umbra/internal/testutil"
)

// TestSyncJob: backups into a local repository, and a sync job copying
// them into an encrypted repository on versitygw: each run copies the
// images the target lacks and only their new chunks; the images restore
// from the target as from the source; a target that is not there fails
// the run saying how to create it.
func TestSyncJob(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	s3 := testutil.StartS3(t)
	t.Setenv("AWS_ACCESS_KEY_ID", testutil.S3AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", testutil.S3SecretKey)
	repo := w.repo()
	pw := filepath.Join(w.dir, "offsite.pw")
	os.WriteFile(pw, []byte("offsite secret\n"), 0o600)
	tset := backup.Settings{Password: "offsite secret", Cred: backup.Credentials{AccessKey: testutil.S3AccessKey, SecretKey: testutil.S3SecretKey}}
	off, err := backup.InitWith(ctx, s3.Location("offsite"), tset)
	if err != nil {
		t.Fatal(err)
	}
	off.Close()
	m := w.manager([]Def{
		{Name: "bk", Kind: "backup", Schedule: "hourly", Volumes: []string{"a", "b"}, Repo: repo},
		{Name: "offsite", Kind: "sync", Schedule: "daily", Repo: repo, To: s3.Location("offsite"), ToPasswordFile: pw},
		{Name: "nowhere", Kind: "sync", Schedule: "daily", Repo: repo, To: s3.Location("missing"), Volumes: []string{"a"}},
	}, nil)
	t0 := time.Now()
	write := func(i int) {
		if _, err := w.vols["a"].WriteAt(bytes.Repeat([]byte{byte('a' + i)}, 8192), int64(i)*65536); err != nil {
			t.Fatal(err)
		}
	}
	last := func(job string) Run {
		runs, err := m.History(job, 1)
		if err != nil || len(runs) == 0 {
			t.Fatalf("history of %s: %v", job, err)
		}
		return runs[0]
	}
	write(0)
	if err := w.runAt(m, "bk", t0); err != nil {
		t.Fatal(err)
	}
	if err := w.runAt(m, "offsite", t0.Add(time.Minute)); err != nil {
		t.Fatalf("sync: %v", err)
	}
	if run := last("offsite"); run.Bytes <= 0 || !strings.Contains(run.Detail, "2 images copied, 0 there already") {
		t.Fatalf("first sync: %+v", run)
	}
	write(1)
	if err := w.runAt(m, "bk", t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := w.runAt(m, "offsite", t0.Add(time.Hour+time.Minute)); err != nil {
		t.Fatalf("sync: %v", err)
	}
	// b did not change: its new image's chunks were all there; of a's
	// only the new chunk moved (8 KiB of one byte: one chunk twice).
	if run := last("offsite"); !strings.Contains(run.Detail, "2 images copied, 2 there already") || !strings.Contains(run.Detail, "1 chunks (4096 bytes) moved") {
		t.Fatalf("second sync: %+v", run)
	}
	if err := w.runAt(m, "offsite", t0.Add(2*time.Hour)); err != nil {
		t.Fatalf("sync: %v", err)
	}
	if run := last("offsite"); !strings.Contains(run.Detail, "0 images copied, 4 there already") {
		t.Fatalf("sync with nothing new: %+v", run)
	}
	// Every image restores from the target as from the source.
	src, err := backup.Open(repo)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := backup.OpenWith(ctx, s3.Location("offsite"), tset)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	list, _ := src.Images()
	if got, _ := dst.Images(); len(list) != 4 || len(got) != 4 {
		t.Fatalf("%d images in the source, %d in the target", len(list), len(got))
	}
	for _, x := range list {
		a, b := filepath.Join(w.dir, "a.out"), filepath.Join(w.dir, "b.out")
		if err := src.Restore(x.ID, a, nil); err != nil {
			t.Fatal(err)
		}
		if err := dst.Restore(x.ID, b, nil); err != nil {
			t.Fatal(err)
		}
		ab, _ := os.ReadFile(a)
		bb, _ := os.ReadFile(b)
		if !bytes.Equal(ab, bb) {
			t.Fatalf("image %s restores from the target different from the source", x.ID)
		}
		os.Remove(a)
		os.Remove(b)
	}
	err = w.runAt(m, "nowhere", t0.Add(3*time.Hour))
	if run := last("nowhere"); err == nil || run.Result != Failed || !strings.Contains(run.Error, "--init") {
		t.Fatalf("sync into a missing repository: %v, %+v", err, run)
	}
}
