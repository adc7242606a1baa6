package testutil

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Leftovers lists what a test suite whose temporary files are all under
// root left behind: loop devices backed by a file under root, mounts on a
// directory under root, and processes (other than this one) with root in
// their command line. Only what names root is considered: other suites
// running on the machine at the same time are not this one's to judge.
func Leftovers(root string) []string {
	root = filepath.Clean(root) + "/"
	var out []string
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range loops {
		b, err := os.ReadFile(bf)
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), root) {
			dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(bf)))
			out = append(out, fmt.Sprintf("loop device %s over %s", dev, strings.TrimSpace(string(b))))
		}
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 {
				if dir := strings.ReplaceAll(f[4], `\040`, " "); strings.HasPrefix(dir+"/", root) {
					out = append(out, "mount on "+dir)
				}
			}
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(root)) {
			out = append(out, fmt.Sprintf("process %d: %s", pid, strings.Join(strings.Split(strings.TrimRight(string(b), "\x00"), "\x00"), " ")))
		}
	}
	return out
}

// CleanLeftovers undoes what Leftovers lists under root, in the order
// that lets each step work: processes killed, mounts lazily unmounted
// (deepest first), loop devices detached.
func CleanLeftovers(root string) {
	root = filepath.Clean(root) + "/"
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if b, err := os.ReadFile(p); err == nil && pid != os.Getpid() && bytes.Contains(b, []byte(root)) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		lines := strings.Split(string(b), "\n")
		for i := len(lines) - 1; i >= 0; i-- {
			f := strings.Fields(lines[i])
			if len(f) > 4 {
				if dir := strings.ReplaceAll(f[4], `\040`, " "); strings.HasPrefix(dir+"/", root) {
					exec.Command("umount", "-l", dir).Run()
				}
			}
		}
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range loops {
		if b, err := os.ReadFile(bf); err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), root) {
			exec.Command("losetup", "-d", "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(bf)))).Run()
		}
	}
}
