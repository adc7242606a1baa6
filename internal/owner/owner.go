// Package owner makes a file or directory the property of one process at
// a time (DESIGN invariant 10, "one owner"): a volume file, a shadow
// storage directory, a state directory. Two services writing one volume
// file, or one diff area, change each other's snapshots silently; the
// second opener must be refused, and told who holds the file.
//
// A claim is an exclusive flock(2) on an open file description, taken
// without waiting. flock rather than an OFD lock (fcntl F_OFD_SETLK):
// both belong to the open file description (so a second open in the same
// process conflicts too, as it should: a volume opened twice is as wrong
// as two services), but /proc/locks names the pid of a flock's holder
// and shows -1 for OFD locks, and the holder is what the refused user
// needs to know. flock and fcntl locks are independent on Linux, so
// programs that lock byte ranges of an image (qemu) are not disturbed.
//
// The lock is advisory: it keeps out every Umbra process (and any program
// that takes flock), not a program that ignores locks. It goes with the
// descriptor, so a killed holder frees it at once.
package owner

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrHeld is what a HeldError matches with errors.Is.
var ErrHeld = errors.New("in use by another process")

// HeldError says that another open file description holds the claim.
type HeldError struct {
	What string // "volume file", "shadow storage directory", ...
	Path string
	PID  int    // the holder, 0 when it cannot be known
	Comm string // the holder's command line, "" when unknown
	Hint string // what the refused user can do
}

func (e *HeldError) Error() string {
	holder := "another process"
	switch {
	case e.PID > 0 && e.PID == os.Getpid():
		holder = fmt.Sprintf("this process (pid %d)", e.PID)
	case e.PID > 0 && e.Comm != "":
		holder = fmt.Sprintf("pid %d (%s)", e.PID, e.Comm)
	case e.PID > 0:
		holder = fmt.Sprintf("pid %d", e.PID)
	}
	msg := fmt.Sprintf("%s %s is in use by %s: one process at a time may own it", e.What, e.Path, holder)
	if e.Hint != "" {
		msg += "; " + e.Hint
	}
	return msg
}

func (e *HeldError) Is(target error) bool { return target == ErrHeld }

// Claim takes the claim on f, open at path, or returns a *HeldError when
// another open file description has it. The claim lasts until f is closed.
func Claim(f *os.File, what, path, hint string) error {
	err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.EWOULDBLOCK) {
		pid := 0
		var st unix.Stat_t
		if unix.Fstat(int(f.Fd()), &st) == nil {
			pid = holder(procLocks, st.Dev, st.Ino)
		}
		return Held(what, path, pid, hint)
	}
	return fmt.Errorf("lock %s %s: %w", what, path, err)
}

// procLocks is where the kernel lists the locks held; a variable for tests.
var procLocks = "/proc/locks"

// holder finds the pid of the FLOCK write lock on (dev, ino) in the
// locks file, 0 if none. Where the device does not match (btrfs reports
// a subvolume's own device to stat but its filesystem's in /proc/locks),
// the inode alone decides when it is unambiguous.
func holder(locksFile string, dev, ino uint64) int {
	f, err := os.Open(locksFile)
	if err != nil {
		return 0
	}
	defer f.Close()
	maj, mnr := unix.Major(dev), unix.Minor(dev)
	var byIno []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// "1: FLOCK  ADVISORY  WRITE 10095 fe:00:9979361 0 EOF"; a lock
		// waited for has "->" after the number.
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[1] == "->" {
			continue
		}
		if len(fields) < 6 || fields[1] != "FLOCK" || fields[3] != "WRITE" {
			continue
		}
		pid, err := strconv.Atoi(fields[4])
		if err != nil || pid <= 0 {
			continue
		}
		parts := strings.Split(fields[5], ":")
		if len(parts) != 3 {
			continue
		}
		i, err := strconv.ParseUint(parts[2], 10, 64)
		if err != nil || i != ino {
			continue
		}
		lmaj, err1 := strconv.ParseUint(parts[0], 16, 32)
		lmnr, err2 := strconv.ParseUint(parts[1], 16, 32)
		if err1 == nil && err2 == nil && uint32(lmaj) == maj && uint32(lmnr) == mnr {
			return pid
		}
		byIno = append(byIno, pid)
	}
	if len(byIno) == 1 {
		return byIno[0]
	}
	return 0
}

// command is pid's command line, "" when it cannot be read.
func command(pid int) string {
	if pid <= 0 {
		return ""
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return ""
	}
	s := strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
	if len(s) > 120 {
		s = s[:120] + "…"
	}
	return s
}

// Dir is a claimed directory; Release gives it up.
type Dir struct {
	key      dirKey
	path     string
	released bool // guarded by dirsMu
}

type dirKey struct{ dev, ino uint64 }

type dirClaim struct {
	f    *os.File
	refs int
}

var (
	dirsMu sync.Mutex
	dirs   = map[dirKey]*dirClaim{} // guarded by dirsMu: the process's claimed directories
)

// ClaimDir creates dir if needed and claims it for this process. Claims
// of one directory within the process share one lock (several volumes
// keep their diff areas in one storage directory); the last Release
// gives it up. Another process's claim makes it a *HeldError.
func ClaimDir(dir, what, hint string) (*Dir, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s %s: %w", what, dir, err)
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open %s %s: %w", what, dir, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("stat %s %s: %w", what, dir, err)
	}
	key := dirKey{uint64(st.Dev), st.Ino}
	dirsMu.Lock()
	defer dirsMu.Unlock()
	if c := dirs[key]; c != nil {
		f.Close()
		c.refs++
		return &Dir{key: key, path: dir}, nil
	}
	if err := Claim(f, what, dir, hint); err != nil {
		f.Close()
		return nil, err
	}
	dirs[key] = &dirClaim{f: f, refs: 1}
	return &Dir{key: key, path: dir}, nil
}

// Path is the directory as it was claimed.
func (d *Dir) Path() string { return d.path }

// Release gives up this claim; the lock goes with the last one. A nil
// Dir or a second Release does nothing.
func (d *Dir) Release() {
	if d == nil {
		return
	}
	dirsMu.Lock()
	defer dirsMu.Unlock()
	c := dirs[d.key]
	if c == nil || d.released {
		return
	}
	d.released = true
	c.refs--
	if c.refs == 0 {
		c.f.Close()
		delete(dirs, d.key)
	}
}

// Held is the refusal of what at path, held by pid (0: unknown), with
// the holder's command line filled in.
func Held(what, path string, pid int, hint string) *HeldError {
	return &HeldError{What: what, Path: path, PID: pid, Comm: command(pid), Hint: hint}
}
