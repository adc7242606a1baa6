package backup

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"golang.org/x/crypto/scrypt"
)

// Encryption: a random 64-byte master key (32 bytes for AES-256-GCM, 32
// for keyed chunk hashes, so chunk names reveal nothing about contents)
// is stored in keys/ID wrapped with a key derived from the password by
// scrypt. Every object but config and keys is sealed: a 12-byte random
// nonce followed by the AES-256-GCM ciphertext and tag.

var (
	// ErrNeedPassword: the repository is encrypted and no password was given.
	ErrNeedPassword = errors.New("the repository is encrypted: give its password (--password-file or UMBRA_PASSWORD)")
	// ErrWrongPassword: no key file opens with the password.
	ErrWrongPassword = errors.New("wrong password: no key of the repository opens with it")
	// ErrNotEncrypted: a password was given for a repository that is not
	// encrypted (it would protect nothing, while its user believes it
	// does).
	ErrNotEncrypted = errors.New("the repository is not encrypted, but a password was given (--password-file or UMBRA_PASSWORD): " +
		"it would protect nothing; drop the password, or back up into a repository created with one (`umbra repo init --password-file`)")
)

const masterKeyLen = 64

// keyFile is keys/ID (JSON).
type keyFile struct {
	Version int       `json:"version"`
	KDF     string    `json:"kdf"`
	N       int       `json:"n"`
	R       int       `json:"r"`
	P       int       `json:"p"`
	Salt    []byte    `json:"salt"`
	Wrapped []byte    `json:"wrapped"` // sealed master key
	Created time.Time `json:"created"`
}

// scrypt cost: N=2^15, r=8, p=1 takes about 0.1 s and 32 MiB here.
var scryptN = 1 << 15

func newKeyFile(password string, master []byte) (*keyFile, error) {
	k := &keyFile{Version: 1, KDF: "scrypt", N: scryptN, R: 8, P: 1, Salt: make([]byte, 32), Created: time.Now().UTC()}
	rand.Read(k.Salt)
	kek, err := scrypt.Key([]byte(password), k.Salt, k.N, k.R, k.P, 32)
	if err != nil {
		return nil, err
	}
	s, err := newSealer(kek)
	if err != nil {
		return nil, err
	}
	k.Wrapped = s.seal(nil, master)
	return k, nil
}

func (k *keyFile) unwrap(password string) ([]byte, error) {
	if k.KDF != "scrypt" || k.N < 2 || k.N > 1<<22 || k.R < 1 || k.R > 64 || k.P < 1 || k.P > 16 {
		return nil, fmt.Errorf("key file: unsupported KDF %q N=%d r=%d p=%d", k.KDF, k.N, k.R, k.P)
	}
	kek, err := scrypt.Key([]byte(password), k.Salt, k.N, k.R, k.P, 32)
	if err != nil {
		return nil, err
	}
	s, _ := newSealer(kek)
	m, err := s.open(nil, k.Wrapped)
	if err != nil || len(m) != masterKeyLen {
		return nil, ErrWrongPassword
	}
	return m, nil
}

func (k *keyFile) encode() []byte { b, _ := json.MarshalIndent(k, "", "  "); return b }

// sealer seals and opens objects; a nil sealer leaves them in the clear.
type sealer struct{ aead cipher.AEAD }

func newSealer(key []byte) (*sealer, error) {
	blk, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	g, err := cipher.NewGCM(blk)
	if err != nil {
		return nil, err
	}
	return &sealer{aead: g}, nil
}

const sealOverhead = 12 + 16

func (s *sealer) seal(dst, plain []byte) []byte {
	if s == nil {
		return append(dst, plain...)
	}
	var nonce [12]byte
	rand.Read(nonce[:])
	dst = append(dst, nonce[:]...)
	return s.aead.Seal(dst, nonce[:], plain, nil)
}

// sealPrefix is the room sealPrefixed needs before the plaintext.
const sealPrefix = 12

// sealPrefixed seals b[sealPrefix:] in place; b's first sealPrefix bytes
// are room for the nonce (dropped when not sealing), and the tag needs 16
// bytes of spare capacity. It saves a copy per blob on the backup path.
func (s *sealer) sealPrefixed(b []byte) []byte {
	if s == nil {
		return b[sealPrefix:]
	}
	rand.Read(b[:sealPrefix])
	return s.aead.Seal(b[:sealPrefix], b[:sealPrefix], b[sealPrefix:], nil)
}

// openInPlace opens b, reusing its memory for the plaintext.
func (s *sealer) openInPlace(b []byte) ([]byte, error) {
	if s == nil {
		return b, nil
	}
	if len(b) < sealOverhead {
		return nil, fmt.Errorf("%w: sealed object too short", ErrCorrupt)
	}
	out, err := s.aead.Open(b[12:12], b[:12], b[12:], nil)
	if err != nil {
		return nil, fmt.Errorf("%w: authentication failed (damaged, or sealed with another key)", ErrCorrupt)
	}
	return out, nil
}

func (s *sealer) open(dst, b []byte) ([]byte, error) {
	if s == nil {
		return append(dst, b...), nil
	}
	if len(b) < sealOverhead {
		return nil, fmt.Errorf("%w: sealed object too short", ErrCorrupt)
	}
	out, err := s.aead.Open(dst, b[:12], b[12:], nil)
	if err != nil {
		return nil, fmt.Errorf("%w: authentication failed (damaged, or sealed with another key)", ErrCorrupt)
	}
	return out, nil
}
