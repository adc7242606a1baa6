package cow

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// metaLog is the metadata log of a volume's persistent snapshots
// (meta.log in the diff area; docs/formats.md has its records). Its job
// is the file: appending records, making them durable with one fsync
// shared by concurrent callers (group commit), rewriting the file
// compactly (rewrite), reading it back at open (loadMetaLog, replay)
// and removing it once no persistent snapshot lives. What the records
// say is the Volume's: it builds a checkpoint's records from its
// snapshots (recover.go) and applies the records replay hands it.
//
// A Volume has one while a persistent snapshot lives (Volume.log; nil
// otherwise, and the methods below do nothing on nil).
//
// Locks: append, off and the swap of f by rewrite run under Volume.mu,
// which orders the appends; the fsync runs outside Volume.mu and holds
// mu shared, so mu is held exclusively to set err, swap f or close it.
type metaLog struct {
	fs   FS
	path string
	sync *groupSyncer // replaced by swap (a failed sync is sticky); guarded by Volume.mu

	off   int64 // where the next record goes; guarded by Volume.mu
	ready int64 // bytes the file has written (records, then zeros ahead); guarded by Volume.mu

	mu     sync.RWMutex // held shared during fsync, exclusively to swap or close f and to set err
	f      File
	err    error // a failed append: every later sync reports it
	closed bool
}

func newMetaLog(fsys FS, path string, f File, off int64) *metaLog {
	l := &metaLog{fs: fsys, path: path, f: f, off: off, ready: off}
	l.sync = newGroupSyncer(l.fsync)
	return l
}

func (l *metaLog) fsync() error {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.err != nil {
		return l.err
	}
	if l.closed {
		return nil
	}
	return datasync(l.f) // appends: the size is all the metadata a reader needs
}

// append appends rec. Caller holds Volume.mu (which orders appends and
// guards f and off against a rewrite; err is also read by fsync, outside
// Volume.mu: it is set under l.mu).
func (l *metaLog) append(rec record) {
	if l == nil || l.err != nil {
		return
	}
	b := rec.encode()
	if end := l.off + int64(len(b)); end > l.ready {
		// Zeros ahead, as for the diff area (zeroBatch): a record
		// written over them grows nothing, so the group's fdatasync
		// commits no journal transaction. Replay ends at the first
		// zero byte after the records (not a valid record).
		n := max(logZeroBatch, end-l.ready)
		if _, err := writeZeros(l.f, l.ready, n); err == nil {
			l.ready += n
		}
	}
	if _, err := l.f.WriteAt(b, l.off); err != nil {
		l.mu.Lock()
		l.err = fmt.Errorf("append to metadata %s: %w", l.path, err)
		l.mu.Unlock()
		return
	}
	l.off += int64(len(b))
}

// logZeroBatch is how many bytes of zeros the log writes ahead of its
// records at a time: some 6000 mapping records.
const logZeroBatch = 256 << 10

// syncer returns the log's group syncer, nil for no log; caller holds
// Volume.mu, and calls sync on it after letting Volume.mu go.
func (l *metaLog) syncer() *groupSyncer {
	if l == nil {
		return nil
	}
	return l.sync
}

// flush makes appended records durable (group commit). Callers must not
// hold Volume.mu... except commit and revert, which are the only writers
// then (gate closed).
func (l *metaLog) flush() error {
	if l == nil {
		return nil
	}
	return l.sync.sync()
}

// remove closes the log and deletes its file (no persistent snapshot
// lives any more). Caller holds Volume.mu.
func (l *metaLog) remove() {
	l.mu.Lock()
	l.closed = true
	l.f.Close()
	l.mu.Unlock()
	_ = l.fs.Remove(l.path)
	_ = l.fs.SyncDir(filepath.Dir(l.path))
}

