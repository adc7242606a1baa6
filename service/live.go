package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"umbra/api"
	"umbra/api/umbrav1"
	"umbra/backup"
	"umbra/cow"
	"umbra/internal/owner"
	"umbra/liverestore"
	"umbra/metrics"
	"umbra/provider"
)

// A live restore (umbra restore --live) adds a volume to the running
// service whose origin is a liverestore.Target. Its record,
// STATE/live/NAME.json, brings it back at the next start (with its
// restore, while the map file STATE/live/NAME.map is there); the record
// stays once the restore is done, as the volume's.
//
// No secret is written to the state directory: the repository's password
// and S3 keys stay in memory, and after a restart the service finds them
// again (liveCreds) or the restore waits for them.

// liveRecordVersion is the version of the live restore records written;
// version 1 records (which held the secrets) are read, and rewritten.
const liveRecordVersion = 2

// liveRecord is STATE/live/NAME.json (docs/formats.md).
type liveRecord struct {
	Version   int    `json:"version"`
	Volume    string `json:"volume"`
	Target    string `json:"target"`
	Image     string `json:"image"`
	Size      int64  `json:"size"`
	ChunkSize int64  `json:"chunk_size"` // the repository's
	Repo      string `json:"repo"`
	// PasswordFile is where the password is read again after a restart.
	PasswordFile string `json:"password_file,omitempty"`
	// The secrets of a version 1 record: read, never written.
	Password    string    `json:"password,omitempty"`
	S3AccessKey string    `json:"s3_access_key,omitempty"`
	S3SecretKey string    `json:"s3_secret_key,omitempty"`
	Rate        int64     `json:"rate,omitempty"`
	State       string    `json:"state"` // restoring | done
	Started     time.Time `json:"started"`
	Done        time.Time `json:"done,omitzero"`
}

const (
	liveRestoring = "restoring"
	liveDone      = "done"
)

// liveRestores are the service's live-restored volumes.
type liveRestores struct {
	s   *Service
	dir string

	ctx    context.Context    // ends the background restores (close)
	cancel context.CancelFunc //
	wg     sync.WaitGroup     // the background restores

	mu   sync.Mutex // guards vols
	vols map[string]*liveVol
}

// liveVol is one live-restored volume.
type liveVol struct {
	rec    liveRecord // changed only under liveRestores.mu
	target *liverestore.Target
	src    *lazySource // nil once done at open
}

func newLiveRestores(s *Service) *liveRestores {
	ctx, cancel := context.WithCancel(context.Background())
	return &liveRestores{s: s, dir: filepath.Join(s.cfg.StateDir, "live"), ctx: ctx, cancel: cancel, vols: map[string]*liveVol{}}
}

func (l *liveRestores) recordPath(name string) string { return filepath.Join(l.dir, name+".json") }
func (l *liveRestores) mapPath(name string) string    { return filepath.Join(l.dir, name+".map") }

// writeRecord replaces rec's file durably, as a version 2 record:
// without secrets.
func (l *liveRestores) writeRecord(rec liveRecord) error {
	rec.Version = liveRecordVersion
	rec.Password, rec.S3AccessKey, rec.S3SecretKey = "", "", ""
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(l.dir, 0o700); err != nil {
		return err
	}
	tmp := l.recordPath(rec.Volume) + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, l.recordPath(rec.Volume))
	}
	if err == nil {
		err = cow.OSFS{}.SyncDir(l.dir)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("live restore record of %s: %w", rec.Volume, err)
	}
	return nil
}

