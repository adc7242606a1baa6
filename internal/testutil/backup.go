package testutil

import (
	"context"
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
