package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/internal/testutil"
)

// TestEncryptedDataStaysEncrypted: an ext4 volume holding an fscrypt
// (ext4 encryption) directory is backed up and restored without any key:
// the image holds the directory's ciphertext — its plaintext appears
// nowhere in the restored bytes, while an unencrypted file's does — and
// the restored filesystem is clean.
func TestEncryptedDataStaysEncrypted(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "e4crypt", "mkfs.ext4", "e2fsck", "losetup")
	testutil.NeedFUSE(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "enc.img")
	testutil.SparseFile(t, img, 64<<20)
	fuseDir := filepath.Join(dir, "fuse")
	s := startService(t, dir, []string{"enc"}, "--fuse-dir", fuseDir)
	waitFile(t, filepath.Join(fuseDir, "enc"), "the volume's FUSE file")
	dev := testutil.Losetup(t, filepath.Join(fuseDir, "enc"), false, true)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", "-O", "encrypt", dev)
	mnt := testutil.Mount(t, dev, dir)
	secret, plain := filepath.Join(mnt, "secret"), filepath.Join(mnt, "plain")
	os.Mkdir(secret, 0o700)
	os.Mkdir(plain, 0o755)
	cmd := exec.Command("e4crypt", "add_key", "-S", "0x0123456789abcdef", secret)
	cmd.Stdin = strings.NewReader("a passphrase for the test")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("e4crypt add_key: %v %s (no kernel keyring here?)", err, out)
	}
	secretText := []byte(strings.Repeat("TOP-SECRET-PLAINTEXT ", 200))
	plainText := []byte(strings.Repeat("PLAIN-CONTROL-TEXT ", 200))
	os.WriteFile(filepath.Join(secret, "doc.txt"), secretText, 0o600)
	os.WriteFile(filepath.Join(plain, "doc.txt"), plainText, 0o644)
	repo := filepath.Join(dir, "repo")
	s.ok("repo", "init", "--repo", repo)
	s.ok("backup", "enc", "--repo", repo)
	var images []struct {
		ID string `json:"id"`
	}
	out := s.ok("images", "list", "--repo", repo, "--json")
	if err := jsonUnmarshal(out, &images); err != nil || len(images) != 1 {
		t.Fatalf("images: %v %s", err, out)
	}
	restored := filepath.Join(dir, "restored.img")
	s.ok("restore", images[0].ID, "--repo", repo, "--to", restored)
	raw, _ := os.ReadFile(restored)
	if bytes.Contains(raw, []byte("TOP-SECRET-PLAINTEXT")) {
		t.Fatal("the image holds the encrypted directory's plaintext")
	}
	if !bytes.Contains(raw, []byte("PLAIN-CONTROL-TEXT")) {
		t.Fatal("the image lacks the unencrypted file's text: the check above proves nothing")
	}
	if out, err := exec.Command("e2fsck", "-fn", restored).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck of the restored image: %v\n%s", err, out)
	}
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }
