package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"umbra/internal/testutil"
)

// TestSambaCreateDeleteTwice: the commands Samba's vfs_shell_snap runs,
// without smbd. Two `samba create` at once (a timer and an FSRVP request
// in the same second) both succeed, under two names; each snapshot is
// mounted where create said; `samba delete` unmounts and deletes each
// (its own exposure is no user to refuse for, and it reports no one cut
// off).
func TestSambaCreateDeleteTwice(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.NeedFUSE(t)
	testutil.Need(t, "mkfs.ext4", "losetup")
	dir := t.TempDir()
	s, share := startShare(t, dir)

	paths := make([]string, 2)
	var wg sync.WaitGroup
	for i := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, code := s.umbra("samba", "create", share)
			if code != 0 {
				t.Errorf("samba create: exit %d\n%s", code, out)
			}
			paths[i] = strings.TrimSpace(out)
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if paths[0] == paths[1] {
		t.Fatalf("two samba creates printed one path %s", paths[0])
	}
	for _, p := range paths {
		if b, err := os.ReadFile(filepath.Join(p, "doc.txt")); err != nil || string(b) != "version 1" {
			t.Fatalf("the snapshot at %s: %q %v", p, b, err)
		}
	}
	for _, p := range paths {
		cmd := exec.Command(umbraBin, "--api-socket", s.api, "samba", "delete", share, p)
		out, err := cmd.CombinedOutput()
		if err != nil || len(out) != 0 {
			t.Fatalf("samba delete %s: %v\n%s", p, err, out)
		}
		if _, err := os.Stat(filepath.Join(p, "doc.txt")); err == nil {
			t.Fatalf("samba delete left %s mounted", p)
		}
	}
	if l := s.list(); len(l.Snapshots) != 0 {
		t.Fatalf("samba delete left snapshots: %+v", l)
	}
}
