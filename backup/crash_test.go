package backup_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"umbra/backup"
	"umbra/internal/testutil"
	"umbra/provider"
)

// genData is generation k of the crash test's volume: a base image with
// 64 chunks rewritten per generation.
func genData(k int) memSource {
	src := volumeData(rand.New(rand.NewPCG(41, 42)), 8<<20)
	for g := 1; g <= k; g++ {
		r := rand.New(rand.NewPCG(uint64(g), 43))
		for i := 0; i < 64; i++ {
			off := r.IntN(len(src)/4096) * 4096
			for j := off; j < off+4096; j++ {
				src[j] = byte(r.Uint32())
			}
		}
	}
	return src
}

// changedSince is the change bitmap of generation k against generation
// j: the chunks genData rewrote after j up to k.
func changedSince(j, k, size int) *provider.Bitmap {
	bm := &provider.Bitmap{Granule: 4096, Size: int64(size), Bits: make([]uint64, (size/4096+63)/64)}
	for g := j + 1; g <= k; g++ {
		r := rand.New(rand.NewPCG(uint64(g), 43))
		for i := 0; i < 64; i++ {
			c := r.IntN(size / 4096)
			for range 4096 {
				r.Uint32()
			}
			bm.Bits[c/64] |= 1 << (c % 64)
		}
	}
	return bm
}

// TestKillDuringBackupAndPrune: a child process backs up generation after
// generation (two in three incrementals of the newest image, from the
// chunks rewritten since; every other child with segments of a whole
// batch, so that the incrementals patch segments from the changed
// chunks alone) and prunes between them; it is killed with SIGKILL at
// random moments. After each kill the repository verifies clean, every listed
// image restores to exactly its generation, and a backup and a prune
// still work (the dead process's lock is noticed as stale).
func TestKillDuringBackupAndPrune(t *testing.T) {
	if dir := os.Getenv("UMBRA_BACKUP_CRASH_CHILD"); dir != "" {
		crashChild(dir)
		return
	}
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "repo")
	repo, err := backup.Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	repo.Close()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("UMBRA_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (UMBRA_SEED replays)", seed)
	r := rand.New(rand.NewPCG(seed, 1))
	rounds := 6
	if os.Getenv("UMBRA_LONG") != "" {
		rounds = 40
	}
	for round := 0; round < rounds; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestKillDuringBackupAndPrune$")
		cmd.Env = append(os.Environ(), "UMBRA_BACKUP_CRASH_CHILD="+dir, fmt.Sprintf("UMBRA_BACKUP_CRASH_SEGMENT=%d", []int{100, 1024}[round%2]))
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// The kill lands after the child has finished a random number of
		// backups and prunes (it reports each on stdout), then a random
		// moment into the next one: how far the child gets does not
		// depend on how fast this machine is at the time.
		done := make(chan string)
		go func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				done <- sc.Text()
			}
			close(done)
		}()
		want := r.IntN(4)
		if round == 1 && want == 0 {
			want = 2 // at least one round kills a child that has finished a backup
		}
		backups := 0
		for i := 0; i < want; i++ {
			line := testutil.Receive(t, done, "the crash child's progress")
			if line == "" {
				t.Fatalf("round %d: the child exited before it reported %d steps", round, want)
			}
			if strings.HasPrefix(line, "backup ") {
				backups++
			}
		}
		time.Sleep(time.Duration(r.IntN(300)) * time.Millisecond)
		cmd.Process.Kill()
		go func() {
			for range done {
			}
		}()
		cmd.Wait()

		repo, err := backup.Open(dir)
		if err != nil {
			t.Fatalf("round %d: open after kill: %v", round, err)
		}
		if rep := repo.Verify(); len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes) > 0 {
			t.Fatalf("round %d: repository damaged by kill -9: %+v", round, rep)
		}
		list, _ := repo.Images()
		for _, x := range list {
			k, _ := strconv.Atoi(strings.TrimPrefix(x.Snapshot, "gen-"))
			out := filepath.Join(t.TempDir(), "out.img")
			if err := repo.Restore(x.ID, out, nil); err != nil {
				t.Fatalf("round %d: restore %s: %v", round, x.ID, err)
			}
			got, _ := os.ReadFile(out)
			if !bytes.Equal(got, genData(k)) {
				t.Fatalf("round %d: image %s does not restore generation %d", round, x.ID, k)
			}
		}
		if backups > 0 && len(list) == 0 {
			t.Fatalf("round %d: the child reported %d finished backups, but no image is listed", round, backups)
		}
		t.Logf("round %d: killed after %d steps (%d backups): %d images listed and restored", round, want, backups, len(list))
		repo.Close()
	}
	repo, err = backup.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close()
	if _, _, err := repo.Backup(ctx, genData(0), backup.Options{Volume: "v", Snapshot: "gen-0"}); err != nil {
		t.Fatalf("backup after the kills: %v", err)
	}
	if _, err := repo.Prune(ctx, backup.Policy{Last: 1}, false); err != nil {
		t.Fatalf("prune after the kills: %v", err)
	}
	if rep := repo.Verify(); rep.GoodImages != 1 || len(rep.BadChunks)+len(rep.BadImages)+len(rep.BadIndexes) > 0 {
		t.Fatalf("verify at the end: %+v", rep)
	}
	// Segments of lists whose backup was killed are gone with the prune.
	last, _ := repo.Images()
	if got, want := backup.ObjectNames(repo, "segments/"), backup.SegmentObjects(repo, last[0].ID); !slices.Equal(got, want) || len(backup.ObjectNames(repo, "lists/")) > 0 {
		t.Fatalf("%d chunk-list objects after the final prune, want the kept image's %d", len(got), len(want))
	}
}

func crashChild(dir string) {
	ctx := context.Background()
	// 100: 21 segments an image, kills land between them; 1024: one
	// batch a segment, incrementals patch segments from the changed
	// chunks alone.
	seg, _ := strconv.Atoi(os.Getenv("UMBRA_BACKUP_CRASH_SEGMENT"))
	backup.SetSegmentChunks(int64(max(seg, 100)))
	backup.SetSmallPacks(128<<10, 2) // and between the index objects a backup writes as it goes
	repo, err := backup.Open(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(1)
	}
	list, _ := repo.Images()
	var parent *backup.Image // the newest generation
	pk := -1
	for _, x := range list {
		if k, _ := strconv.Atoi(strings.TrimPrefix(x.Snapshot, "gen-")); k > pk {
			parent, pk = x, k
		}
	}
	gen := len(list) + int(time.Now().UnixNano()%7)
	for ; ; gen++ {
		data := genData(gen)
		opts := backup.Options{Volume: "v", Snapshot: fmt.Sprintf("gen-%d", gen)}
		if parent != nil && pk < gen && gen%3 != 0 {
			opts.Parent, opts.Changed = parent, changedSince(pk, gen, len(data))
		}
		x, _, err := repo.Backup(ctx, data, opts)
		if err != nil {
			fmt.Fprintln(os.Stderr, "child backup:", err)
			os.Exit(1)
		}
		parent, pk = x, gen
		fmt.Printf("backup %s\n", opts.Snapshot)
		if gen%2 == 0 {
			if _, err := repo.Prune(ctx, backup.Policy{Last: 2}, false); err != nil {
				fmt.Fprintln(os.Stderr, "child prune:", err)
				os.Exit(1)
			}
			fmt.Println("prune")
		}
	}
}