// open brings back the live-restored volumes of earlier runs.
func (l *liveRestores) open() error {
	names, err := filepath.Glob(filepath.Join(l.dir, "*.json"))
	if err != nil || len(names) == 0 {
		return err
	}
	sort.Strings(names)
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			return fmt.Errorf("live restore record %s: %w", n, err)
		}
		var rec liveRecord
		if err := json.Unmarshal(b, &rec); err != nil || rec.Volume+".json" != filepath.Base(n) {
			return fmt.Errorf("live restore record %s: not a record this Umbra reads (%v); move it away to start without that volume", n, err)
		}
		if rec.Version != 1 && rec.Version != liveRecordVersion {
			return fmt.Errorf("live restore record %s: version %d, this Umbra reads 1 and %d", n, rec.Version, liveRecordVersion)
		}
		if rec.Version == 1 {
			// Its secrets go on in memory for this run, and off the disk.
			if err := l.writeRecord(rec); err != nil {
				return err
			}
		}
		if err := l.openVolume(rec); err != nil {
			return err
		}
	}
	return nil
}

// openVolume opens a recorded volume: an ordinary one once its restore
// is done, else a Target resuming from its map.
func (l *liveRestores) openVolume(rec liveRecord) error {
	if rec.State == liveDone {
		os.Remove(l.mapPath(rec.Volume)) // left if the service stopped between record and removal
		v, err := cow.Open(rec.Volume, rec.Target, l.s.volumeOptions(nil))
		if err != nil {
			return fmt.Errorf("live-restored volume %s: %w", rec.Volume, err)
		}
		return l.add(v, &liveVol{rec: rec})
	}
	f, err := openTargetFile(rec.Target, false, rec.Size)
	if err != nil {
		return fmt.Errorf("live restore of %s into %s: %w", rec.Image, rec.Target, err)
	}
	src := l.newSource(rec, backup.Settings{Password: rec.Password,
		Cred: backup.Credentials{AccessKey: rec.S3AccessKey, SecretKey: rec.S3SecretKey}})
	t, err := liverestore.Open(cow.OSFS{}, f, l.mapPath(rec.Volume), src, rec.Image, l.targetOptions(rec))
	if err != nil {
		f.Close()
		return fmt.Errorf("live restore of %s into %s: %w (its record is %s)", rec.Image, rec.Target, err, l.recordPath(rec.Volume))
	}
	if err := l.openTargetVolume(rec, t, src); err != nil {
		return err
	}
	l.s.log.Info("live restore resumed", "volume", rec.Volume, "image", rec.Image, "target", rec.Target, "restored", t.Progress().Restored, "size", rec.Size)
	return nil
}

// liveQuietStart holds a live restore's background restore back while
// its volume is attached and mounted (liverestore.Options.QuietStart):
// on 2 cores its workers otherwise take the CPU from the losetup, mount
// and cat that reach a file, and the first read took 0.9-2.0 s instead
// of 0.6 s (load 10, measured 2026-12-07). It costs a restore nobody
// reads half a second. Only a new restore has it: one resumed after a
// restart goes on at once.
const liveQuietStart = 500 * time.Millisecond

func (l *liveRestores) targetOptions(rec liveRecord) liverestore.Options {
	name := rec.Volume
	return liverestore.Options{Rate: rec.Rate, Logger: l.s.log,
		OnComplete: func() error { return l.completed(name) },
		OnState: func(state, msg string) {
			kind := "live_restore_resumed"
			if state == liverestore.StateWaiting || state == liverestore.StateCredentials {
				kind = "live_restore_waiting"
			}
			l.event(kind, name)
		}}
}

// openTargetVolume opens t as volume rec.Volume, adds it and starts its
// background restore.
func (l *liveRestores) openTargetVolume(rec liveRecord, t *liverestore.Target, src *lazySource) error {
	v, err := cow.Open(rec.Volume, rec.Target, l.s.volumeOptions(t.FS(cow.OSFS{}, rec.Target)))
	if err != nil {
		t.Close()
		src.close()
		return fmt.Errorf("live-restored volume %s: %w", rec.Volume, err)
	}
	lv := &liveVol{rec: rec, target: t, src: src}
	if err := l.add(v, lv); err != nil {
		return err
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		err := t.Run(l.ctx)
		if err != nil && l.ctx.Err() == nil {
			l.s.log.Error("live restore stopped", "volume", rec.Volume, "image", rec.Image, "err", err)
		}
		if err == nil {
			src.close() // done: the repository is not needed any more
		}
	}()
	return nil
}

