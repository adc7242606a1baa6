//go:build !cgo

package backup

// cZstd says whether this binary has the C encoder: not without cgo.
const cZstd = false

func newCEncoder(cParams, func() *goEncoder) encoder { return nil }

// cDecode: without cgo, every frame goes to the Go decoder.
func cDecode(dst, z []byte, max int) ([]byte, bool) { return nil, false }
