// Package expose makes a shadow copy visible as a read-only directory:
// the snapshot's block file (a FUSE file of the service, or a reflink
// snapshot file) is attached to a read-only loop device and its
// filesystem mounted read-only, without replaying any journal (a
// snapshot taken under fsfreeze is clean; a crash-consistent one is
// shown as it is). Unexposing unmounts and detaches in that order.
// Stale exposures — the mount of a service that was killed — are torn
// down with a lazy unmount before they are made again.
//
// It drives losetup, blkid and mount(8): the kernel's loop and mount
// interfaces have no better-kept Go library, and the tools handle the
// filesystem-specific options.
package expose

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount is one exposure as a directory.
type Mount struct {
	Dir    string `json:"dir"`    // mount point
	Device string `json:"device"` // loop device
	File   string `json:"file"`   // the snapshot's block file
	FSType string `json:"fstype"`
}

// ErrNoFilesystem: the snapshot holds no filesystem that can be mounted.
var ErrNoFilesystem = errors.New("no mountable filesystem")

// options are the read-only mount options per filesystem: never touch
// the journal, and let XFS mount a copy of a filesystem that is mounted
// too (same UUID).
var options = map[string]string{
	"ext4":  "ro,noload",
	"ext3":  "ro,noload",
	"ext2":  "ro",
	"xfs":   "ro,norecovery,nouuid",
	"btrfs": "ro,rescue=nologreplay",
	"vfat":  "ro",
}

func run(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// MountFile exposes the block file read-only at dir (created if needed).
func MountFile(file, dir string) (*Mount, error) { return MountFileWith(file, dir) }

// MountFileWith is MountFile with more mount options (e.g. "nosuid",
// "nodev", "noexec") after the filesystem's read-only ones.
func MountFileWith(file, dir string, extra ...string) (*Mount, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("expose %s at %s: %w", file, dir, err)
	}
	out, err := run("losetup", "-f", "--show", "-r", file)
	if err != nil {
		return nil, fmt.Errorf("expose %s: %w", file, err)
	}
	m := &Mount{Dir: dir, Device: strings.TrimSpace(out), File: file}
	fstype, _ := run("blkid", "-p", "-o", "value", "-s", "TYPE", m.Device)
	m.FSType = strings.TrimSpace(fstype)
	opts, ok := options[m.FSType]
	if !ok {
		run("losetup", "-d", m.Device)
		if m.FSType == "" {
			return nil, fmt.Errorf("expose %s: %w (blkid finds no filesystem; export it over NBD instead)", file, ErrNoFilesystem)
		}
		return nil, fmt.Errorf("expose %s: %w: %s is not supported (export it over NBD instead)", file, ErrNoFilesystem, m.FSType)
	}
	if len(extra) > 0 {
		opts += "," + strings.Join(extra, ",")
	}
	if _, err := run("mount", "-t", m.FSType, "-o", opts, m.Device, dir); err != nil {
		run("losetup", "-d", m.Device)
		return nil, fmt.Errorf("expose %s: %w", file, err)
	}
	return m, nil
}

// Unmount undoes an exposure: unmount (lazily if busy or stale), then
// detach the loop device if it still carries the same file.
func (m *Mount) Unmount() error {
	var errs []error
	if mounted(m.Dir) {
		if _, err := run("umount", m.Dir); err != nil {
			if _, err2 := run("umount", "-l", m.Dir); err2 != nil {
				errs = append(errs, err)
			}
		}
	}
	if Carries(m.Device, m.File) {
		if _, err := run("losetup", "-d", m.Device); err != nil {
			errs = append(errs, err)
		}
	}
	os.Remove(m.Dir)
	return errors.Join(errs...)
}

// Carries reports whether loop device dev is still attached to file (and
// not, since, to another file): its backing file is file, or file's
// mount is gone. Then the kernel names the backing file from the root of
// the detached mount ("/NAME"): the service's FUSE files after it was
// killed and its FUSE directory mounted again, whose loop devices must
// still go. (Whether that FUSE server is gone cannot be asked of the
// device: the kernel answers a stat of the file from its attribute cache
// for a while.)
func Carries(dev, file string) bool {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return false
	}
	switch strings.TrimSpace(string(b)) {
	case file:
		return true
	case "/" + filepath.Base(file), "/" + filepath.Base(file) + " (deleted)":
		_, err := os.Stat(file)
		// Not the same file as what is at file's path now, if anything.
		return err != nil || !sameFile(dev, file)
	}
	return false
}

// sameFile reports whether loop device dev's backing file is the file at
// path (device and inode), as far as the loop device can say.
func sameFile(dev, path string) bool {
	f, err := os.Open(dev)
	if err != nil {
		return false
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		return false
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return false
	}
	return info.Device == st.Dev && info.Inode == st.Ino
}

// mounted reports whether dir is a mount point in /proc/self/mountinfo.
func mounted(dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.ReplaceAll(f[4], `\040`, " ") == dir {
			return true
		}
	}
	return false
}
