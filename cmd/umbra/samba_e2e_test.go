package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/internal/testutil"
)

// TestSambaPreviousVersions: a Samba share on an ext4 filesystem that
// lives on an Umbra volume. A snapshot is taken with the command Samba's
// vfs_shell_snap runs (`umbra samba create`); smbd with vfs_shadow_copy2
// then shows it to SMB clients as a previous version: smbclient's
// allinfo lists it and reads the file's old content through it. The
// delete command removes it.
func TestSambaPreviousVersions(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "smbd", "smbclient", "mkfs.ext4", "losetup", "blkid")
	testutil.NeedFUSE(t)
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755) // smbd's guest (nobody) walks to the share
	os.Chmod(dir, 0o755)
	s, share := startShare(t, dir)

	if _, code := s.umbra("samba", "check", share); code != 0 {
		t.Fatalf("samba check %s: exit %d", share, code)
	}
	if _, code := s.umbra("samba", "check", "/etc"); code == 0 {
		t.Fatal("samba check /etc succeeded")
	}
	snapPath := strings.TrimSpace(s.ok("samba", "create", share))
	if filepath.Dir(snapPath) != filepath.Join(share, ".snapshots") || !strings.HasPrefix(filepath.Base(snapPath), "@GMT-") {
		t.Fatalf("samba create printed %q", snapPath)
	}
	if b, err := os.ReadFile(filepath.Join(snapPath, "doc.txt")); err != nil || string(b) != "version 1" {
		t.Fatalf("the snapshot at %s: %q %v", snapPath, b, err)
	}
	os.WriteFile(filepath.Join(share, "doc.txt"), []byte("version 2"), 0o644)

	// smbd on a free port, its state in the test directory.
	port, confFile := sambaConf(t, dir, "  map to guest = Bad User\n  guest account = nobody\n",
		fmt.Sprintf("[share]\n  path = %s\n  read only = yes\n  guest ok = yes\n  vfs objects = shadow_copy2\n"+
			"  shadow:mountpoint = %s\n  shadow:snapdir = .snapshots\n  shadow:format = @GMT-%%Y.%%m.%%d-%%H.%%M.%%S\n  shadow:sort = desc\n", share, share))
	startSmbd(t, confFile, port)
	smbclient := func(cmd string) string {
		out, err := exec.Command("smbclient", "//127.0.0.1/share", "-p", fmt.Sprint(port), "-N", "-c", cmd).CombinedOutput()
		if err != nil {
			t.Fatalf("smbclient -c %q: %v\n%s", cmd, err, out)
		}
		return string(out)
	}
	gmt := filepath.Base(snapPath)
	if out := smbclient("allinfo doc.txt"); !strings.Contains(out, gmt) {
		t.Fatalf("allinfo does not list the previous version %s:\n%s", gmt, out)
	}
	old := filepath.Join(dir, "old.txt")
	smbclient(fmt.Sprintf("get %s/doc.txt %s", gmt, old))
	if b, _ := os.ReadFile(old); string(b) != "version 1" {
		t.Fatalf("the previous version over SMB reads %q, want version 1", b)
	}
	cur := filepath.Join(dir, "cur.txt")
	smbclient("get doc.txt " + cur)
	if b, _ := os.ReadFile(cur); string(b) != "version 2" {
		t.Fatalf("the current version over SMB reads %q", b)
	}

	s.ok("samba", "delete", share, snapPath)
	if _, err := os.Stat(filepath.Join(snapPath, "doc.txt")); err == nil {
		t.Fatal("samba delete left the snapshot mounted")
	}
	if l := s.list(); len(l.Snapshots) != 0 {
		t.Fatalf("samba delete left snapshots: %+v", l)
	}
}

// sambaConf writes the smb.conf of a test's smbd under dir/samba: a
// standalone server on a free port of 127.0.0.1 whose state, logs and
// sockets are all in that directory, with more [global] lines and the
// share sections given. It returns the port and the file.
func sambaConf(t *testing.T, dir, globals, shares string) (port int, confFile string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	sd := filepath.Join(dir, "samba")
	var conf strings.Builder
	fmt.Fprintf(&conf, "[global]\n  server role = standalone server\n  smb ports = %d\n  interfaces = lo\n  bind interfaces only = yes\n", port)
	for _, d := range []string{"private dir", "lock directory", "state directory", "cache directory", "pid directory", "ncalrpc dir"} {
		p := filepath.Join(sd, strings.ReplaceAll(d, " ", "-"))
		os.MkdirAll(p, 0o755)
		fmt.Fprintf(&conf, "  %s = %s\n", d, p)
	}
	fmt.Fprintf(&conf, "  log file = %s/log\n  load printers = no\n  disable spoolss = yes\n%s%s", sd, globals, shares)
	confFile = filepath.Join(sd, "smb.conf")
	if err := os.WriteFile(confFile, []byte(conf.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return port, confFile
}

// startSmbd runs smbd on confFile until the test ends and waits until it
// listens on port. At the end it goes with what it started
// (samba-dcerpcd and its rpcd_* leave its process group).
func startSmbd(t *testing.T, confFile string, port int) {
	t.Helper()
	smbd := exec.Command("smbd", "--foreground", "--no-process-group", "-s", confFile)
	if err := smbd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		smbd.Process.Kill()
		smbd.Wait()
		killByArg(confFile)
	})
	testutil.WaitFor(t, "smbd listens", func() bool {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

// startShare starts a service in dir with one 64 MiB volume, "share",
// served as a FUSE file, and mounts an ext4 filesystem made on it at
// dir/share (0755) holding doc.txt ("version 1"); extra are more serve
// flags.
func startShare(t *testing.T, dir string, extra ...string) (*service, string) {
	t.Helper()
	testutil.SparseFile(t, filepath.Join(dir, "share.img"), 64<<20)
	fuseDir := filepath.Join(dir, "fuse")
	s := startService(t, dir, []string{"share"}, append([]string{"--fuse-dir", fuseDir}, extra...)...)
	file := filepath.Join(fuseDir, "share")
	waitFile(t, file, "the volume's FUSE file")
	dev := testutil.Losetup(t, file, false, true)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	share := filepath.Join(dir, "share")
	os.Mkdir(share, 0o755)
	testutil.Run(t, "mount", dev, share)
	t.Cleanup(func() {
		if exec.Command("umount", share).Run() != nil {
			exec.Command("umount", "-l", share).Run()
		}
	})
	os.Chmod(share, 0o755)
	os.WriteFile(filepath.Join(share, "doc.txt"), []byte("version 1"), 0o644)
	return s, share
}
