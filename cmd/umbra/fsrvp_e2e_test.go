package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"umbra/internal/testutil"
)

type setJSON struct {
	ID           string `json:"id"`
	State        string `json:"state"`
	ShadowCopies []struct {
		ID       string `json:"id"`
		Snapshot string `json:"snapshot"`
		Mapping  struct {
			MountDir  string `json:"mount_dir"`
			NbdExport string `json:"nbd_export"`
		} `json:"mapping"`
	} `json:"shadow_copies"`
}

func (s *service) set(args ...string) setJSON {
	s.t.Helper()
	var st setJSON
	out := s.ok(append([]string{"set"}, append(args, "--json")...)...)
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		s.t.Fatalf("set %v: %v\n%s", args, err, out)
	}
	return st
}

// TestFSRVPSequence: the whole FSRVP sequence through the CLI on a live
// ext4 volume — start, add (by share path), prepare, commit, expose,
// recovery-complete — the exposed directory shows the old file; the
// exposure survives a clean restart and a kill -9; deleting the share
// mapping unmounts and deletes the shadow copy. Then the abort and
// timeout paths, and calls in the wrong state.
func TestFSRVPSequence(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "mkfs.ext4", "losetup", "blkid")
	testutil.NeedFUSE(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	testutil.SparseFile(t, img, 64<<20)
	fuseDir := filepath.Join(dir, "fuse")
	s := startService(t, dir, []string{"fs"}, "--fuse-dir", fuseDir)
	defer exec.Command("umount", "-l", fuseDir).Run()
	file := filepath.Join(fuseDir, "fs")
	waitFile(t, file, "the volume's FUSE file")
	dev, detach := testutil.Attach(t, file, false, true)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := filepath.Join(dir, "share")
	os.Mkdir(mnt, 0o755)
	testutil.Run(t, "mount", dev, mnt)
	unmountLive := func() {
		exec.Command("umount", mnt).Run()
		detach()
	}
	defer unmountLive()
	os.WriteFile(filepath.Join(mnt, "doc.txt"), []byte("version 1"), 0o644)

	if out := s.ok("set", "path-supported", mnt); !strings.Contains(out, "volume fs") {
		t.Fatalf("path-supported: %s", out)
	}
	if _, code := s.umbra("set", "path-supported", "/etc"); code != 3 {
		t.Fatalf("path-supported /etc: exit %d, want 3", code)
	}
	st := s.set("start", "--context", "nas_rollback")
	if st.State != "started" {
		t.Fatalf("start: %+v", st)
	}
	if out, code := s.umbra("set", "commit", st.ID); code == 0 || !strings.Contains(out, "needs it creation_in_progress") {
		t.Fatalf("commit of a started set: exit %d %s", code, out)
	}
	s.ok("set", "add", st.ID, mnt)
	if out, code := s.umbra("set", "add", st.ID, "fs"); code == 0 || !strings.Contains(out, "already") {
		t.Fatalf("adding a volume twice: exit %d %s", code, out)
	}
	s.set("prepare", st.ID)
	st = s.set("commit", st.ID)
	if st.State != "committed" || st.ShadowCopies[0].Snapshot == "" {
		t.Fatalf("commit: %+v", st)
	}
	os.WriteFile(filepath.Join(mnt, "doc.txt"), []byte("version 2"), 0o644)
	st = s.set("expose", st.ID)
	mdir := st.ShadowCopies[0].Mapping.MountDir
	if b, err := os.ReadFile(filepath.Join(mdir, "doc.txt")); err != nil || string(b) != "version 1" {
		t.Fatalf("exposed shadow copy at %q: %q %v", mdir, b, err)
	}
	st = s.set("recovery-complete", st.ID)
	if st.State != "recovered" {
		t.Fatalf("recovery-complete: %+v", st)
	}

	// Restarts: clean, then kill -9. The live filesystem goes first (its
	// loop device hangs on the FUSE file); the exposure comes back.
	for _, crash := range []bool{false, true} {
		unmountLive()
		exposureLoops := loopsOver(t, fuseDir)
		if len(exposureLoops) == 0 {
			t.Fatalf("no loop device over the exposure's FUSE file before the restart (crash=%v)", crash)
		}
		if crash {
			s.kill9()
		} else {
			s.stop()
		}
		s.start()
		waitFile(t, file, "the volume's FUSE file after restart")
		var l struct {
			Mappings []struct {
				MountDir string `json:"mount_dir"`
				Snapshot string `json:"snapshot"`
			} `json:"mappings"`
		}
		json.Unmarshal([]byte(s.ok("shares", "list", "--json")), &l)
		if len(l.Mappings) != 1 || l.Mappings[0].MountDir == "" {
			t.Fatalf("share mappings after restart (crash=%v): %+v", crash, l)
		}
		if b, err := os.ReadFile(filepath.Join(l.Mappings[0].MountDir, "doc.txt")); err != nil || string(b) != "version 1" {
			t.Fatalf("exposure after restart (crash=%v): %q %v", crash, b, err)
		}
		var sets struct {
			Sets []setJSON `json:"sets"`
		}
		json.Unmarshal([]byte(s.ok("set", "list", "--json")), &sets)
		if len(sets.Sets) != 1 || sets.Sets[0].State != "recovered" {
			t.Fatalf("sets after restart (crash=%v): %+v", crash, sets)
		}
		// The loop devices of the previous run's exposure are gone (or
		// carry a live file again): none is left over the dead FUSE file.
		for dev, name := range exposureLoops {
			b, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
			if bf := strings.TrimSpace(string(b)); bf == "/"+name || bf == "/"+name+" (deleted)" {
				t.Fatalf("after the restart (crash=%v), %s still hangs on the previous run's FUSE file %s", crash, dev, name)
			}
		}
		dev, detach = testutil.Attach(t, file, false, true)
		testutil.Run(t, "mount", dev, mnt)
	}
	s.ok("shares", "delete", st.ID, st.ShadowCopies[0].ID)
	if _, err := os.Stat(filepath.Join(mdir, "doc.txt")); err == nil {
		t.Fatal("the exposure is still mounted after its share mapping was deleted")
	}
	if l := s.list(); len(l.Snapshots) != 0 {
		t.Fatalf("snapshots after the share mapping was deleted: %+v", l)
	}

	// Abort after commit: the shadow copy is deleted.
	a := s.set("start")
	s.ok("set", "add", a.ID, "fs")
	s.set("prepare", a.ID)
	s.set("commit", a.ID, "--no-writers")
	if a = s.set("abort", a.ID); a.State != "aborted" || len(s.list().Snapshots) != 0 {
		t.Fatalf("abort after commit: %+v, snapshots %+v", a, s.list())
	}
	// A set that stops moving is aborted when its timer runs out, even
	// after commit and expose.
	// The timer runs per state: each step must follow within 3 s, and
	// after expose nothing comes.
	b := s.set("start", "--timeout", "3s")
	s.ok("set", "add", b.ID, mnt)
	s.set("prepare", b.ID)
	s.set("commit", b.ID)
	b = s.set("expose", b.ID)
	bdir := b.ShadowCopies[0].Mapping.MountDir
	// Wait for the timer, however late it runs: the set leaves the
	// exposed state by itself.
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var sets struct {
			Sets []setJSON `json:"sets"`
		}
		json.Unmarshal([]byte(s.ok("set", "list", "--json")), &sets)
		exposed := false
		for _, x := range sets.Sets {
			exposed = exposed || x.ID == b.ID && x.State == "exposed"
		}
		if !exposed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("set %s still exposed 60 s after its 3 s timer: %+v", b.ID, sets)
		}
	}
	if out, code := s.umbra("set", "recovery-complete", b.ID); code != 3 || !strings.Contains(out, "timed out") && !strings.Contains(out, "not found") {
		t.Fatalf("recovery-complete after the timeout: exit %d %s", code, out)
	}
	if len(s.list().Snapshots) != 0 {
		t.Fatalf("a timed-out set left snapshots: %+v", s.list())
	}
	if _, err := os.Stat(filepath.Join(bdir, "doc.txt")); err == nil {
		t.Fatal("a timed-out set left its exposure mounted")
	}
	if out := s.ok("shares", "list"); strings.TrimSpace(out) != "" {
		t.Fatalf("share mappings left: %s", out)
	}

	// diskshadow expose / unexpose of any shadow copy.
	s.ok("snapshot", "create", "fs", "--writers", "--id", "manual")
	os.WriteFile(filepath.Join(mnt, "doc.txt"), []byte("version 3"), 0o644)
	edir := filepath.Join(dir, "manual")
	var m struct {
		MountDir string `json:"mount_dir"`
		Fstype   string `json:"fstype"`
	}
	json.Unmarshal([]byte(s.ok("snapshot", "expose", "fs", "manual", "--dir", edir, "--json")), &m)
	if b, err := os.ReadFile(filepath.Join(edir, "doc.txt")); m.MountDir != edir || m.Fstype != "ext4" || err != nil || string(b) != "version 2" {
		t.Fatalf("snapshot expose: %+v %q %v", m, b, err)
	}
	if out, code := s.umbra("snapshot", "expose", "fs", "manual"); code == 0 || !strings.Contains(out, "exposed already") {
		t.Fatalf("exposing twice: exit %d %s", code, out)
	}
	// An exposed snapshot is in use: deleting it is refused, naming the
	// exposure, and the exposure stays; --force unexposes it first.
	if out, code := s.umbra("snapshot", "delete", "fs", "manual"); code == 0 || !strings.Contains(out, "exposed at "+edir) {
		t.Fatalf("delete of an exposed snapshot: exit %d %s", code, out)
	}
	if b, err := os.ReadFile(filepath.Join(edir, "doc.txt")); err != nil || string(b) != "version 2" {
		t.Fatalf("a refused delete cut the exposure off: %q %v", b, err)
	}
	if out := s.ok("snapshot", "delete", "fs", "manual", "--force"); !strings.Contains(out, "cut off fs@manual: exposed at "+edir) {
		t.Fatalf("the forced delete does not say what it cut off:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(edir, "doc.txt")); err == nil {
		t.Fatal("deleting an exposed snapshot left it mounted")
	}
	if _, code := s.umbra("snapshot", "unexpose", "fs", "manual"); code != 3 {
		t.Fatalf("unexpose of what is not exposed: exit %d, want 3", code)
	}
}

// loopsOver maps the loop devices whose backing file is in dir to that
// file's name.
func loopsOver(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range loops {
		b, err := os.ReadFile(bf)
		if p := strings.TrimSpace(string(b)); err == nil && filepath.Dir(p) == dir {
			out["/dev/"+filepath.Base(filepath.Dir(filepath.Dir(bf)))] = filepath.Base(p)
		}
	}
	return out
}
