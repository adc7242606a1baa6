package cow

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"umbra/internal/testutil"
	"umbra/provider"
)

// TestKillDuringWrites runs a child process that writes continuously,
// takes and deletes persistent snapshots and journals each snapshot's
// content hash; the parent SIGKILLs it at random moments and checks, after
// each kill, that every journaled snapshot reads exactly its commit-time
// bytes (or is invalid with a reason) and that no diff-area space leaks.
func TestKillDuringWrites(t *testing.T) {
	if os.Getenv("UMBRA_CRASH_CHILD") != "" {
		crashChild()
		return
	}
	rounds := 6
	if os.Getenv("UMBRA_LONG") != "" {
		rounds = 60
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 1))
	dir := t.TempDir()
	origin := filepath.Join(dir, "origin")
	if err := os.WriteFile(origin, make([]byte, 4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	opts := Options{StorageDir: filepath.Join(dir, "diff")}
	journal := filepath.Join(dir, "journal")
	for round := 0; round < rounds; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestKillDuringWrites$")
		cmd.Env = append(os.Environ(), "UMBRA_CRASH_CHILD="+dir, fmt.Sprintf("UMBRA_CRASH_SEED=%d", seed+uint64(round)))
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// The kill lands after the child has journaled a random number of
		// snapshots and deletions (it reports each on stdout), then a
		// random moment into what follows: how far the child gets does
		// not depend on how fast this machine is at the time.
		steps := make(chan string)
		go func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				steps <- sc.Text()
			}
			close(steps)
		}()
		nsteps := r.IntN(5)
		if round == 1 && nsteps == 0 {
			nsteps = 2 // at least one round kills a child that has journaled snapshots
		}
		snapped := false // the child took a snapshot and wrote over data under it
		for i := 0; i < nsteps; i++ {
			switch testutil.Receive(t, steps, "the crash child's progress") {
			case "":
				t.Fatalf("round %d: the child exited before it reported %d steps", round, nsteps)
			case "snap":
				snapped = true
			}
		}
		time.Sleep(time.Duration(r.IntN(300)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		go func() {
			for range steps {
			}
		}()
		cmd.Wait()

		v, err := Open("v", origin, opts)
		if err != nil {
			t.Fatalf("round %d: reopen after SIGKILL: %v", round, err)
		}
		if errs := v.RecoveryErrors(); len(errs) > 0 {
			t.Fatalf("round %d: recovery errors: %v", round, errs)
		}
		// The log the child left holds mapping records written with their
		// data (checksummed), which the replay checked against the slots.
		if snapped && v.replayVerified+v.replayDropped == 0 {
			t.Fatalf("round %d: the replay met no mapping record with a data checksum", round)
		}
		want, deleting := readJournal(t, journal)
		live := map[string]provider.Snapshot{}
		for _, s := range v.Snapshots() {
			live[s.ID] = s
		}
		checked := 0
		for id, sum := range want {
			s, ok := live[id]
			if !ok {
				if deleting[id] {
					continue
				}
				t.Fatalf("round %d: journaled snapshot %s is gone", round, id)
			}
			if !s.Valid {
				if s.Reason == "" {
					t.Fatalf("round %d: %s invalid without reason", round, id)
				}
				continue
			}
			h, err := v.OpenSnapshot(id)
			if err != nil {
				t.Fatal(err)
			}
			if got := hashOf(t, h, v.Size()); got != sum {
				t.Fatalf("round %d: snapshot %s reads %s, journaled %s", round, id, got[:12], sum[:12])
			}
			checked++
		}
		v.mu.RLock()
		refs := map[int64]bool{}
		v.entries.Ascend(func(e entry) bool {
			if e.slot != zeroSlot {
				refs[e.slot] = true
			}
			return true
		})
		if v.store != nil && v.store.used() != int64(len(refs)) {
			t.Fatalf("round %d: leak: %d slots used, %d referenced", round, v.store.used(), len(refs))
		}
		v.mu.RUnlock()
		t.Logf("round %d: killed after %d steps: %d snapshots checked byte-exact, %d live; replay kept %d checksummed mapping records, dropped %d", round, nsteps, checked, len(live), v.replayVerified, v.replayDropped)
		if r.IntN(2) == 0 {
			v.Close() // sometimes the next child starts after a clean stop
		} else {
			abandon(v) // and sometimes after one as unclean as the kill
		}
	}
}

// abandon lets the volume's files go as a killed process does: no
// checkpoint, no clean record; only the descriptors (and with them the
// claims) go.
func abandon(v *Volume) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.closed = true
	if v.log != nil {
		v.log.f.Close()
	}
	if v.store != nil {
		v.store.close()
	}
	v.unmapOrigin()
	v.origin.Close()
	v.storageOwn.Release()
}

func hashOf(t *testing.T, r io.ReaderAt, size int64) string {
	t.Helper()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(r, 0, size)); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func readJournal(t *testing.T, path string) (want map[string]string, deleting map[string]bool) {
	want, deleting = map[string]string{}, map[string]bool{}
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		switch {
		case len(fields) == 3 && fields[0] == "snap":
			want[fields[1]] = fields[2]
		case len(fields) == 2 && fields[0] == "del":
			deleting[fields[1]] = true
		}
	}
	return
}

// crashChild is the process the test kills.
func crashChild() {
	dir := os.Getenv("UMBRA_CRASH_CHILD")
	seed, _ := strconv.ParseUint(os.Getenv("UMBRA_CRASH_SEED"), 10, 64)
	r := rand.New(rand.NewPCG(seed, 2))
	v, err := Open("v", filepath.Join(dir, "origin"), Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		os.Exit(1)
	}
	j, err := os.OpenFile(filepath.Join(dir, "journal"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		os.Exit(1)
	}
	// note journals a step; the parent counts the steps ("snap" or "del")
	// to choose when to kill.
	note := func(step, format string, args ...any) {
		fmt.Fprintf(j, format+"\n", args...)
		j.Sync()
		fmt.Println(step)
	}
	buf := make([]byte, 64<<10)
	var n int
	var off int64
	write := func() {
		for k := range buf[:n] {
			buf[k] = byte(r.Uint32())
		}
		if _, err := v.WriteAt(buf[:n], off); err != nil {
			fmt.Fprintln(os.Stderr, "child write:", err)
			os.Exit(1)
		}
	}
	for i := 0; ; i++ {
		n = 1 + r.IntN(len(buf))
		off = r.Int64N(v.Size() - int64(n))
		write()
		switch {
		case i%40 == 0:
			id := fmt.Sprintf("p%d-%d", seed, i)
			if _, err := v.CreateSnapshot(context.Background(), provider.SnapshotOptions{ID: id, Persistent: true}); err != nil {
				fmt.Fprintln(os.Stderr, "child snapshot:", err)
				os.Exit(1)
			}
			h, _ := v.OpenSnapshot(id)
			sum := sha256.New()
			io.Copy(sum, io.NewSectionReader(h, 0, v.Size()))
			// Written over again: the snapshot keeps the data written just
			// before it, with a checksummed mapping record, before the
			// parent hears of it.
			write()
			note("snap", "snap %s %s", id, hex.EncodeToString(sum.Sum(nil)))
		case i%40 == 20:
			if list := v.Snapshots(); len(list) > 3 {
				victim := list[r.IntN(len(list))].ID // oldest, middle or newest
				note("del", "del %s", victim)
				if err := v.DeleteSnapshot(victim); err != nil {
					fmt.Fprintln(os.Stderr, "child delete:", err)
					os.Exit(1)
				}
			}
		case i%13 == 0:
			v.Flush()
		}
	}
}
