package liverestore

import (
	"io"
	"os"

	"golang.org/x/sys/unix"

	"umbra/cow"
)

// FS returns base, except that opening the target's path (as cow.Open
// does) returns t: the volume's origin is the Target.
func (t *Target) FS(base cow.FS, path string) cow.FS { return targetFS{FS: base, path: path, t: t} }

type targetFS struct {
	cow.FS
	path string
	t    *Target
}

func (fs targetFS) OpenFile(name string, flag int, perm os.FileMode) (cow.File, error) {
	if name == fs.path {
		return fs.t, nil
	}
	return fs.FS.OpenFile(name, flag, perm)
}

// OSFile is a cow.File over an open file or block device.
func OSFile(f *os.File) cow.File { return osFile{f} }

type osFile struct{ *os.File }

func (f osFile) Size() (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if fi.Mode().IsRegular() {
		return fi.Size(), nil
	}
	return f.Seek(0, io.SeekEnd) // a block device's capacity
}

func (f osFile) Punch(off, length int64) error {
	if length <= 0 {
		return nil
	}
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}