// add registers v and its live restore.
func (l *liveRestores) add(v *cow.Volume, lv *liveVol) error {
	if err := l.s.vols.Add(v); err != nil {
		v.Close()
		if lv.src != nil {
			lv.src.close()
		}
		return ConfigError{err}
	}
	l.mu.Lock()
	l.vols[v.Name()] = lv
	l.mu.Unlock()
	return nil
}

// completed marks volume name's record done (the map goes next).
func (l *liveRestores) completed(name string) error {
	l.mu.Lock()
	lv := l.vols[name]
	rec := lv.rec
	rec.State, rec.Done = liveDone, time.Now().UTC()
	l.mu.Unlock()
	if err := l.writeRecord(rec); err != nil {
		return err
	}
	l.mu.Lock()
	lv.rec = rec
	l.mu.Unlock()
	l.s.log.Info("live restore done", "volume", name, "image", rec.Image, "target", rec.Target, "after", rec.Done.Sub(rec.Started).Round(time.Millisecond))
	defer l.event("live_restore_done", name)
	return nil
}

func (l *liveRestores) event(kind, name string) {
	if l.s.api == nil {
		return
	}
	l.s.api.LiveRestoreEvent(kind, name, l.LiveRestore(name))
}

// stats are the live restores' figures for metrics.
func (l *liveRestores) stats() []metrics.LiveStat {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []metrics.LiveStat
	for name, lv := range l.vols {
		if lv.target == nil {
			continue
		}
		p := lv.target.Progress()
		if p.State == liverestore.StateDone {
			continue
		}
		out = append(out, metrics.LiveStat{Volume: name, Size: p.Size, Restored: p.Restored, Demand: p.Demand,
			Waiting: p.State == liverestore.StateWaiting || p.State == liverestore.StateCredentials})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Volume < out[j].Volume })
	return out
}

// close stops the background restores (the volumes are closed after).
func (l *liveRestores) close() {
	l.cancel()
	l.wg.Wait()
}

// closeSources closes the repositories, once the volumes are closed.
func (l *liveRestores) closeSources() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, lv := range l.vols {
		if lv.src != nil {
			lv.src.close()
		}
	}
}

// LiveRestore reports volume's live restore (nil: none).
func (l *liveRestores) LiveRestore(volume string) *umbrav1.LiveRestore {
	l.mu.Lock()
	lv, ok := l.vols[volume]
	l.mu.Unlock()
	if !ok || lv.target == nil {
		return nil
	}
	p := lv.target.Progress()
	return &umbrav1.LiveRestore{Image: p.Image, Repo: lv.rec.Repo, State: p.State, Error: p.Error, Size: p.Size, Restored: p.Restored,
		DemandChunks: p.Demand, Speed: p.Speed, EtaSeconds: int64(p.ETA.Seconds()), Rate: p.Rate}
}

