package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"umbra/backup"
	"umbra/internal/testutil"
)

// imageSum is the SHA-256 of image id as the repository holds it.
func imageSum(t *testing.T, repo, id string) [32]byte {
	t.Helper()
	r, err := backup.Open(repo)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ir, err := r.OpenImage(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(ir, 0, ir.Size())); err != nil {
		t.Fatal(err)
	}
	return [32]byte(h.Sum(nil))
}

// writableMount is a running `umbra mount --writable`.
type writableMount struct {
	cmd  *exec.Cmd
	out  map[string]string // its --json output
	done chan error
}

// startWritable runs `umbra mount ID --writable --json` with args and
// waits for it to serve.
func startWritable(t *testing.T, repo, id string, args ...string) *writableMount {
	t.Helper()
	cmd := exec.Command(umbraBin, append([]string{"mount", id, "--repo", repo, "--writable", "--json"}, args...)...)
	cmd.Stderr = os.Stderr
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	m := &writableMount{cmd: cmd, done: make(chan error, 1)}
	t.Cleanup(func() { m.stop(t) })
	br := bufio.NewReader(stdout)
	err := json.NewDecoder(br).Decode(&m.out)
	go func() { io.Copy(io.Discard, br); m.done <- cmd.Wait() }()
	if err != nil || m.out["overlay"] == "" {
		t.Fatalf("umbra mount --writable --json: %v (%v)", m.out, err)
	}
	return m
}

// stop interrupts the mount and waits for it (Ctrl-C).
func (m *writableMount) stop(t *testing.T) {
	if m.cmd.ProcessState != nil || m.done == nil {
		return
	}
	m.cmd.Process.Signal(syscall.SIGINT)
	if err := <-m.done; err != nil {
		t.Errorf("umbra mount --writable after Ctrl-C: %v", err)
	}
	m.done = nil
}

// TestMountWritable: a backup image served read-write takes writes over
// NBD and through its FUSE file, reads them back, keeps them in the
// overlay file only, and at the end the overlay is gone and the
// repository is as it was (verify passes, the image reads the same).
func TestMountWritable(t *testing.T) {
	testutil.Need(t, "qemu-io")
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	data := bytes.Repeat([]byte("umbra writable mount "), 1<<20/21+1)[:1<<20]
	os.WriteFile(disk, data, 0o600)
	os.Truncate(disk, 8<<20) // and a hole
	repo, id := testutil.BackupFile(t, dir, disk, "disk")
	before := imageSum(t, repo, id)
	overlays := filepath.Join(dir, "overlays")
	sock := filepath.Join(dir, "nbd.sock")
	args := []string{"--socket", sock, "--overlay-dir", overlays}
	fuse := os.Geteuid() == 0
	if _, err := os.Stat("/dev/fuse"); err != nil {
		fuse = false
	}
	if fuse {
		args = append(args, "--dir", filepath.Join(dir, "files"))
	}
	m := startWritable(t, repo, id, args...)
	ov := m.out["overlay"]
	if filepath.Dir(ov) != overlays {
		t.Errorf("overlay %s, want it in --overlay-dir %s", ov, overlays)
	}
	uri := m.out["nbd"]
	qio := func(cmds ...string) string {
		t.Helper()
		var args []string
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		out, err := exec.Command("qemu-io", append(append([]string{"-f", "raw"}, args...), uri)...).CombinedOutput()
		if err != nil || bytes.Contains(out, []byte("failed")) || bytes.Contains(out, []byte("Pattern verification")) {
			t.Fatalf("qemu-io %v: %v\n%s", cmds, err, out)
		}
		return string(out)
	}
	// Aligned, unaligned across blocks, into the hole.
	qio("write -P 0x5a 4096 8192", "write -P 0xa5 1000 100", "write -P 0x77 6M 12345")
	qio("read -P 0x5a 4096 8192", "read -P 0xa5 1000 100", "read -P 0x77 6M 12345",
		"read -P 0 7340032 4096") // an unwritten part of the hole
	// The rest of the first block is the image's, around the write.
	out, err := exec.Command("qemu-io", "-f", "raw", "-c", "read -v 990 10", uri).CombinedOutput()
	if err != nil || !strings.Contains(string(out), strings.TrimSpace(fmt.Sprintf("% x", data[990:1000]))) {
		t.Errorf("bytes before an unaligned write:\n%s(want % x)", out, data[990:1000])
	}
	if fuse {
		f, err := os.OpenFile(m.out["file"], os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte("through FUSE"), 3<<20); err != nil {
			t.Fatal(err)
		}
		f.Close()
		out, _ := exec.Command("qemu-io", "-f", "raw", "-c", "read -v 3145728 12", uri).CombinedOutput()
		if !strings.Contains(string(out), "through.FUSE") { // qemu-io shows a space as "."
			t.Errorf("a write through the FUSE file, read over NBD:\n%s", out)
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(ov, &st); err != nil || st.Blocks == 0 || st.Size != 8<<20 {
		t.Errorf("overlay file %s: %v, %d blocks, size %d", ov, err, st.Blocks, st.Size)
	}
	if imageSum(t, repo, id) != before {
		t.Fatal("a write reached the repository")
	}

	m.stop(t)
	if _, err := os.Stat(ov); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("overlay %s after the mount stopped: %v", ov, err)
	}
	if ents, _ := os.ReadDir(overlays); len(ents) != 0 {
		t.Errorf("left in --overlay-dir: %v", ents)
	}
	if out, err := exec.Command(umbraBin, "verify", "--repo", repo).CombinedOutput(); err != nil {
		t.Fatalf("verify after a writable mount: %v\n%s", err, out)
	}
	if imageSum(t, repo, id) != before || fileSum(t, disk) != before {
		t.Fatal("the image changed")
	}

	// Bad combinations are refused before anything is served.
	for _, bad := range [][]string{
		{"mount", id, "--repo", repo, "--writable", "--fs", filepath.Join(dir, "fs")},
		{"mount", id, "--repo", repo, "--overlay-dir", overlays},
	} {
		out, err := exec.Command(umbraBin, append(bad, "--json")...).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), `"error"`) {
			t.Errorf("umbra %v: %v\n%s", bad, err, out)
		}
	}
}

