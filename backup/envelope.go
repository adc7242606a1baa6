package backup

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
)

// Every metadata object (image records, index objects, locks, key files,
// and any kind added later) is stored in an envelope from format 7 on:
// magic, version, the object's bytes (sealed when the repository is
// encrypted), and a SHA-256 of all that. An unencrypted object had no
// checksum before: a flipped bit in an image record decoded to valid,
// different JSON. Sealed objects are authenticated already; the envelope
// checks them too, so one rule holds for every kind and a damaged object
// is told apart from a wrong key before anything is decrypted.
//
// The config stays JSON (an older Umbra must read its version to refuse
// the repository by name) with a checksum field; chunk-list segments are
// named by their hash and packs by theirs, which checks them already.

const (
	envMagic   = "UMBRAOBJ"
	envVersion = 1
	envHeader  = len(envMagic) + 2
	envSumLen  = sha256.Size
	// envelopeFormat is the first repository format whose metadata
	// objects are all in the envelope; readers of older ones accept
	// objects without it.
	envelopeFormat = 7
)

// writeLegacyObjects makes writers skip the envelope, as Umbra before
// format 7 did: tests set it.
var writeLegacyObjects = false

// wrapObject puts a metadata object's stored bytes in the envelope.
func wrapObject(payload []byte) []byte {
	if writeLegacyObjects {
		return payload
	}
	b := make([]byte, 0, envHeader+len(payload)+envSumLen)
	b = append(b, envMagic...)
	b = binary.LittleEndian.AppendUint16(b, envVersion)
	b = append(b, payload...)
	sum := sha256.Sum256(b)
	return append(b, sum[:]...)
}

// isWrapped says whether b starts like an envelope.
func isWrapped(b []byte) bool {
	return len(b) >= envHeader+envSumLen && string(b[:len(envMagic)]) == envMagic
}

// unwrapObject checks the envelope of object name and returns what it
// holds (a slice of b). legacy says the repository's format predates the
// envelope: an object without one is returned as it is. A single flipped
// bit in the magic of a wrapped object cannot make it pass as an older
// object either: no older kind starts with bytes that close to the magic.
func unwrapObject(name string, b []byte, legacy bool) ([]byte, error) {
	if !isWrapped(b) {
		if legacy {
			return b, nil
		}
		return nil, corrupt(name, "no object envelope (bad magic or too short)")
	}
	if v := binary.LittleEndian.Uint16(b[len(envMagic):]); v != envVersion {
		return nil, corrupt(name, fmt.Sprintf("object envelope version %d (this Umbra reads %d)", v, envVersion))
	}
	body := b[:len(b)-envSumLen]
	if sum := sha256.Sum256(body); !bytes.Equal(sum[:], b[len(b)-envSumLen:]) {
		return nil, corrupt(name, "checksum mismatch")
	}
	return body[envHeader:], nil
}

// legacyObjects says whether objects without the envelope are accepted:
// the repository's format is older than the envelope (a format 7
// repository has every metadata object wrapped: upgradeFormat wraps the
// older ones before it writes the new version).
func (r *Repo) legacyObjects() bool { return r.version.Load() < envelopeFormat }

// getWrapped reads object name and checks its envelope.
func (r *Repo) getWrapped(ctx context.Context, name string) ([]byte, error) {
	b, err := r.be.Get(ctx, name, 0, -1)
	if err != nil {
		return nil, err
	}
	return unwrapObject(name, b, r.legacyObjects())
}

// putObject compresses, seals and wraps a metadata object and stores it
// under name; getObject reads it back. New kinds of metadata objects go
// through these (or wrapObject and unwrapObject when they stream).
func (r *Repo) putObject(ctx context.Context, name string, b []byte) error {
	return r.be.Put(ctx, name, r.packObject(b))
}

// packObject is a metadata object's stored bytes: b compressed, sealed
// and wrapped, in one buffer (the frame compressed into it after room
// for the envelope's header and the nonce, sealed in place, the
// checksum appended), not a copy for each step: three of ~5 MiB for
// each of prune's index objects (128 at 16 Mi chunks).
func (r *Repo) packObject(b []byte) []byte {
	head := envHeader
	if writeLegacyObjects {
		head = 0
	}
	pre := 0
	if r.seal != nil {
		pre = sealPrefix
	}
	out := make([]byte, head+pre, head+pre+r.enc.bound(len(b))+sealOverhead+envSumLen)
	out = r.enc.encode(out, b)
	if r.seal != nil {
		n := len(r.seal.sealPrefixed(out[head:])) // in place, from out[head]
		out = out[:head+n]
	}
	if head == 0 {
		return out
	}
	copy(out, envMagic)
	binary.LittleEndian.PutUint16(out[len(envMagic):], envVersion)
	sum := sha256.Sum256(out)
	return append(out, sum[:]...)
}

// encodeConfig is the config object: JSON, with (from format 7) the hex
// SHA-256 of its own encoding without the checksum.
func encodeConfig(c Config) []byte {
	c.Checksum = ""
	b, _ := json.MarshalIndent(c, "", "  ")
	if c.Version < envelopeFormat || writeLegacyObjects {
		return b
	}
	sum := sha256.Sum256(b)
	c.Checksum = hex.EncodeToString(sum[:])
	b, _ = json.MarshalIndent(c, "", "  ")
	return b
}

// decodeConfig parses and checks a config object. One with a checksum
// must be exactly what encodeConfig writes for what it says (so a
// flipped bit anywhere, a renamed key or changed spacing included, is
// found); one of format 7 or later must have a checksum.
func decodeConfig(b []byte) (Config, error) {
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return c, corrupt("config", err.Error())
	}
	if c.Checksum == "" && c.Version < envelopeFormat {
		return c, nil
	}
	if c.Version > formatVersion {
		// Newer: the caller refuses it by its version, unless this is
		// a flipped bit in the version of one of ours.
		if c.Checksum != "" && !bytes.Equal(encodeConfig(c), b) {
			return c, corrupt("config", fmt.Sprintf("checksum mismatch, or written by a newer Umbra (format %d): use that version", c.Version))
		}
		return c, nil
	}
	if c.Checksum == "" {
		return c, corrupt("config", fmt.Sprintf("format %d without a checksum", c.Version))
	}
	if !bytes.Equal(encodeConfig(c), b) {
		return c, corrupt("config", "checksum mismatch")
	}
	c.Checksum = ""
	return c, nil
}

// wrapLegacy puts every metadata object of an older format in the
// envelope (upgradeFormat, before the config names format 7). An object
// is wrapped as it is stored, undecoded: what was damaged stays damaged
// (and is found as before), and nothing needs the key.
func (r *Repo) wrapLegacy(ctx context.Context) error {
	for _, prefix := range []string{"keys/", "images/", "index/"} {
		names, err := r.be.List(ctx, prefix)
		if err != nil {
			return err
		}
		for _, n := range names {
			b, err := r.be.Get(ctx, n, 0, -1)
			if err != nil {
				return err
			}
			if isWrapped(b) {
				continue
			}
			if err := r.be.Put(ctx, n, wrapObject(b)); err != nil {
				return err
			}
		}
	}
	return r.be.Sync(ctx)
}