// RestoreLive starts a live restore (api.LiveRestorer).
func (l *liveRestores) RestoreLive(ctx context.Context, req *umbrav1.RestoreLiveRequest) (string, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", api.ErrLiveRequest, fmt.Sprintf(format, a...))
	}
	switch {
	case req.GetRepo() == "":
		return "", bad("name the repository (--repo)")
	case req.GetImage() == "":
		return "", bad("name the image (see `umbra images list`)")
	case req.GetTarget() == "" || !filepath.IsAbs(req.GetTarget()):
		return "", bad("target %q: give the absolute path of a file to create or a block device (--to)", req.GetTarget())
	case req.GetRate() < 0:
		return "", bad("rate %d: want bytes a second, or 0 for no bound", req.GetRate())
	}
	target := filepath.Clean(req.GetTarget())
	// Asked again for a restore that runs: a new rate.
	l.mu.Lock()
	for _, lv := range l.vols {
		if lv.rec.Target == target && lv.target != nil {
			rec := lv.rec
			l.mu.Unlock()
			if rec.Image != req.GetImage() {
				return "", bad("%s is volume %s, restored live from image %s: choose another target", target, rec.Volume, rec.Image)
			}
			pf := l.passwordFile(req)
			if lv.src != nil {
				// Credentials given again (after a restart, the restore
				// may wait for them): a wrong password is refused here.
				if err := lv.src.give(ctx, pf, backup.Settings{Password: req.GetPassword(),
					Cred: backup.Credentials{AccessKey: req.GetS3AccessKey(), SecretKey: req.GetS3SecretKey()}}); err != nil {
					return "", err
				}
				lv.target.Retry()
			}
			rec.Rate = req.GetRate()
			if pf != "" {
				rec.PasswordFile = pf
			}
			if rec.State == liveRestoring {
				if err := l.writeRecord(rec); err != nil {
					return "", err
				}
			}
			l.mu.Lock()
			lv.rec.Rate, lv.rec.PasswordFile = rec.Rate, rec.PasswordFile
			l.mu.Unlock()
			lv.target.SetRate(rec.Rate)
			return rec.Volume, nil
		}
	}
	l.mu.Unlock()
	repo, err := backup.OpenWith(ctx, req.GetRepo(), backup.Settings{Password: req.GetPassword(),
		Cred: backup.Credentials{AccessKey: req.GetS3AccessKey(), SecretKey: req.GetS3SecretKey()}})
	if err != nil {
		if errors.Is(err, backup.ErrWrongPassword) || errors.Is(err, backup.ErrNeedPassword) || errors.Is(err, backup.ErrNoRepo) {
			return "", fmt.Errorf("%w: %v", api.ErrLiveRequest, err)
		}
		return "", err
	}
	ir, err := repo.OpenImage(ctx, req.GetImage())
	if err != nil {
		repo.Close()
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("%w: %v", api.ErrLiveRequest, err)
		}
		return "", err
	}
	name := req.GetVolume()
	if name == "" {
		name = ir.Image().Volume
	}
	if err := provider.ValidateID(name); err != nil {
		repo.Close()
		return "", bad("volume name %q: %v (give --volume NAME)", name, err)
	}
	if _, err := l.s.vols.Volume(name); err == nil {
		repo.Close()
		return "", fmt.Errorf("%w: a volume %s is served already: give the restored one another name (--volume NAME)", provider.ErrExists, name)
	}
	if _, err := os.Stat(l.recordPath(name)); err == nil {
		repo.Close()
		return "", fmt.Errorf("%w: %s holds the record of a volume %s: give another name (--volume NAME)", provider.ErrExists, l.recordPath(name), name)
	}
	rec := liveRecord{Version: liveRecordVersion, Volume: name, Target: target, Image: req.GetImage(), Size: ir.Size(), ChunkSize: ir.ChunkSize(),
		Repo: req.GetRepo(), PasswordFile: l.passwordFile(req),
		Rate: req.GetRate(), State: liveRestoring, Started: time.Now().UTC()}
	if fi, err := os.Stat(target); err == nil {
		for _, v := range l.s.vols.Volumes() {
			if vi, err := os.Stat(v.OriginPath()); err == nil && os.SameFile(fi, vi) {
				repo.Close()
				return "", bad("%s is the origin of volume %s of this service: choose another target", target, v.Name())
			}
		}
	}
	created, err := prepareTarget(target, ir.Size(), req.GetForce())
	if err != nil {
		repo.Close()
		return "", err
	}
	f, err := openTargetFile(target, created, ir.Size())
	fail := func(err error) (string, error) {
		if f != nil {
			f.Close()
		}
		os.Remove(l.mapPath(name))
		os.Remove(l.recordPath(name))
		if created {
			os.Remove(target)
		}
		repo.Close()
		return "", err
	}
	if err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(l.dir, 0o700); err != nil {
		return fail(err)
	}
	src := l.newSource(rec, backup.Settings{Password: req.GetPassword(),
		Cred: backup.Credentials{AccessKey: req.GetS3AccessKey(), SecretKey: req.GetS3SecretKey()}})
	src.set(repo, ir)
	// The map first, then the record: a record always has its map (or
	// says done).
	opts := l.targetOptions(rec)
	if fi, err := os.Stat(target); err == nil && fi.Mode().IsRegular() {
		opts.Holes = true // prepareTarget emptied it: zero chunks are holes already
	}
	opts.QuietStart = liveQuietStart
	t, err := liverestore.Create(cow.OSFS{}, f, l.mapPath(name), src, rec.Image, opts)
	if err != nil {
		return fail(err)
	}
	if err := l.writeRecord(rec); err != nil {
		t.Close()
		f = nil
		return fail(err)
	}
	if err := l.openTargetVolume(rec, t, src); err != nil {
		f = nil
		os.Remove(l.mapPath(name))
		os.Remove(l.recordPath(name))
		if created {
			os.Remove(target)
		}
		return "", err
	}
	l.s.log.Info("live restore started", "volume", name, "image", rec.Image, "target", target, "size", rec.Size, "repo", rec.Repo)
	l.event("live_restore_started", name)
	return name, nil
}

