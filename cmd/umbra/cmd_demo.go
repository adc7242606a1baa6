package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	_ "modernc.org/sqlite"

	"umbra/api/umbrav1"
	"umbra/backup"
	"umbra/cow"
	"umbra/internal/sqlitecommitter"
	"umbra/provider"
)

// The demo has two scenarios of one shape: each is a function that runs
// steps on a demo (its directory, its report, what it must undo), and
// runScenario does the rest: the undo in reverse order, the report as
// JSON or lines, the closing line.
//
//   - backupDemo, the main job end to end on the kernel path (root,
//     /dev/fuse, losetup, e2fsprogs);
//   - engineDemo, the copy-on-write engine alone, anywhere.

func init() { verbs = append(verbs, newDemoCmd) }

// demoStep is one line of the demo's report.
type demoStep struct {
	Step   string `json:"step"`
	Detail string `json:"detail"`
	Millis int64  `json:"ms"`
}

// demo is one run of a scenario.
type demo struct {
	ctx   context.Context
	out   io.Writer
	dir   string
	size  int64
	steps []demoStep
	undo  []func() // run last first when the scenario ends
	done  string   // the closing line (not under --json)
}

// step records a step that began at start and prints it (not under
// --json, where the report is printed whole at the end).
func (d *demo) step(start time.Time, name, format string, args ...any) {
	s := demoStep{Step: name, Detail: fmt.Sprintf(format, args...), Millis: time.Since(start).Milliseconds()}
	d.steps = append(d.steps, s)
	if !gflags.json {
		fmt.Fprintf(d.out, "%-10s %-7s %s\n", s.Step, fmt.Sprintf("%dms", s.Millis), s.Detail)
	}
}

// later registers f to run when the scenario ends, whatever happened.
func (d *demo) later(f func()) { d.undo = append(d.undo, f) }

// runScenario runs scenario on a new demo in dir and reports it.
func runScenario(ctx context.Context, out io.Writer, dir string, size int64, scenario func(*demo) error) (err error) {
	d := &demo{ctx: ctx, out: out, dir: dir, size: size}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	defer func() {
		for i := len(d.undo) - 1; i >= 0; i-- {
			d.undo[i]()
		}
		if err != nil {
			return
		}
		if gflags.json {
			err = printJSON(out, map[string]any{"dir": dir, "steps": d.steps})
		} else {
			fmt.Fprintln(out, d.done)
		}
	}()
	return scenario(d)
}

