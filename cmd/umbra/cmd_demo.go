package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"umbra/cow"
	"umbra/provider"
)

func init() { verbs = append(verbs, newDemoCmd) }

// demoStep is one line of the demo's report.
type demoStep struct {
	Step   string `json:"step"`
	Detail string `json:"detail"`
	Millis int64  `json:"ms"`
}

func newDemoCmd() *cobra.Command {
	var dir string
	var size int64
	var engineOnly bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run Umbra's main job end to end on embedded defaults and print what was done",
		Long: `demo runs the main job on a sample volume under --dir (default: a new
temporary directory). As root, with /dev/fuse, losetup and e2fsprogs: it
starts umbra serve, puts ext4 on the volume through a loop device over the
service's FUSE file, runs a SQLite application that commits without pause,
takes an application-consistent full and then incremental backup into a
local repository, verifies it, restores the newest image and checks it
with e2fsck and SQLite. Otherwise it shows the copy-on-write engine alone:
a persistent shadow copy that keeps reading its commit point while the
volume changes.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if size < 64<<20 {
				return usageError{fmt.Errorf("--size %d: the sample volume needs at least 64 MiB", size)}
			}
			if dir == "" {
				d, err := os.MkdirTemp("", "umbra-demo-")
				if err != nil {
					return fmt.Errorf("demo: %w", err)
				}
				dir = d
			}
			if ok, why := canRunFullDemo(); ok && !engineOnly {
				return runBackupDemo(cmd.Context(), cmd.OutOrStdout(), dir, size)
			} else if !engineOnly && !gflags.json {
				fmt.Fprintf(cmd.OutOrStdout(), "(the full demo needs the kernel path: %s; showing the engine alone)\n", why)
			}
			return runDemo(cmd.Context(), cmd.OutOrStdout(), dir, size)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory for the sample volume and its shadow storage (default: a new temporary directory)")
	cmd.Flags().Int64Var(&size, "size", 256<<20, "size of the sample volume in bytes")
	cmd.Flags().BoolVar(&engineOnly, "engine-only", false, "show only the copy-on-write engine, without the kernel path")
	return cmd
}

func runDemo(ctx context.Context, out io.Writer, dir string, size int64) error {
	if size < 1<<20 {
		return usageError{fmt.Errorf("--size %d: the sample volume needs at least 1 MiB", size)}
	}
	if dir == "" {
		d, err := os.MkdirTemp("", "umbra-demo-")
		if err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		dir = d
	}
	var steps []demoStep
	step := func(start time.Time, name, format string, args ...any) {
		s := demoStep{Step: name, Detail: fmt.Sprintf(format, args...), Millis: time.Since(start).Milliseconds()}
		steps = append(steps, s)
		if !gflags.json {
			fmt.Fprintf(out, "%-10s %-6s %s\n", s.Step, fmt.Sprintf("%dms", s.Millis), s.Detail)
		}
	}

	t := time.Now()
	origin := filepath.Join(dir, "sample.img")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	f, err := os.Create(origin)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fmt.Errorf("demo: %w", err)
	}
	f.Close()
	vol, err := cow.Open("sample", origin, cow.Options{StorageDir: filepath.Join(dir, "shadow"), MaxStorage: size / 2})
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	defer vol.Close()
	step(t, "volume", "created %s (%d MiB, chunk %d KiB), shadow storage %s (max %d MiB)", origin, size>>20, vol.ChunkSize()>>10, filepath.Join(dir, "shadow"), size/2>>20)

	t = time.Now()
	block := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(block)) {
		for i := range block {
			block[i] = byte(off>>20) ^ byte(i)
		}
		if _, err := vol.WriteAt(block[:min(int64(len(block)), size-off)], off); err != nil {
			return fmt.Errorf("demo: write: %w", err)
		}
	}
	if err := vol.Flush(); err != nil {
		return err
	}
	before, err := hashReader(vol, size)
	if err != nil {
		return err
	}
	step(t, "write", "filled the volume; sha256 %s", before[:16])

	t = time.Now()
	snap, err := vol.CreateSnapshot(ctx, provider.SnapshotOptions{ID: "demo", Persistent: true})
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	step(t, "snapshot", "committed persistent shadow copy %s@%s", snap.Volume, snap.ID)

	t = time.Now()
	zeros := bytes.Repeat([]byte{0xee}, 4096)
	var changed int64
	for off := int64(0); off < size; off += 97 * 4096 {
		if _, err := vol.WriteAt(zeros, off); err != nil {
			return fmt.Errorf("demo: write: %w", err)
		}
		changed += 4096
	}
	step(t, "overwrite", "overwrote %d KiB at scattered places", changed>>10)

	t = time.Now()
	s, err := vol.OpenSnapshot(snap.ID)
	if err != nil {
		return err
	}
	got, err := hashReader(s, size)
	if err != nil {
		return err
	}
	if got != before {
		return fmt.Errorf("demo: shadow copy reads %s, want %s: this is a bug, please report it", got[:16], before[:16])
	}
	st := vol.Storage()
	step(t, "verify", "shadow copy still reads sha256 %s; diff area holds %d KiB for %d KiB changed", got[:16], st.Used>>10, changed>>10)

	bm, reliable, err := vol.Changed(snap.ID, "")
	if err != nil {
		return err
	}
	var n int
	for i := int64(0); i*bm.Granule < bm.Size; i++ {
		if bm.Set(i) {
			n++
		}
	}
	step(time.Now(), "tracking", "%d chunks changed since the shadow copy (reliable: %v)", n, reliable)
	if gflags.json {
		return printJSON(out, map[string]any{"dir": dir, "steps": steps})
	}
	fmt.Fprintf(out, "done: files are in %s\n", dir)
	return nil
}

func hashReader(r io.ReaderAt, size int64) (string, error) {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(r, 0, size)); err != nil {
		return "", fmt.Errorf("demo: read: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