// prepareTarget checks a new live restore's target, creating a missing
// file of size bytes (created true); a regular file that holds data
// needs force, and is emptied first.
func prepareTarget(path string, size int64, force bool) (created bool, err error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return false, fmt.Errorf("%w: target %s: %v", api.ErrLiveRequest, path, err)
		}
		defer f.Close()
		if err := f.Truncate(size); err != nil {
			os.Remove(path)
			return false, fmt.Errorf("target %s: %w", path, err)
		}
		return true, nil
	case err != nil:
		return false, fmt.Errorf("target %s: %w", path, err)
	case fi.Mode().IsRegular():
		if fi.Size() > 0 && !force {
			return false, fmt.Errorf("%w: target %s exists and holds %d bytes: give --force to overwrite it, or another path", api.ErrLiveRequest, path, fi.Size())
		}
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return false, fmt.Errorf("target %s: %w", path, err)
		}
		defer f.Close()
		if err = f.Truncate(0); err == nil {
			err = f.Truncate(size)
		}
		if err != nil {
			return false, fmt.Errorf("target %s: %w", path, err)
		}
		return false, nil
	case fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0:
		if !force {
			return false, fmt.Errorf("%w: target %s is a block device: give --force to overwrite what it holds", api.ErrLiveRequest, path)
		}
		return false, nil
	}
	return false, fmt.Errorf("%w: target %s is neither a regular file nor a block device", api.ErrLiveRequest, path)
}

// openTargetFile opens a live restore's target (a block device
// exclusively) and claims it for this service.
func openTargetFile(path string, created bool, size int64) (cow.File, error) {
	flag := os.O_RDWR
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	isDev := fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0
	if isDev {
		flag |= os.O_EXCL
	}
	f, err := os.OpenFile(path, flag, 0)
	if errors.Is(err, syscall.EBUSY) {
		return nil, fmt.Errorf("%w: the device is in use (mounted, or held by another program); unmount it first", err)
	}
	if err != nil {
		return nil, err
	}
	if !isDev {
		if err := owner.Claim(f, "volume file", path, "another Umbra service serves this file: use that service, or stop it first"); err != nil {
			f.Close()
			return nil, err
		}
	} else if n, err := f.Seek(0, io.SeekEnd); err != nil || n < size {
		f.Close()
		return nil, fmt.Errorf("%w: the device holds %d bytes and the image %d: restore to a device at least as large", api.ErrLiveRequest, n, size)
	}
	return liverestore.OSFile(f), nil
}

// passwordFile is the password file req names when it holds req's
// password now ("" otherwise): a file the service cannot read, or that
// says something else, would not give the password back after a restart.
func (l *liveRestores) passwordFile(req *umbrav1.RestoreLiveRequest) string {
	f := req.GetPasswordFile()
	if f == "" || !filepath.IsAbs(f) || req.GetPassword() == "" {
		return ""
	}
	if pw, err := readPassword(f); err != nil || pw != req.GetPassword() {
		l.s.log.Warn("live restore: the password file the request names does not give its password here; after a restart the restore will wait for the password", "file", f, "err", err)
		return ""
	}
	return f
}

