package testutil

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"umbra/backup"
)

// sizedFile is a file to back up: backup.Source wants its size.
type sizedFile struct {
	*os.File
	size int64
}

func (f sizedFile) Size() int64 { return f.size }

// BackupFile backs up file, as volume, into a new unencrypted
// repository at dir/repo and returns the repository and the image id.
func BackupFile(t testing.TB, dir, file, volume string) (repo, id string) {
	t.Helper()
	repo = filepath.Join(dir, "repo")
	r, err := backup.Init(repo)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	x, _, err := r.Backup(context.Background(), sizedFile{f, st.Size()}, backup.Options{Volume: volume})
	if err != nil {
		t.Fatal(err)
	}
	return repo, x.ID
}

// DamageFirstPack flips the bits mask of byte at(size) of the first pack
// file (in path order) of the local repository at repo, size being the
// pack's length: a verify of the images whose chunks the damaged blob
// holds must then fail.
func DamageFirstPack(t testing.TB, repo string, at func(size int) int, mask byte) {
	t.Helper()
	var pack string
	filepath.WalkDir(filepath.Join(repo, "packs"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && pack == "" {
			pack = p
		}
		return nil
	})
	if pack == "" {
		t.Fatalf("no pack in repository %s to damage", repo)
	}
	b, err := os.ReadFile(pack)
	if err != nil {
		t.Fatal(err)
	}
	b[at(len(b))] ^= mask
	if err := os.WriteFile(pack, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