// vmKernel finds the Debian kernel scripts/vmtest caches, or skips.
func vmKernel(t *testing.T) (vmlinuz, moddir string) {
	t.Helper()
	kdirs, _ := filepath.Glob("/var/cache/umbra-vmtest/linux-image-*-amd64")
	sort.Strings(kdirs)
	for i := len(kdirs) - 1; i >= 0; i-- {
		z, _ := filepath.Glob(filepath.Join(kdirs[i], "boot", "vmlinuz-*"))
		if len(z) == 0 {
			continue
		}
		kver := strings.TrimPrefix(filepath.Base(z[0]), "vmlinuz-")
		md := filepath.Join(kdirs[i], "lib", "modules", kver)
		if _, err := os.Stat(filepath.Join(md, "modules.dep")); err == nil {
			return z[0], md
		}
	}
	t.Skip("no Debian kernel in /var/cache/umbra-vmtest: run scripts/vmtest once as root (it downloads and caches linux-image-amd64)")
	return "", ""
}

// initramfs builds an initramfs that loads the modules for a virtio
// disk holding ext4, mounts /dev/vda as the root read-write and hands
// over to its /sbin/init.
func initramfs(t *testing.T, dir, moddir string) string {
	t.Helper()
	dep, err := os.ReadFile(filepath.Join(moddir, "modules.dep"))
	if err != nil {
		t.Fatal(err)
	}
	deps := map[string][]string{} // module name -> its path, then what it needs
	for _, line := range strings.Split(string(dep), "\n") {
		p, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		name := strings.TrimSuffix(filepath.Base(p), ".ko")
		deps[name] = append([]string{p}, strings.Fields(rest)...)
	}
	root := filepath.Join(dir, "initrd")
	for _, d := range []string{"bin", "lib/modules", "proc", "sys", "dev", "newroot"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	var order []string
	seen := map[string]bool{}
	var load func(name string)
	load = func(name string) {
		if seen[name] {
			return
		}
		seen[name] = true
		d, ok := deps[name]
		if !ok {
			t.Skipf("kernel module %s not in %s", name, moddir)
		}
		for i := len(d) - 1; i >= 1; i-- {
			load(strings.TrimSuffix(filepath.Base(d[i]), ".ko"))
		}
		order = append(order, d[0])
	}
	for _, m := range []string{"virtio_pci", "virtio_blk", "crc32c_generic", "ext4"} {
		load(m)
	}
	var list []string
	for _, p := range order {
		b, err := os.ReadFile(filepath.Join(moddir, p))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(root, "lib/modules", filepath.Base(p)), b, 0o644)
		list = append(list, "/lib/modules/"+filepath.Base(p))
	}
	os.WriteFile(filepath.Join(root, "modules"), []byte(strings.Join(list, "\n")+"\n"), 0o644)
	copyFile(t, "/bin/busybox", filepath.Join(root, "bin/busybox"), 0o755)
	for _, a := range []string{"sh", "mount", "insmod", "switch_root", "sleep", "cat", "echo", "poweroff"} {
		os.Symlink("busybox", filepath.Join(root, "bin", a))
	}
	os.WriteFile(filepath.Join(root, "init"), []byte(`#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules); do insmod "$m" || echo "initramfs: insmod $m failed"; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 120 ]; do sleep 1; n=$((n+1)); done
if mount -t ext4 -o rw /dev/vda /newroot; then
  exec switch_root /newroot /sbin/init
fi
echo "initramfs: cannot mount /dev/vda"
poweroff -f
`), 0o755)
	out := filepath.Join(dir, "initrd.cpio")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cpio := exec.Command("sh", "-c", "find . | /bin/busybox cpio -o -H newc")
	var stderr bytes.Buffer
	cpio.Dir, cpio.Stdout, cpio.Stderr = root, f, &stderr
	if err := cpio.Run(); err != nil {
		t.Fatalf("cpio: %v %s", err, stderr.Bytes())
	}
	return out
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, mode); err != nil {
		t.Fatal(err)
	}
}