func readPassword(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}

// newSource is rec's image, opened with given (credentials in memory:
// the request's, or a version 1 record's) or those the service finds
// again (liveCreds).
func (l *liveRestores) newSource(rec liveRecord, given backup.Settings) *lazySource {
	var repos []string
	for _, rc := range l.s.cfg.Web.Repositories {
		if rc.Location == rec.Repo && rc.PasswordFile != "" {
			repos = append(repos, rc.PasswordFile)
		}
	}
	return &lazySource{rec: rec, given: given, repoFiles: repos}
}

// lazySource is the image of a live restore, opened when first needed
// and again after a failure to open it: a service that starts while the
// repository is unreachable serves the restored chunks, fails reads of
// the others with EIO, and restores on once the repository answers.
// Concurrent callers share one attempt to open it.
//
// The credentials are never written down: a password and S3 keys given
// in this run are kept in memory (given); after a restart the password
// is read again from the file the request named (rec.PasswordFile), the
// password files the service's configuration gives for the repository
// ([[web.repository]]) or the service's $UMBRA_PASSWORD, and the S3 keys
// from its AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. When none opens
// it, the restore waits for credentials (liverestore.ErrNeedCredentials)
// until the same `restore --live` gives them again.
type lazySource struct {
	rec       liveRecord
	repoFiles []string // password files the configuration names for rec.Repo

	mu      sync.Mutex // guards the fields below
	repo    *backup.Repo
	ir      *backup.ImageReader
	given   backup.Settings
	attempt *openAttempt // the open under way, if any
	credErr error        // the last open failed for want of credentials, none given since
	closed  bool
}

// openAttempt is one attempt to open the image: done is closed when err
// is set.
type openAttempt struct {
	done chan struct{}
	err  error
}

func (s *lazySource) set(repo *backup.Repo, ir *backup.ImageReader) {
	s.mu.Lock()
	s.repo, s.ir = repo, ir
	s.mu.Unlock()
}

// get returns the image, opening it if need be. A caller that waited for
// an attempt begun before it asked, which failed, tries once itself (the
// repository may have come back meanwhile). A failure for want of
// credentials is returned at once until new ones are given.
func (s *lazySource) get(ctx context.Context) (*backup.ImageReader, error) {
	for try := 0; ; try++ {
		s.mu.Lock()
		switch {
		case s.ir != nil:
			ir := s.ir
			s.mu.Unlock()
			return ir, nil
		case s.closed:
			s.mu.Unlock()
			return nil, errors.New("the live restore is over")
		case s.credErr != nil:
			err := s.credErr
			s.mu.Unlock()
			return nil, err
		}
		a := s.attempt
		if a != nil {
			s.mu.Unlock()
			<-a.done
			if a.err == nil || try == 0 {
				continue
			}
			return nil, a.err
		}
		a = &openAttempt{done: make(chan struct{})}
		s.attempt = a
		given := s.given
		s.mu.Unlock()
		repo, ir, err := s.open(ctx, given)
		s.mu.Lock()
		s.attempt = nil
		a.err = err
		switch {
		case err == nil && s.closed:
			repo.Close()
			err = errors.New("the live restore is over")
		case err == nil:
			s.repo, s.ir = repo, ir
		case errors.Is(err, liverestore.ErrNeedCredentials):
			s.credErr = err
		}
		s.mu.Unlock()
		close(a.done)
		if err != nil {
			return nil, err
		}
		return ir, nil
	}
}

