package coordinator

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"umbra/frontend"
	"umbra/internal/testutil"
	"umbra/nbd"
	"umbra/provider"
	"umbra/writer"
	"umbra/writer/fsfreeze"
)

// TestWritersFindNBDDevices: a filesystem mounted from a kernel nbd device
// connected to the volume's export is frozen by the fsfreeze writer, and
// a set with writers in which no writer would freeze it is refused by
// name. Everything is real (NBD server, a client process on the unix
// socket, SO_PEERCRED, ext4 on a loop device, FIFREEZE) except the device
// lookup: this machine has no nbd module, so /sys/block and the mount
// table say that /dev/nbd0 is the client's device and is mounted where the
// ext4 is (writer.SysBlock, writer.MountInfo). scripts/vmtest runs the
// kernel's nbd path.
func TestWritersFindNBDDevices(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.ext4", "qemu-io")
	dir := t.TempDir()
	v, p := cowVolume(t, dir, "vol", 16<<20)
	clients := &frontend.Clients{}
	sock := filepath.Join(dir, "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(frontend.NBDExports(p, nil), nbd.Options{Attached: clients.Attached})
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Shutdown(context.Background()) })

	// The client: a process that keeps a connection to the export.
	// qemu-io reads its commands from stdin until it ends; the answer to
	// the first says the connection is up.
	client := exec.Command("qemu-io", "-f", "raw", "nbd+unix:///vol?socket="+sock)
	stdin, _ := client.StdinPipe()
	stdout, _ := client.StdoutPipe()
	client.Stderr = os.Stderr
	if err := client.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); client.Wait() })
	fmt.Fprintln(stdin, "read 0 512")
	if line, _ := bufio.NewReader(stdout).ReadString('\n'); !strings.Contains(line, "read 512/512 bytes") {
		t.Fatalf("qemu-io said %q", line)
	}
	if pids := clients.PIDs("vol"); !slices.Equal(pids, []int{client.Process.Pid}) {
		t.Fatalf("clients of vol %v, want nbdsh's pid %d", pids, client.Process.Pid)
	}

	// A real ext4 to freeze, which the faked lookup says is on /dev/nbd0.
	img := filepath.Join(dir, "fs.img")
	testutil.SparseFile(t, img, 64<<20)
	dev := testutil.Losetup(t, img, false, false)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := testutil.Mount(t, dev, dir)
	sys := filepath.Join(dir, "sys-block")
	for name, pid := range map[string]int{"nbd0": client.Process.Pid, "nbd1": 1} {
		os.MkdirAll(filepath.Join(sys, name), 0o755)
		os.WriteFile(filepath.Join(sys, name, "pid"), []byte(strconv.Itoa(pid)+"\n"), 0o644)
	}
	mountinfo := filepath.Join(dir, "mountinfo")
	os.WriteFile(mountinfo, []byte(fmt.Sprintf("36 25 43:0 / %s rw,relatime shared:1 - ext4 /dev/nbd0 rw\n37 25 43:1 / /elsewhere rw - ext4 /dev/nbd1 rw\n", mnt)), 0o644)
	oldSys, oldMI := writer.SysBlock, writer.MountInfo
	writer.SysBlock, writer.MountInfo = sys, mountinfo
	t.Cleanup(func() { writer.SysBlock, writer.MountInfo = oldSys, oldMI })

	devices := func(vol string) []string { return writer.NBDDevices(clients.PIDs(vol)) }
	reg := &provider.Registry{}
	reg.Register(p)
	ff := fsfreeze.New()
	ws := writer.NewRegistry()
	ws.Add(ff)
	c := New(reg, ws, devices, nil)
	set, err := c.CreateSet(context.Background(), Request{Volumes: []string{"vol"}, Writers: true})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(set.Writers, ff.Name()) {
		t.Fatalf("set's writers %v: the filesystem on the nbd device was not frozen", set.Writers)
	}
	if h := ws.States(); len(h) != 1 || len(h[0].History) == 0 {
		t.Fatalf("fsfreeze history: %+v", h)
	}
	set.Done()

	// Without a writer that freezes filesystems, the set is refused by name.
	bare := New(reg, writer.NewRegistry(), devices, nil)
	_, err = bare.CreateSet(context.Background(), Request{Volumes: []string{"vol"}, Writers: true})
	if err == nil || !strings.Contains(err.Error(), "volume vol holds mounted filesystems "+mnt) {
		t.Fatalf("set with writers and an unfrozen filesystem: %v, want it refused naming vol and %s", err, mnt)
	}
	if n := len(v.Snapshots()); n != 1 {
		t.Fatalf("%d snapshots after the refused set, want 1", n)
	}
	// Without writers the same set is crash-consistent by request.
	if _, err := bare.CreateSet(context.Background(), Request{Volumes: []string{"vol"}}); err != nil {
		t.Fatal(err)
	}

	// The client gone, its device is no longer the volume's.
	stdin.Close()
	client.Wait()
	waitNoClients(t, clients)
	if d := devices("vol"); d != nil {
		t.Fatalf("devices of vol after its client left: %v", d)
	}
}

// waitNoClients waits until the server has seen the client go (its
// connection's end is read by the server's own goroutine).
func waitNoClients(t *testing.T, c *frontend.Clients) {
	t.Helper()
	testutil.WaitFor(t, "the server lets the closed connection go", func() bool { return len(c.PIDs("vol")) == 0 })
}