func newDemoCmd() *cobra.Command {
	var dir string
	var size int64
	var engineOnly bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run Umbra's main job end to end on embedded defaults and print what was done",
		Long: `demo runs the main job on a sample volume under --dir (default: a new
temporary directory). As root, with /dev/fuse, losetup and e2fsprogs: it
starts umbra serve, puts ext4 on the volume through a loop device over the
service's FUSE file, runs a SQLite application that commits without pause,
takes an application-consistent full and then incremental backup into a
local repository, verifies it, restores the newest image and checks it
with e2fsck and SQLite. Otherwise it shows the copy-on-write engine alone:
a persistent shadow copy that keeps reading its commit point while the
volume changes.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if size < 64<<20 {
				return usageError{fmt.Errorf("--size %d: the sample volume needs at least 64 MiB", size)}
			}
			if dir == "" {
				d, err := os.MkdirTemp("", "umbra-demo-")
				if err != nil {
					return fmt.Errorf("demo: %w", err)
				}
				dir = d
			}
			scenario := engineDemo
			if ok, why := canRunFullDemo(); ok && !engineOnly {
				scenario = backupDemo
			} else if !engineOnly && !gflags.json {
				fmt.Fprintf(cmd.OutOrStdout(), "(the full demo needs the kernel path: %s; showing the engine alone)\n", why)
			}
			return runScenario(cmd.Context(), cmd.OutOrStdout(), dir, size, scenario)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory for the sample volume and its shadow storage (default: a new temporary directory)")
	cmd.Flags().Int64Var(&size, "size", 256<<20, "size of the sample volume in bytes")
	cmd.Flags().BoolVar(&engineOnly, "engine-only", false, "show only the copy-on-write engine, without the kernel path")
	return cmd
}

// canRunFullDemo reports whether the kernel path is available: root,
// /dev/fuse, losetup, mkfs.ext4 and e2fsck.
func canRunFullDemo() (bool, string) {
	if os.Geteuid() != 0 {
		return false, "not root (loop devices and mounts need it)"
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return false, "no /dev/fuse"
	}
	for _, tool := range []string{"losetup", "mkfs.ext4", "e2fsck", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			return false, tool + " is missing (apt-get install util-linux e2fsprogs)"
		}
	}
	return true, ""
}

// engineDemo shows the copy-on-write engine alone: a persistent shadow
// copy keeps reading its commit point while the volume changes.
func engineDemo(d *demo) error {
	t := time.Now()
	origin := filepath.Join(d.dir, "sample.img")
	if err := sparseFile(origin, d.size); err != nil {
		return err
	}
	vol, err := cow.Open("sample", origin, cow.Options{StorageDir: filepath.Join(d.dir, "shadow"), MaxStorage: d.size / 2})
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	d.later(func() { vol.Close() })
	d.step(t, "volume", "created %s (%d MiB, chunk %d KiB), shadow storage %s (max %d MiB)", origin, d.size>>20, vol.ChunkSize()>>10, filepath.Join(d.dir, "shadow"), d.size/2>>20)

	t = time.Now()
	block := make([]byte, 1<<20)
	for off := int64(0); off < d.size; off += int64(len(block)) {
		for i := range block {
			block[i] = byte(off>>20) ^ byte(i)
		}
		if _, err := vol.WriteAt(block[:min(int64(len(block)), d.size-off)], off); err != nil {
			return fmt.Errorf("demo: write: %w", err)
		}
	}
	if err := vol.Flush(); err != nil {
		return err
	}
	before, err := hashReader(vol, d.size)
	if err != nil {
		return err
	}
	d.step(t, "write", "filled the volume; sha256 %s", before[:16])

	t = time.Now()
	snap, err := vol.CreateSnapshot(d.ctx, provider.SnapshotOptions{ID: "demo", Persistent: true})
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	d.step(t, "snapshot", "committed persistent shadow copy %s@%s", snap.Volume, snap.ID)

	t = time.Now()
	marks := bytes.Repeat([]byte{0xee}, 4096)
	var changed int64
	for off := int64(0); off < d.size; off += 97 * 4096 {
		if _, err := vol.WriteAt(marks, off); err != nil {
			return fmt.Errorf("demo: write: %w", err)
		}
		changed += 4096
	}
	d.step(t, "overwrite", "overwrote %d KiB at scattered places", changed>>10)

	t = time.Now()
	s, err := vol.OpenSnapshot(snap.ID)
	if err != nil {
		return err
	}
	got, err := hashReader(s, d.size)
	if err != nil {
		return err
	}
	if got != before {
		return fmt.Errorf("demo: shadow copy reads %s, want %s: this is a bug, please report it", got[:16], before[:16])
	}
	st := vol.Storage()
	d.step(t, "verify", "shadow copy still reads sha256 %s; diff area holds %d KiB for %d KiB changed", got[:16], st.Used>>10, changed>>10)

	bm, reliable, err := vol.Changed(snap.ID, "")
	if err != nil {
		return err
	}
	var n int
	for i := int64(0); i*bm.Granule < bm.Size; i++ {
		if bm.Set(i) {
			n++
		}
	}
	d.step(time.Now(), "tracking", "%d chunks changed since the shadow copy (reliable: %v)", n, reliable)
	d.done = "done: files are in " + d.dir
	return nil
}

// backupDemo is the main job end to end: it starts `umbra serve` on a
// sample volume, puts ext4 on it through a loop device over the service's
// FUSE file, runs a SQLite application that commits without pause, takes
// an application-consistent full and then incremental backup into a local
// repository, verifies it, restores the newest image and checks it with
// e2fsck and SQLite.
func backupDemo(d *demo) error {
	t := time.Now()
	img := filepath.Join(d.dir, "sample.img")
	if err := sparseFile(img, d.size); err != nil {
		return err
	}
	fuseDir, mnt := filepath.Join(d.dir, "files"), filepath.Join(d.dir, "mnt")
	os.MkdirAll(fuseDir, 0o755)
	os.MkdirAll(mnt, 0o755)
	dbPath := filepath.Join(mnt, "app.db")
	api := filepath.Join(d.dir, "umbra.sock")
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	logPath := filepath.Join(d.dir, "serve.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	srv := exec.Command(exe, "serve", "--state-dir", filepath.Join(d.dir, "state"), "--api-socket", api,
		"--nbd-socket", filepath.Join(d.dir, "nbd.sock"), "--fuse-dir", fuseDir,
		"--volume", "sample="+img, "--sqlite-writer", dbPath)
	srv.Stderr = logFile
	if err := srv.Start(); err != nil {
		logFile.Close()
		return err
	}
	exited := make(chan struct{})
	go func() { srv.Wait(); close(exited) }()
	d.later(func() {
		srv.Process.Signal(syscall.SIGTERM)
		<-exited
		logFile.Close()
	})
	file := filepath.Join(fuseDir, "sample")
	// Up when both the API socket and the FUSE file are there; a service
	// that stops first says why in its log.
	for up := false; !up; {
		select {
		case <-exited:
			return fmt.Errorf("umbra serve stopped before it was up: see %s", logPath)
		case <-d.ctx.Done():
			return d.ctx.Err()
		case <-time.After(25 * time.Millisecond):
		}
		_, e1 := os.Stat(api)
		_, e2 := os.Stat(file)
		up = e1 == nil && e2 == nil
	}
	gflags.apiSocket = api
	d.step(t, "service", "umbra serve is up: volume sample (%d MiB) at %s, API %s", d.size>>20, file, api)

	t = time.Now()
	o, err := demoRun("losetup", "-f", "--show", "--direct-io=on", file)
	if err != nil {
		return err
	}
	dev := strings.TrimSpace(o)
	d.later(func() { exec.Command("losetup", "-d", dev).Run() })
	if _, err := demoRun("mkfs.ext4", "-q", "-F", dev); err != nil {
		return err
	}
	if _, err := demoRun("mount", dev, mnt); err != nil {
		return err
	}
	d.later(func() { exec.Command("umount", mnt).Run() })
	d.step(t, "ext4", "mkfs.ext4 on %s (loop over the FUSE file), mounted at %s", dev, mnt)

	t = time.Now()
	app, err := sqlitecommitter.Start(dbPath)
	if err != nil {
		return err
	}
	d.later(func() { app.Stop() })
	if err := commits(d.ctx, app, 0); err != nil {
		return err
	}
	d.step(t, "app", "a SQLite application commits orders in WAL mode without pause (%d so far)", app.Acked())

	repo := filepath.Join(d.dir, "repo")
	r, err := backup.Init(repo)
	if err != nil {
		return err
	}
	r.Close()
	var last *umbrav1.ImageResult
	for range 2 { // a full image, then an incremental one
		t = time.Now()
		before := app.Acked()
		var resp *umbrav1.BackupResponse
		if err := call(d.ctx, func(ctx context.Context, c umbrav1.UmbraClient) error {
			var err error
			resp, err = c.Backup(ctx, &umbrav1.BackupRequest{Volumes: []string{"sample"}, Repo: repo, Writers: true})
			return err
		}); err != nil {
			return err
		}
		last = resp.Images[0]
		d.step(t, "backup", "%s image %s: writers %v froze; read %s, stored %s new (%s compressed); %d orders were committed before it began",
			map[bool]string{true: "incremental", false: "full"}[last.Incremental], last.Image, resp.Writers,
			human(last.BytesRead), human(last.BytesNew), human(last.BytesWritten), before)
		// The next image has orders this one has not.
		if err := commits(d.ctx, app, app.Acked()); err != nil {
			return err
		}
	}
	app.Stop()

	t = time.Now()
	r, err = backup.Open(repo)
	if err != nil {
		return err
	}
	defer r.Close()
	rep := r.Verify()
	if len(rep.BadImages) > 0 || len(rep.BadChunks) > 0 {
		return fmt.Errorf("verify found damage in %s: %+v", repo, rep)
	}
	d.step(t, "verify", "%d chunks re-hashed, %d images good in %s", rep.Chunks, rep.GoodImages, repo)

	t = time.Now()
	restored := filepath.Join(d.dir, "restored.img")
	if err := r.Restore(last.Image, restored, nil); err != nil {
		return err
	}
	if _, err := demoRun("e2fsck", "-fn", restored); err != nil {
		return fmt.Errorf("the restored image is not a clean filesystem: %w", err)
	}
	orders, err := restoredOrders(restored, d.dir)
	if err != nil {
		return err
	}
	d.step(t, "restore", "%s restored to %s: e2fsck clean, SQLite integrity ok, %d orders", last.Image, restored, orders)
	d.done = "done: everything is in " + d.dir + " (service log: serve.log)"
	return nil
}

// commits waits until app has acknowledged more than after orders.
func commits(ctx context.Context, app *sqlitecommitter.Committer, after int64) error {
	for app.Acked() <= after {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// demoRun runs a command; its error carries the command and its output.
func demoRun(name string, args ...string) (string, error) {
	b, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(b), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(b)))
	}
	return string(b), nil
}

// sparseFile creates path as a sparse file of size bytes.
func sparseFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fmt.Errorf("demo: %w", err)
	}
	return f.Close()
}

func hashReader(r io.ReaderAt, size int64) (string, error) {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(r, 0, size)); err != nil {
		return "", fmt.Errorf("demo: read: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// restoredOrders mounts a restored ext4 image read-only and checks its
// SQLite database.
func restoredOrders(image, dir string) (int64, error) {
	mnt := filepath.Join(dir, "restored-mnt")
	os.MkdirAll(mnt, 0o755)
	if out, err := exec.Command("mount", "-o", "loop,ro,noload", image, mnt).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("mount the restored image: %v: %s", err, out)
	}
	defer exec.Command("umount", mnt).Run()
	data, err := os.ReadFile(filepath.Join(mnt, "app.db"))
	if err != nil {
		return 0, err
	}
	cp := filepath.Join(dir, "restored-app.db")
	if err := os.WriteFile(cp, data, 0o600); err != nil {
		return 0, err
	}
	return sqlitecommitter.CheckCopy(cp)
}
