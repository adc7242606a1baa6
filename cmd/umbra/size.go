package main

import (
	"fmt"

	"umbra/internal/size"
)

// The chunk sizes a repository (backup.InitWith) and a copy-on-write
// volume (cow.Open) take.
const (
	repoMinChunk = 4 << 10
	repoMaxChunk = 4 << 20
)

// sizeSyntax is what parseSize accepts, for its errors.
const sizeSyntax = size.Syntax

// parseSize parses "4096", "4K", "10G", "1.5T" (see size.Parse).
func parseSize(s string) (int64, error) { return size.Parse(s) }

// parseSizeFlag is parseSize for a flag or setting that may be absent:
// unset (set false) is 0, the default; set, it must parse.
func parseSizeFlag(name, value string, set bool) (int64, error) {
	if !set {
		return 0, nil
	}
	n, err := parseSize(value)
	if err != nil {
		return 0, usageError{fmt.Errorf("%s: %w", name, err)}
	}
	return n, nil
}

// checkChunkSize refuses a chunk size that is not a power of two within
// [lo, hi], naming the flag and the range.
func checkChunkSize(name string, n, lo, hi int64) error {
	if err := size.CheckPow2(name, n, lo, hi); err != nil {
		return usageError{err}
	}
	return nil
}

// exactSize writes n in the largest binary unit that divides it.
func exactSize(n int64) string { return size.Exact(n) }
