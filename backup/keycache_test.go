package backup_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"umbra/backup"
)

// TestReopenDerivesKeyOnce: a process that opens an encrypted
// repository again with the same password does not derive its key from
// the password again (scrypt: ~0.1 s of CPU and 32 MiB at every open of
// the service's repositories, which it closes when idle); a wrong
// password is still refused, each time, and another repository's key
// is its own.
func TestReopenDerivesKeyOnce(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "repo")
	set := backup.Settings{Password: "correct horse"}
	r, err := backup.InitWith(ctx, dir, set)
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	d0 := backup.KeyDerivations()
	for range 3 {
		r, err := backup.OpenWith(ctx, dir, set)
		if err != nil {
			t.Fatal(err)
		}
		r.Close()
	}
	if d := backup.KeyDerivations() - d0; d != 0 {
		t.Errorf("three opens after the init derived the key %d times, want 0", d)
	}
	d0 = backup.KeyDerivations()
	for range 2 {
		if _, err := backup.OpenWith(ctx, dir, backup.Settings{Password: "wrong"}); !errors.Is(err, backup.ErrWrongPassword) {
			t.Fatalf("open with a wrong password: %v", err)
		}
	}
	if d := backup.KeyDerivations() - d0; d != 2 {
		t.Errorf("two opens with a wrong password derived a key %d times, want 2", d)
	}
	// Another repository, the same password: its own key.
	dir2 := filepath.Join(t.TempDir(), "repo")
	r2, err := backup.InitWith(ctx, dir2, set)
	if err != nil {
		t.Fatal(err)
	}
	src := volumeData(rand.New(rand.NewPCG(5, 6)), 64*4096)
	x := backupAndRestore(t, r2, src, backup.Options{Volume: "v"})
	r2.Close()
	r, err = backup.OpenWith(ctx, dir, set)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.Image(x.ID); err == nil {
		t.Fatalf("the first repository has the second's image %s", x.ID)
	}
	r2, err = backup.OpenWith(ctx, dir2, set)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	backupAndRestoreCheck(t, r2, x.ID, src)
}