// TestVirtualBoot boots a backup image in qemu from the NBD export of
// `umbra mount --writable`: a small ext4 root whose init (static
// busybox) writes a file and powers off. The console shows it booted,
// the file is in what the export serves, and the repository does not
// have it.
func TestVirtualBoot(t *testing.T) {
	testutil.Need(t, "qemu-system-x86_64", "mkfs.ext4", "debugfs", "qemu-img")
	if out, err := exec.Command("ldd", "/bin/busybox").CombinedOutput(); err == nil || !bytes.Contains(out, []byte("not a dynamic")) {
		t.Skip("needs a static /bin/busybox (apt-get install busybox-static)")
	}
	vmlinuz, moddir := vmKernel(t)
	dir := t.TempDir()

	// The disk: an ext4 root with busybox and an init that leaves a mark.
	rootfs := filepath.Join(dir, "rootfs")
	for _, d := range []string{"bin", "sbin", "proc", "sys", "dev"} {
		os.MkdirAll(filepath.Join(rootfs, d), 0o755)
	}
	copyFile(t, "/bin/busybox", filepath.Join(rootfs, "bin/busybox"), 0o755)
	const marker = "UMBRA-VIRTUALBOOT-OK"
	os.WriteFile(filepath.Join(rootfs, "sbin/init"), []byte(`#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "written by the guest" > /booted
/bin/busybox sync
echo "`+marker+`: $(/bin/busybox uname -r), root $(/bin/busybox awk '$2 == "/" {print $1, $4}' /proc/mounts)"
/bin/busybox poweroff -f
`), 0o755)
	disk := filepath.Join(dir, "disk.img")
	testutil.Run(t, "mkfs.ext4", "-q", "-d", rootfs, disk, "32M")
	repo, id := testutil.BackupFile(t, dir, disk, "disk")
	before := imageSum(t, repo, id)
	initrd := initramfs(t, dir, moddir)

	sock := filepath.Join(dir, "nbd.sock")
	m := startWritable(t, repo, id, "--socket", sock, "--overlay-dir", filepath.Join(dir, "overlay"))

	// The VirtualBoot command of the README, under TCG.
	console := filepath.Join(dir, "console.log")
	// A hang guard only (TCG boots in seconds when idle): tied to the
	// package's deadline it killed qemu at once when earlier tests had
	// used the time on a loaded machine.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "512M", "-smp", "1",
		"-display", "none", "-vga", "none", "-monitor", "none", "-parallel", "none", "-no-reboot",
		"-serial", "file:"+console,
		"-kernel", vmlinuz, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet",
		"-drive", "file=nbd:unix:"+sock+":exportname="+id+",format=raw,if=virtio,cache=writeback")
	out, err := qemu.CombinedOutput()
	log, _ := os.ReadFile(console)
	if err != nil || !bytes.Contains(log, []byte(marker)) {
		t.Fatalf("qemu: %v\n%s\nconsole:\n%s", err, out, log)
	}
	t.Logf("console: %s", grepLine(log, marker))

	// The guest's write is in what the export serves...
	served := filepath.Join(dir, "served.img")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", m.out["nbd"], served)
	if got := testutil.Run(t, "debugfs", "-R", "cat /booted", served); !strings.Contains(got, "written by the guest") {
		t.Errorf("/booted in the served image: %q", got)
	}
	// ...in the overlay, not in the repository.
	if imageSum(t, repo, id) != before {
		t.Fatal("the guest's writes reached the repository")
	}
	ov := m.out["overlay"]
	m.stop(t)
	if _, err := os.Stat(ov); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("overlay %s after the mount stopped: %v", ov, err)
	}
	restored := filepath.Join(dir, "restored.img")
	testutil.Run(t, umbraBin, "restore", id, "--repo", repo, "--to", restored)
	if got, _ := exec.Command("debugfs", "-R", "cat /booted", restored).CombinedOutput(); strings.Contains(string(got), "written by the guest") {
		t.Error("the image in the repository has the guest's file")
	}
	if out, err := exec.Command(umbraBin, "verify", "--repo", repo).CombinedOutput(); err != nil {
		t.Fatalf("verify after booting the image: %v\n%s", err, out)
	}
}

func grepLine(b []byte, s string) string {
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, s) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}
