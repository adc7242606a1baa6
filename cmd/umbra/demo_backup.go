package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	_ "modernc.org/sqlite"

	"umbra/api/umbrav1"
	"umbra/backup"
	"umbra/internal/sqlitecommitter"
)

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

// runBackupDemo is the main job end to end: it starts `umbra serve` on a
// sample volume, puts ext4 on it through a loop device over the service's
// FUSE file, runs a SQLite application that commits without pause, takes
// an application-consistent full and then incremental backup into a local
// repository, verifies it, restores the newest image and checks it with
// e2fsck and SQLite.
func runBackupDemo(ctx context.Context, out io.Writer, dir string, size int64) (err error) {
	var steps []demoStep
	step := func(start time.Time, name, format string, args ...any) {
		s := demoStep{Step: name, Detail: fmt.Sprintf(format, args...), Millis: time.Since(start).Milliseconds()}
		steps = append(steps, s)
		if !gflags.json {
			fmt.Fprintf(out, "%-10s %-7s %s\n", s.Step, fmt.Sprintf("%dms", s.Millis), s.Detail)
		}
	}
	var cleanups []func()
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
		if err == nil && gflags.json {
			err = printJSON(out, map[string]any{"dir": dir, "steps": steps})
		}
	}()
	run := func(name string, args ...string) (string, error) {
		b, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			return string(b), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(b)))
		}
		return string(b), nil
	}

	t := time.Now()
	img := filepath.Join(dir, "sample.img")
	f, err := os.Create(img)
	if err != nil {
		return err
	}
	f.Truncate(size)
	f.Close()
	fuseDir, mnt := filepath.Join(dir, "files"), filepath.Join(dir, "mnt")
	os.MkdirAll(fuseDir, 0o755)
	os.MkdirAll(mnt, 0o755)
	dbPath := filepath.Join(mnt, "app.db")
	api := filepath.Join(dir, "umbra.sock")
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	logFile, _ := os.Create(filepath.Join(dir, "serve.log"))
	srv := exec.Command(exe, "serve", "--state-dir", filepath.Join(dir, "state"), "--api-socket", api,
		"--nbd-socket", filepath.Join(dir, "nbd.sock"), "--fuse-dir", fuseDir,
		"--volume", "sample="+img, "--sqlite-writer", dbPath)
	srv.Stderr = logFile
	if err := srv.Start(); err != nil {
		return err
	}
	cleanups = append(cleanups, func() {
		srv.Process.Signal(syscall.SIGTERM)
		srv.Wait()
		logFile.Close()
	})
	file := filepath.Join(fuseDir, "sample")
	for i := 0; ; i++ {
		_, e1 := os.Stat(api)
		_, e2 := os.Stat(file)
		if e1 == nil && e2 == nil {
			break
		}
		if i > 200 {
			return fmt.Errorf("umbra serve did not start: see %s", filepath.Join(dir, "serve.log"))
		}
		time.Sleep(25 * time.Millisecond)
	}
	gflags.apiSocket = api
	step(t, "service", "umbra serve is up: volume sample (%d MiB) at %s, API %s", size>>20, file, api)

	t = time.Now()
	o, err := run("losetup", "-f", "--show", "--direct-io=on", file)
	if err != nil {
		return err
	}
	dev := strings.TrimSpace(o)
	cleanups = append(cleanups, func() { exec.Command("losetup", "-d", dev).Run() })
	if _, err := run("mkfs.ext4", "-q", "-F", dev); err != nil {
		return err
	}
	if _, err := run("mount", dev, mnt); err != nil {
		return err
	}
	cleanups = append(cleanups, func() { exec.Command("umount", mnt).Run() })
	step(t, "ext4", "mkfs.ext4 on %s (loop over the FUSE file), mounted at %s", dev, mnt)

	t = time.Now()
	app, err := sqlitecommitter.Start(dbPath)
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() { app.Stop() })
	time.Sleep(300 * time.Millisecond)
	step(t, "app", "a SQLite application commits orders in WAL mode without pause (%d so far)", app.Acked())

	repo := filepath.Join(dir, "repo")
	r, err := backup.Init(repo)
	if err != nil {
		return err
	}
	r.Close()
	var last *umbrav1.ImageResult
	for _, kind := range []string{"full", "incremental"} {
		t = time.Now()
		before := app.Acked()
		var resp *umbrav1.BackupResponse
		if err := call(ctx, func(ctx context.Context, c umbrav1.UmbraClient) error {
			var err error
			resp, err = c.Backup(ctx, &umbrav1.BackupRequest{Volumes: []string{"sample"}, Repo: repo, Writers: true})
			return err
		}); err != nil {
			return err
		}
		last = resp.Images[0]
		step(t, "backup", "%s image %s: writers %v froze; read %s, stored %s new (%s compressed); %d orders were committed before it began",
			map[bool]string{true: "incremental", false: "full"}[last.Incremental], last.Image, resp.Writers,
			human(last.BytesRead), human(last.BytesNew), human(last.BytesWritten), before)
		time.Sleep(300 * time.Millisecond)
		_ = kind
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
	step(t, "verify", "%d chunks re-hashed, %d images good in %s", rep.Chunks, rep.GoodImages, repo)

	t = time.Now()
	restored := filepath.Join(dir, "restored.img")
	if err := r.Restore(last.Image, restored, nil); err != nil {
		return err
	}
	if _, err := run("e2fsck", "-fn", restored); err != nil {
		return fmt.Errorf("the restored image is not a clean filesystem: %w", err)
	}
	orders, err := restoredOrders(restored, dir)
	if err != nil {
		return err
	}
	step(t, "restore", "%s restored to %s: e2fsck clean, SQLite integrity ok, %d orders", last.Image, restored, orders)
	if !gflags.json {
		fmt.Fprintf(out, "done: everything is in %s (service log: serve.log)\n", dir)
	}
	return nil
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
	os.WriteFile(cp, data, 0o600)
	db, err := sql.Open("sqlite", "file:"+cp+"?mode=ro")
	if err != nil {
		return 0, err
	}
	defer db.Close()
	var ok string
	if err := db.QueryRow("PRAGMA integrity_check").Scan(&ok); err != nil || ok != "ok" {
		return 0, errors.Join(fmt.Errorf("integrity_check: %q", ok), err)
	}
	var n int64
	err = db.QueryRow("SELECT count(*) FROM orders").Scan(&n)
	return n, err
}
