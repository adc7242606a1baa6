package frontend

import (
	"net"
	"sort"
	"sync"

	"golang.org/x/sys/unix"
)

// Clients records which processes hold NBD connections to which exports:
// the pid that connected each unix-socket client (SO_PEERCRED). The
// service uses it to find the kernel nbd devices that are its clients
// (writer.NBDDevices), whose filesystems the writers must freeze. Give
// Attached to nbd.Options.
type Clients struct {
	mu    sync.Mutex           // guards conns
	conns map[*attachment]bool // live connections that serve an export
}

type attachment struct {
	pid    int
	export string
}

// Attached records that nc serves export until the returned function runs.
// Connections whose peer is not a local process (TCP) are not recorded.
func (c *Clients) Attached(nc net.Conn, export string) func() {
	pid := peerPID(nc)
	if pid <= 0 {
		return func() {}
	}
	a := &attachment{pid: pid, export: export}
	c.mu.Lock()
	if c.conns == nil {
		c.conns = map[*attachment]bool{}
	}
	c.conns[a] = true
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		delete(c.conns, a)
		c.mu.Unlock()
	}
}

// PIDs returns the processes connected to export, sorted.
func (c *Clients) PIDs(export string) []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []int
	for a := range c.conns {
		if a.export == export {
			out = append(out, a.pid)
		}
	}
	sort.Ints(out)
	return out
}

// peerPID is the pid that connected a unix socket, 0 for anything else.
func peerPID(nc net.Conn) int {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return 0
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0
	}
	pid := 0
	raw.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
	})
	return pid
}
