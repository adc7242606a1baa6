// Package size parses and prints the byte sizes that flags and
// configuration files give ("4096", "512K", "10G", "1.5T"), so that the
// CLI and the service read them alike.
package size

import (
	"fmt"
	"math"
	"math/big"
	"regexp"
	"strconv"
	"strings"
)

// Syntax is what Parse accepts, for errors.
const Syntax = "want a whole number of bytes, or a number with a K, M, G or T suffix (binary units), e.g. 4096, 512K, 10G, 1.5T"

var sizeRE = regexp.MustCompile(`^([0-9]+)(\.[0-9]+)?\s*(?i:([KMGT])(?:i?B)?|B)?$`)

// Parse parses "4096", "4K", "10G", "1.5T" (binary units; a fraction
// only with a unit, and only where it comes to whole bytes). Anything
// else is an error that names the value and the syntax: an empty value,
// a sign, an exponent (1e3), a value past 2^63-1 bytes.
func Parse(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("size is empty: %s", Syntax)
	}
	m := sizeRE.FindStringSubmatch(t)
	if m == nil {
		return 0, fmt.Errorf("size %q: %s", s, Syntax)
	}
	mult := int64(1)
	switch strings.ToUpper(m[3]) {
	case "K":
		mult = 1 << 10
	case "M":
		mult = 1 << 20
	case "G":
		mult = 1 << 30
	case "T":
		mult = 1 << 40
	}
	if m[2] != "" && mult == 1 {
		return 0, fmt.Errorf("size %q: a fraction of a byte: %s", s, Syntax)
	}
	r, ok := new(big.Rat).SetString(m[1] + m[2])
	if !ok {
		return 0, fmt.Errorf("size %q: %s", s, Syntax)
	}
	r.Mul(r, new(big.Rat).SetInt64(mult))
	if !r.IsInt() {
		return 0, fmt.Errorf("size %q is %s bytes, not a whole number of bytes: %s", s, r.FloatString(2), Syntax)
	}
	n := r.Num()
	if !n.IsInt64() {
		return 0, fmt.Errorf("size %q is too large: at most %d bytes (8E)", s, int64(math.MaxInt64))
	}
	return n.Int64(), nil
}

// Exact writes n in the largest binary unit that divides it.
func Exact(n int64) string {
	switch {
	case n != 0 && n%(1<<20) == 0:
		return fmt.Sprintf("%dM", n>>20)
	case n != 0 && n%(1<<10) == 0:
		return fmt.Sprintf("%dK", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}

// CheckPow2 refuses a size that is not a power of two within [lo, hi],
// naming what it is (name) and the range.
func CheckPow2(name string, n, lo, hi int64) error {
	if n < lo || n > hi || n&(n-1) != 0 {
		return fmt.Errorf("%s %s: want a power of two from %s to %s", name, Exact(n), Exact(lo), Exact(hi))
	}
	return nil
}

// Human writes n for people, in the largest binary unit below it with
// one decimal: "512 B", "1.5 KiB", "3.0 GiB" (the web pages' and the
// file browser's form).
func Human(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
