package backup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// Backend stores the repository's objects by name ("config",
// "packs/ab/ab12…", "index/…", "images/…", "locks/…"). Objects are
// written whole and never changed; a Put is atomic (the object is absent
// or complete). Two implementations: a local directory and an S3 bucket.
type Backend interface {
	// Put stores data under name. It need not be durable until Sync.
	Put(ctx context.Context, name string, data []byte) error
	// Get reads length bytes at off of name (length < 0: to the end)
	// into new memory the caller owns (a restore decrypts it in place).
	// A missing object is an error wrapping fs.ErrNotExist.
	Get(ctx context.Context, name string, off, length int64) ([]byte, error)
	// Has reports whether name exists.
	Has(ctx context.Context, name string) (bool, error)
	// List returns the names under prefix (a directory such as "packs/"),
	// sorted.
	List(ctx context.Context, prefix string) ([]string, error)
	// Delete removes name; a missing object is not an error.
	Delete(ctx context.Context, name string) error
	// Sync makes every completed Put durable.
	Sync(ctx context.Context) error
	// Location names the repository for messages.
	Location() string
}

// Credentials for backends that need them (S3). Empty fields are taken
// from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
type Credentials struct {
	AccessKey string
	SecretKey string
}

// OpenBackend opens the backend a location names: a directory path, or
// s3://HOST[:PORT]/BUCKET[/PREFIX] (TLS) or s3+http://… (plain HTTP, for
// a server on localhost). It does not check that a repository is there.
func OpenBackend(location string, cred Credentials) (Backend, error) {
	switch {
	case strings.HasPrefix(location, "s3://"), strings.HasPrefix(location, "s3+http://"):
		return openS3(location, cred)
	case strings.Contains(location, "://"):
		return nil, fmt.Errorf("repository %q: unknown scheme (use a directory path, s3:// or s3+http://)", location)
	}
	abs, err := filepath.Abs(location)
	if err != nil {
		return nil, fmt.Errorf("repository %q: %w", location, err)
	}
	return &localBackend{dir: abs}, nil
}

// localBackend keeps objects as files under dir. Puts go to a temporary
// file renamed into place (atomic); Sync is one syncfs of the
// repository's filesystem, which is far cheaper than an fsync per pack.
type localBackend struct{ dir string }

func (b *localBackend) Location() string { return b.dir }

func (b *localBackend) path(name string) string {
	return filepath.Join(b.dir, filepath.FromSlash(name))
}

func (b *localBackend) Put(ctx context.Context, name string, data []byte) error {
	p := b.path(name)
	dir := filepath.Dir(p)
	f, err := os.CreateTemp(dir, ".tmp-")
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(dir, 0o700); err == nil {
			f, err = os.CreateTemp(dir, ".tmp-")
		}
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("write %s: %w", p, err)
	}
	return nil
}

func (b *localBackend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	f, err := os.Open(b.path(name))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if length < 0 {
		fi, err := f.Stat()
		if err != nil {
			return nil, err
		}
		length = max(fi.Size()-off, 0)
	}
	buf := make([]byte, length)
	n, err := f.ReadAt(buf, off)
	if err == io.EOF && int64(n) < length {
		return nil, fmt.Errorf("read %s: %d bytes at %d: %w", b.path(name), length, off, io.ErrUnexpectedEOF)
	}
	if err != nil && err != io.EOF {
		return nil, err
	}
	return buf, nil
}

func (b *localBackend) Size(ctx context.Context, name string) (int64, error) {
	fi, err := os.Stat(b.path(name))
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// sizer is a backend that tells an object's size without reading it
// (both do; wrappers in tests may not).
type sizer interface {
	Size(ctx context.Context, name string) (int64, error)
}

// objectSize is the size of object name, or fallback when the backend
// cannot tell.
func objectSize(ctx context.Context, be Backend, name string, fallback int64) int64 {
	if s, ok := be.(sizer); ok {
		if n, err := s.Size(ctx, name); err == nil {
			return n
		}
	}
	return fallback
}

func (b *localBackend) Has(ctx context.Context, name string) (bool, error) {
	_, err := os.Stat(b.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

func (b *localBackend) List(ctx context.Context, prefix string) ([]string, error) {
	var out []string
	root := b.path(prefix)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && p == root {
				return filepath.SkipDir
			}
			return err
		}
		if d.IsDir() && p == filepath.Join(b.dir, localCacheDir) {
			return filepath.SkipDir // the local index cache, not objects
		}
		if d.IsDir() || strings.HasPrefix(d.Name(), ".tmp-") {
			return nil
		}
		rel, err := filepath.Rel(b.dir, p)
		if err != nil {
			return err
		}
		out = append(out, filepath.ToSlash(rel))
		return nil
	})
	sort.Strings(out)
	return out, err
}

func (b *localBackend) Delete(ctx context.Context, name string) error {
	err := os.Remove(b.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err == nil && strings.Count(name, "/") == 2 && strings.HasPrefix(name, "lists/") {
		os.Remove(filepath.Dir(b.path(name))) // a segmented list's directory, once empty
	}
	return err
}

func (b *localBackend) Sync(ctx context.Context) error {
	d, err := os.Open(b.dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return unix.Syncfs(int(d.Fd()))
}
