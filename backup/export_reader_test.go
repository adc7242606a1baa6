package backup

// ReaderCached is the bytes of opened blobs ir keeps.
func ReaderCached(ir *ImageReader) int64 {
	ir.mu.Lock()
	defer ir.mu.Unlock()
	return ir.cached
}
