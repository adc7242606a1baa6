package backup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Locks are objects under locks/: backups take shared locks (they only
// add), prune takes an exclusive one (it deletes). A lock is refreshed
// while its holder runs. While its operation runs, the holder also keeps
// an flock on a file of this host named by the lock's token
// (liveFile): a lock whose file is there and not locked belongs to an
// operation that ended — its holder may well be alive (the service),
// and the lock object still there because deleting it failed (an S3
// outage) — and is stale. So is one not refreshed for lockStale, or
// whose holder is a process on this host that no longer exists (kill
// -9). The next locker, and `umbra repo unlock`, remove stale locks; a
// holder whose delete failed tries again at its next lock and at Close.

// ErrLocked: another process holds a conflicting lock.
var ErrLocked = errors.New("the repository is locked")

type lockInfo struct {
	Host      string    `json:"host"`
	PID       int       `json:"pid"`
	Op        string    `json:"op"`
	Exclusive bool      `json:"exclusive"`
	Created   time.Time `json:"created"`
	Refreshed time.Time `json:"refreshed"`
	// Token names the holder's liveness file on Host ("": none).
	Token string `json:"token,omitempty"`
}

var (
	lockStale   = 30 * time.Minute
	lockRefresh = 5 * time.Minute
)

// liveDir holds the liveness files of this host's locks: in /run (gone
// at a reboot, as the operations are), else the temporary directory.
func liveDir() string {
	if fi, err := os.Stat("/run"); err == nil && fi.IsDir() && unix.Access("/run", unix.W_OK) == nil {
		return "/run/umbra-repo-locks"
	}
	return filepath.Join(os.TempDir(), "umbra-repo-locks")
}

func liveFile(token string) string { return filepath.Join(liveDir(), token) }

// holdLive creates and flocks the liveness file of token; the returned
// file is closed when the operation ends (which drops the flock).
func holdLive(token string) (*os.File, error) {
	if err := os.MkdirAll(liveDir(), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(liveFile(token), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, err
	}
	return f, nil
}

// ended says whether the lock's operation has ended, as its liveness
// file on this host tells: known is false when there is none to ask.
func (l lockInfo) ended() (ended, known bool) {
	if l.Token == "" || strings.ContainsAny(l.Token, "/.") {
		return false, false
	}
	if host, _ := os.Hostname(); l.Host != host {
		return false, false
	}
	f, err := os.OpenFile(liveFile(l.Token), os.O_RDWR, 0)
	if err != nil {
		return false, false // gone (a cleaned /tmp?): the older rules decide
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return false, true // held: the operation runs
	}
	return true, true
}

func (l lockInfo) stale(now time.Time) bool {
	if ended, known := l.ended(); known {
		return ended
	}
	if now.Sub(l.Refreshed) > lockStale {
		return true
	}
	host, _ := os.Hostname()
	if l.Host == host && l.PID > 0 {
		err := syscall.Kill(l.PID, 0)
		return errors.Is(err, syscall.ESRCH)
	}
	return false
}

// removeLock deletes a lock object and then its liveness file.
func (r *Repo) removeLock(ctx context.Context, name string, l lockInfo) error {
	if err := r.be.Delete(ctx, name); err != nil {
		return err
	}
	if _, known := l.ended(); known {
		os.Remove(liveFile(l.Token))
	}
	return nil
}

// Lock takes a lock for op and returns its release. It fails with
// ErrLocked, naming the holder, when a live conflicting lock exists.
// An exclusive lock on a local repository whose filesystem is full is
// taken as an empty object that names its holder (noSpaceLock), so that
// prune and images delete can still free space.
func (r *Repo) Lock(ctx context.Context, op string, exclusive bool) (func(), error) {
	r.retryLeftLocks(ctx)
	host, _ := os.Hostname()
	now := time.Now().UTC()
	id := randomID()
	me := lockInfo{Host: host, PID: os.Getpid(), Op: op, Exclusive: exclusive, Created: now, Refreshed: now}
	live, err := holdLive(id)
	if err == nil {
		me.Token = id
	}
	done := func() {
		if live != nil {
			live.Close()
		}
	}
	name := "locks/" + id
	if err := r.checkLocks(ctx, "", exclusive); err != nil {
		done()
		os.Remove(liveFile(id))
		return nil, err
	}
	b, _ := json.Marshal(me)
	if err := r.be.Put(ctx, name, wrapObject(r.seal.seal(nil, b))); err != nil {
		name = ""
		if exclusive && isNoSpace(err) {
			name, err = r.noSpaceLock(me, err)
		}
		if name == "" {
			done()
			os.Remove(liveFile(id))
			return nil, fmt.Errorf("lock repository %s: %w", r.Location(), err)
		}
	}
	// Two lockers may have passed the first check together: look again
	// now that ours is visible; the later one backs off.
	if err := r.checkLocks(ctx, name, exclusive); err != nil {
		r.be.Delete(context.WithoutCancel(ctx), name)
		done()
		os.Remove(liveFile(id))
		return nil, err
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(lockRefresh)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				if strings.HasPrefix(name, noSpacePrefix) {
					continue // nothing to rewrite: it has no content
				}
				me.Refreshed = time.Now().UTC()
				b, _ := json.Marshal(me)
				r.be.Put(context.Background(), name, wrapObject(r.seal.seal(nil, b)))
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(stop)
			wg.Wait()
			// The operation has ended: whatever becomes of the object,
			// the liveness file says so from now on.
			done()
			if err := r.be.Delete(context.Background(), name); err != nil {
				r.mu.Lock()
				r.leftLocks = append(r.leftLocks, name)
				r.mu.Unlock()
				return
			}
			os.Remove(liveFile(id))
		})
	}, nil
}

