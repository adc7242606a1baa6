package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"umbra/internal/testutil"
)

// The backup operator of TestFSRVPAsBackupUser and its group: fixed
// names, made when missing and reused by later runs.
const (
	fsrvpUser  = "umbra-backup-test"
	fsrvpGroup = "umbra-fsrvp-test"
)

// TestFSRVPAsBackupUser: a Windows backup operator who is not root
// drives FSRVP through a real smbd, whose vfs_shell_snap runs `umbra
// samba create/delete` as that user. Outside the service's
// --api-socket-group the user is refused (umbra exits 5) and so is the
// FSRVP request; once in the group,
// rpcclient's fss_create_expose takes and exposes a snapshot of the
// share, which shows the content of when it was taken, and fss_delete
// removes it, both audited as that uid with the operator role.
func TestFSRVPAsBackupUser(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "smbd", "rpcclient", "smbpasswd", "net", "useradd", "groupadd", "gpasswd", "runuser", "mkfs.ext4", "losetup")
	testutil.NeedFUSE(t)
	if _, err := user.LookupGroup(fsrvpGroup); err != nil {
		testutil.Run(t, "groupadd", fsrvpGroup)
	}
	if _, err := user.Lookup(fsrvpUser); err != nil {
		testutil.Run(t, "useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", fsrvpUser)
	}
	u, _ := user.Lookup(fsrvpUser)
	exec.Command("gpasswd", "-d", fsrvpUser, fsrvpGroup).Run() // a previous run may have left it in
	t.Cleanup(func() { exec.Command("gpasswd", "-d", fsrvpUser, fsrvpGroup).Run() })

	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755) // the user walks to the binary and the API socket
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "umbra")
	testutil.Run(t, "cp", umbraBin, bin)
	os.Chmod(bin, 0o755)
	s, share := startShare(t, dir, "--api-socket-group", fsrvpGroup)

	// smbd on a free port, its state (passdb, registry, FSRVP state) in
	// the test directory; FSRVP needs registry shares.
	umbraCmd := bin + " --api-socket " + s.api + " samba"
	port, confFile := sambaConf(t, dir, "  registry shares = yes\n  include = registry\n",
		fmt.Sprintf("[share]\n  path = %s\n  read only = no\n  vfs objects = shadow_copy2 shell_snap\n"+
			"  shadow:snapdir = .snapshots\n  shadow:format = @GMT-%%Y.%%m.%%d-%%H.%%M.%%S\n  shadow:sort = desc\n"+
			"  shell_snap:check path command = %s check\n  shell_snap:create command = %s create\n  shell_snap:delete command = %s delete\n",
			share, umbraCmd, umbraCmd, umbraCmd))
	smbpasswd := exec.Command("smbpasswd", "-c", confFile, "-s", "-a", fsrvpUser)
	smbpasswd.Stdin = strings.NewReader("pw\npw\n")
	if out, err := smbpasswd.CombinedOutput(); err != nil {
		t.Fatalf("smbpasswd: %v\n%s", err, out)
	}
	// Samba's FSRVP server serves backup operators (SeBackupPrivilege).
	testutil.Run(t, "net", "-s", confFile, "sam", "rights", "grant", fsrvpUser, "SeBackupPrivilege")
	startSmbd(t, confFile, port)
	rpc := func(cmd string) (string, error) {
		out, err := exec.Command("rpcclient", "-p", fmt.Sprint(port), "ncacn_np:127.0.0.1", "-s", confFile, "-U", fsrvpUser+"%pw", "-c", cmd).CombinedOutput()
		return string(out), err
	}
	audit := func() string {
		b, _ := os.ReadFile(filepath.Join(dir, "state", "audit.log"))
		return string(b)
	}

	// Outside the group: the socket (0660, the group's) refuses the
	// connection, and umbra exits 5 naming the way in.
	if out, err := exec.Command("runuser", "-u", fsrvpUser, "--", bin, "--api-socket", s.api, "samba", "create", share).CombinedOutput(); exitOf(err) != 5 || !strings.Contains(string(out), "--api-socket-group") {
		t.Fatalf("samba create as %s outside %s: exit %d, want 5\n%s", fsrvpUser, fsrvpGroup, exitOf(err), out)
	}
	if out, err := rpc("fss_create_expose backup ro share"); err == nil && !strings.Contains(out, "failed") || strings.Contains(out, "exposed as a snapshot") {
		t.Fatalf("fss_create_expose outside %s succeeded:\n%s", fsrvpGroup, out)
	}
	if l := s.list(); len(l.Snapshots) != 0 {
		t.Fatalf("a refused FSRVP request left snapshots: %+v", l)
	}

	// In the group: FSRVP creates, exposes and deletes.
	testutil.Run(t, "gpasswd", "-a", fsrvpUser, fsrvpGroup)
	out, err := rpc("fss_create_expose backup ro share")
	if err != nil || !strings.Contains(out, "exposed as a snapshot") {
		t.Fatalf("fss_create_expose as %s in %s: %v\n%s\naudit:\n%s", fsrvpUser, fsrvpGroup, err, out, audit())
	}
	os.WriteFile(filepath.Join(share, "doc.txt"), []byte("version 2"), 0o644)
	l := s.list()
	if len(l.Snapshots) != 1 || !strings.HasPrefix(l.Snapshots[0].ID, "GMT-") {
		t.Fatalf("snapshots after fss_create_expose: %+v", l)
	}
	snapDir := filepath.Join(share, ".snapshots", "@"+l.Snapshots[0].ID)
	if b, err := os.ReadFile(filepath.Join(snapDir, "doc.txt")); err != nil || string(b) != "version 1" {
		t.Fatalf("the FSRVP snapshot at %s: %q %v", snapDir, b, err)
	}
	who := `"who":"unix:uid=` + u.Uid + ` group=` + fsrvpGroup + `","role":"operator","method":"/umbra.v1.Umbra/`
	if a := audit(); !strings.Contains(a, who+`CreateSnapshotSet"`) || !strings.Contains(a, who+`ExposeSnapshot"`) {
		t.Fatalf("the audit log does not name %s (uid %s) as the operator who created:\n%s", fsrvpUser, u.Uid, a)
	}
	m := regexp.MustCompile(`([0-9a-f-]{36})\(([0-9a-f-]{36})\): share`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no set and shadow copy ids in:\n%s", out)
	}
	if out, err := rpc(fmt.Sprintf("fss_delete share %s %s", m[1], m[2])); err != nil {
		t.Fatalf("fss_delete: %v\n%s\naudit:\n%s", err, out, audit())
	}
	if _, err := os.Stat(filepath.Join(snapDir, "doc.txt")); err == nil {
		t.Fatal("fss_delete left the snapshot mounted")
	}
	if l := s.list(); len(l.Snapshots) != 0 {
		t.Fatalf("fss_delete left snapshots: %+v", l)
	}
	if a := audit(); !strings.Contains(a, who+`DeleteSnapshots","request":{"volume":"share","id":"`+l.Snapshots[0].ID) {
		t.Fatalf("the audit log does not name %s (uid %s) as the operator who deleted:\n%s", fsrvpUser, u.Uid, a)
	}
}

// exitOf is a finished command's exit code (0 for nil, -1 if it did
// not run).
func exitOf(err error) int {
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}

// killByArg kills the processes one of whose arguments mentions arg
// (the test's private smb.conf), each by its pid.
func killByArg(arg string) {
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range cmdlines {
		b, err := os.ReadFile(f)
		if err != nil || !strings.Contains(string(b), arg) {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(filepath.Base(filepath.Dir(f)), "%d", &pid); err == nil && pid != os.Getpid() {
			if p, err := os.FindProcess(pid); err == nil {
				p.Kill()
			}
		}
	}
}