// rewriteLog replaces the log at path with buf (a header and records),
// atomically: it writes and syncs path.tmp, calls before (the diff area
// must be durable before the mappings that point into it), renames it
// over path and syncs the directory. It returns the new file, open.
func rewriteLog(fsys FS, path string, buf []byte, before func() error) (File, error) {
	tmp := path + ".tmp"
	f, err := fsys.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("checkpoint %s: %w", tmp, err)
	}
	if _, err := f.WriteAt(buf, 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("checkpoint %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, fmt.Errorf("checkpoint %s: %w", tmp, err)
	}
	if err := before(); err != nil {
		f.Close()
		return nil, err
	}
	if err := fsys.Rename(tmp, path); err != nil {
		f.Close()
		return nil, fmt.Errorf("checkpoint %s: %w", path, err)
	}
	if err := fsys.SyncDir(filepath.Dir(path)); err != nil {
		f.Close()
		return nil, fmt.Errorf("checkpoint %s: sync directory: %w", filepath.Dir(path), err)
	}
	return f, nil
}

// swap makes f, of n bytes, the log's file (after rewriteLog), with a
// group syncer of its own: a failed sync of the old file does not stick
// to the new one. Caller holds Volume.mu.
func (l *metaLog) swap(f File, n int64) {
	l.mu.Lock()
	l.f.Close()
	l.f, l.off, l.ready, l.err = f, n, n, nil
	l.mu.Unlock()
	l.sync = newGroupSyncer(l.fsync)
}

// errNoLog: loadMetaLog found no log (no persistent snapshot lived).
var errNoLog = errors.New("no metadata log")

// logLost is a log that cannot be used: its snapshots are lost, and the
// origin opens all the same.
type logLost struct{ why string }

func (e *logLost) Error() string { return e.why }

// loadMetaLog opens the log at path and reads it whole: the log, its
// header and its records. It returns errNoLog when there is none, and a
// *logLost when it cannot be read or its header is damaged (then it is
// moved aside, and the diff-area data file at storePath removed).
func loadMetaLog(fsys FS, path, storePath string) (*metaLog, metaHeader, []byte, error) {
	lf, err := fsys.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, metaHeader{}, nil, errNoLog
	}
	if err != nil {
		return nil, metaHeader{}, nil, &logLost{fmt.Sprintf("diff area metadata %s cannot be opened (%v): its snapshots are lost; the origin is intact", path, err)}
	}
	n, err := lf.Size()
	var data []byte
	if err == nil {
		data = make([]byte, n)
		_, err = lf.ReadAt(data, 0)
		if err == io.EOF {
			err = nil
		}
	}
	if err != nil {
		lf.Close()
		return nil, metaHeader{}, nil, &logLost{fmt.Sprintf("diff area metadata %s cannot be read (%v): its snapshots are lost; the origin is intact", path, err)}
	}
	hdr, err := decodeMetaHeader(data)
	if err != nil {
		lf.Close()
		aside := fmt.Sprintf("%s.damaged-%d", path, time.Now().Unix())
		_ = fsys.Rename(path, aside)
		_ = fsys.Remove(storePath)
		return nil, metaHeader{}, nil, &logLost{fmt.Sprintf("diff area metadata %s is damaged (%v): moved to %s; its snapshots are lost; the origin is intact", path, err, aside)}
	}
	return newMetaLog(fsys, path, lf, int64(len(data))), hdr, data[metaHeaderSize:], nil
}

// replay hands the records of b to apply in order, and says whether the
// last one was a clean stop and which revert (generation; 0: none) was
// begun and not ended. It stops at the first torn or corrupt record, as
// write-ahead logs do: records after the last fsync may reach the disk
// in any order after a power loss, and none of them was relied upon. (A
// record damaged at rest inside the synced part looks the same; the log
// is rewritten compactly at every open, which bounds that exposure to
// one run.)
func replay(b []byte, apply func(record)) (clean bool, revert uint64) {
	for len(b) > 0 {
		r, n, err := decodeRecord(b)
		if err != nil {
			return clean, revert
		}
		b = b[n:]
		clean = false
		switch r.Type {
		case recClean:
			clean = true
		case recRevertBegin:
			revert = r.Gen
		case recRevertEnd:
			revert = 0
		}
		apply(r)
	}
	return clean, revert
}