// open opens the repository with the first credentials that do, and the
// image.
func (s *lazySource) open(ctx context.Context, given backup.Settings) (*backup.Repo, *backup.ImageReader, error) {
	var passwords []string
	seen := map[string]bool{}
	add := func(pw string) {
		if !seen[pw] {
			seen[pw] = true
			passwords = append(passwords, pw)
		}
	}
	if given.Password != "" {
		add(given.Password)
	}
	for _, f := range append([]string{s.rec.PasswordFile}, s.repoFiles...) {
		if f == "" {
			continue
		}
		if pw, err := readPassword(f); err == nil && pw != "" {
			add(pw)
		}
	}
	if pw := os.Getenv("UMBRA_PASSWORD"); pw != "" {
		add(pw)
	}
	add("") // an unencrypted repository
	cred := given.Cred
	if strings.Contains(s.rec.Repo, "://") && (cred.AccessKey == "" || cred.SecretKey == "") &&
		(os.Getenv("AWS_ACCESS_KEY_ID") == "" || os.Getenv("AWS_SECRET_ACCESS_KEY") == "") {
		return nil, nil, fmt.Errorf("%w: no S3 keys for %s (the service's environment has no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY): give them again with `umbra restore %s --live --to %s`",
			liverestore.ErrNeedCredentials, s.rec.Repo, s.rec.Image, s.rec.Target)
	}
	for _, pw := range passwords {
		repo, err := backup.OpenWith(ctx, s.rec.Repo, backup.Settings{Password: pw, Cred: cred})
		if errors.Is(err, backup.ErrNeedPassword) || errors.Is(err, backup.ErrWrongPassword) || errors.Is(err, backup.ErrNotEncrypted) {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("open repository %s: %w", s.rec.Repo, err)
		}
		ir, err := repo.OpenImage(ctx, s.rec.Image)
		if err != nil {
			repo.Close()
			return nil, nil, err
		}
		return repo, ir, nil
	}
	return nil, nil, fmt.Errorf("%w: no password opens repository %s (none was found in a password file or $UMBRA_PASSWORD of the service): give it again with `umbra restore %s --live --to %s --password-file FILE`",
		liverestore.ErrNeedCredentials, s.rec.Repo, s.rec.Image, s.rec.Target)
}

// give takes credentials given again (and the password file to read
// after a restart, if any) and, while the image is not open, tries them
// at once: credentials that do not open the repository are an error for
// the request, and are not kept.
func (s *lazySource) give(ctx context.Context, passwordFile string, set backup.Settings) error {
	s.mu.Lock()
	oldGiven, oldFile, oldErr := s.given, s.rec.PasswordFile, s.credErr
	if set.Password != "" {
		s.given.Password = set.Password
	}
	if set.Cred.AccessKey != "" {
		s.given.Cred = set.Cred
	}
	if passwordFile != "" {
		s.rec.PasswordFile = passwordFile
	}
	s.credErr = nil
	open := s.ir != nil
	s.mu.Unlock()
	if open {
		return nil
	}
	_, err := s.get(ctx)
	if errors.Is(err, liverestore.ErrNeedCredentials) {
		s.mu.Lock()
		s.given, s.rec.PasswordFile, s.credErr = oldGiven, oldFile, oldErr
		s.mu.Unlock()
		return fmt.Errorf("%w: %v", api.ErrLiveRequest, err)
	}
	return nil // the repository may be away: the restore waits for it
}

func (s *lazySource) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.repo != nil {
		s.repo.Close()
	}
	s.repo, s.ir, s.closed = nil, nil, true
}

func (s *lazySource) Size() int64      { return s.rec.Size }
func (s *lazySource) ChunkSize() int64 { return s.rec.ChunkSize }

func (s *lazySource) Zero(i int64) (bool, error) {
	ir, err := s.get(context.Background())
	if err != nil {
		return false, err
	}
	return ir.Zero(i)
}

// Cached: nothing is, while the repository is not open.
func (s *lazySource) Cached(i int64) bool {
	s.mu.Lock()
	ir := s.ir
	s.mu.Unlock()
	return ir != nil && ir.Cached(i)
}

func (s *lazySource) ReadAt(p []byte, off int64) (int, error) {
	ir, err := s.get(context.Background())
	if err != nil {
		return 0, err
	}
	return ir.ReadAt(p, off)
}

func (s *lazySource) Stream(ctx context.Context, need func(int64) bool, put func(backup.StreamBatch) error) error {
	ir, err := s.get(ctx)
	if err != nil {
		return err
	}
	return ir.Stream(ctx, need, put)
}
