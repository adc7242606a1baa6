package owner

import (
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// SocketFree refuses a unix socket path that a running process answers
// on: a server that replaces the socket file would take it from that
// process. A socket file nobody listens on (left by a killed process) is
// free. The holder's pid is the listener's, from SO_PEERCRED; flag is
// the option that chooses another path, for the hint.
func SocketFree(path, what, flag string) error {
	c, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		return nil
	}
	defer c.Close()
	pid := 0
	if uc, ok := c.(*net.UnixConn); ok {
		if raw, err := uc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
					pid = int(cred.Pid)
				}
			})
		}
	}
	return Held(what, path, pid, fmt.Sprintf("another service listens there: use it, or stop it first, or give this one another %s", flag))
}