// retryLeftLocks deletes the locks of this Repo's ended operations that
// could not be deleted when they ended.
func (r *Repo) retryLeftLocks(ctx context.Context) {
	r.mu.Lock()
	left := r.leftLocks
	r.leftLocks = nil
	r.mu.Unlock()
	for _, n := range left {
		if err := r.be.Delete(ctx, n); err != nil {
			r.mu.Lock()
			r.leftLocks = append(r.leftLocks, n)
			r.mu.Unlock()
			continue
		}
		if l, err := r.readLockName(n); err == nil {
			os.Remove(liveFile(l.Token))
		} else {
			os.Remove(liveFile(strings.TrimPrefix(n, "locks/")))
		}
	}
}

// noSpacePrefix starts the names of locks taken on a full filesystem:
// locks/nospace.TOKEN.PID.HOST, an empty object.
const noSpacePrefix = "locks/nospace."

func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// noSpaceLock takes me as an empty object whose name says who holds it:
// an empty file needs no data block, so it can be made on a full local
// filesystem. why is the error of the ordinary lock.
func (r *Repo) noSpaceLock(me lockInfo, why error) (string, error) {
	lb, ok := r.be.(*localBackend)
	if !ok || me.Token == "" {
		return "", why
	}
	name := fmt.Sprintf("%s%s.%d.%s", noSpacePrefix, me.Token, me.PID, me.Host)
	f, err := os.OpenFile(lb.path(name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("%w; and an empty lock file could not be made either: %v", why, err)
	}
	f.Close()
	return name, nil
}

// readLockName is the lock a noSpaceLock name describes.
func (r *Repo) readLockName(name string) (lockInfo, error) {
	rest, ok := strings.CutPrefix(name, noSpacePrefix)
	if !ok {
		return lockInfo{}, fmt.Errorf("%s: not a lock taken on a full filesystem", name)
	}
	parts := strings.SplitN(rest, ".", 3)
	if len(parts) != 3 {
		return lockInfo{}, corrupt(name, "not a lock name")
	}
	pid, err := strconv.Atoi(parts[1])
	if err != nil {
		return lockInfo{}, corrupt(name, "not a lock name")
	}
	// No refresh time: only its liveness file, or its process being
	// gone, makes it stale (or `umbra repo unlock --all`).
	return lockInfo{Host: parts[2], PID: pid, Op: "prune or delete on a full filesystem", Exclusive: true, Refreshed: time.Now(), Token: parts[0]}, nil
}

// checkLocks fails if a live lock other than self conflicts; stale
// locks are removed.
func (r *Repo) checkLocks(ctx context.Context, self string, exclusive bool) error {
	names, err := r.be.List(ctx, "locks/")
	if err != nil {
		return fmt.Errorf("lock repository %s: %w", r.Location(), err)
	}
	now := time.Now()
	for _, n := range names {
		if n == self {
			continue
		}
		l, err := r.readLock(ctx, n)
		if err != nil {
			continue // unreadable (mid-write or another key): ignore
		}
		if l.stale(now) {
			r.removeLock(ctx, n, l)
			continue
		}
		if exclusive || l.Exclusive {
			kind := "shared"
			if l.Exclusive {
				kind = "exclusive"
			}
			return fmt.Errorf("%w: %s lock by %q on %s pid %d since %s, still running as far as this host can tell; wait for it to finish "+
				"(a lock of this host goes when its operation ends; one of another host after %v without a refresh); "+
				"if you know it is not running, `umbra repo unlock --all --repo %s` removes every lock",
				ErrLocked, kind, l.Op, l.Host, l.PID, l.Created.Local().Format(time.DateTime), lockStale, r.Location())
		}
	}
	return nil
}

// Unlock removes every lock (all of them with all=true, else only stale
// ones) and returns how many it removed.
func (r *Repo) Unlock(ctx context.Context, all bool) (int, error) {
	names, err := r.be.List(ctx, "locks/")
	if err != nil {
		return 0, err
	}
	r.retryLeftLocks(ctx)
	n := 0
	for _, name := range names {
		l, err := r.readLock(ctx, name)
		if !all && err == nil && !l.stale(time.Now()) {
			continue
		}
		if strings.HasPrefix(name, "locks/") {
			if err := r.removeLock(ctx, name, l); err != nil {
				return n, err
			}
			n++
		}
	}
	return n, nil
}

func (r *Repo) readLock(ctx context.Context, name string) (lockInfo, error) {
	if strings.HasPrefix(name, noSpacePrefix) {
		return r.readLockName(name)
	}
	var l lockInfo
	// Locks of any format are read: a process that opened the repository
	// before its upgrade to the envelope may still hold one.
	b, err := r.be.Get(ctx, name, 0, -1)
	if err == nil {
		b, err = unwrapObject(name, b, true)
	}
	if err == nil {
		b, err = r.seal.open(nil, b)
	}
	if err == nil {
		if jerr := json.Unmarshal(b, &l); jerr != nil {
			err = corrupt(name, "not a lock: "+jerr.Error())
		}
	}
	return l, err
}
