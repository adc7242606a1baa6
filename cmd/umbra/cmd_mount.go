package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"umbra/expose"
	"umbra/frontend"
	"umbra/fusefile"
	"umbra/internal/owner"
	"umbra/nbd"
)

func init() { verbs = append(verbs, newMountCmd) }

// newMountCmd serves a backup image in place, without restoring it: as a
// read-only NBD export on a unix socket, with --dir as a read-only file a
// loop device can carry, and with --fs as its filesystem mounted
// read-only. With --writable the image is served read-write, every
// write kept in an overlay file that is removed at the end (a backup
// booted in a VM, a restore tested). It runs until interrupted, then
// unmounts in order.
func newMountCmd() *cobra.Command {
	var rf repoFlags
	var socket, dir, fsDir, overlayDir string
	var writable bool
	cmd := &cobra.Command{
		Use:   "mount IMAGE",
		Short: "Serve a backup image over NBD (and as a file with --dir) without restoring it, read-only or with writes thrown away at the end (--writable); runs until Ctrl-C",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if writable && fsDir != "" {
				return usageError{errors.New("--fs mounts the filesystem read-only: with --writable use --dir and mount the file (losetup -f --show FILE; mount /dev/loopN DIR), or boot the NBD export")}
			}
			if !writable && cmd.Flags().Changed("overlay-dir") {
				return usageError{errors.New("--overlay-dir is where --writable keeps its writes: give --writable too")}
			}
			// Its heap is mostly the image reader's caches (opened blobs,
			// list segments, bounded) and a request buffer, whose blobs
			// turn over as reads move: collecting at half the live heap
			// keeps it at ~190-250 MiB instead of ~250-325 (1 and 16 Mi
			// chunks alike, docs/benchmarks.md).
			walkPace()
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			r, err := rf.open(ctx)
			if err != nil {
				return err
			}
			defer r.Close()
			ir, err := r.OpenImage(ctx, args[0])
			if err != nil {
				return notFoundError{err}
			}
			id := args[0]
			if socket == "" {
				socket = filepath.Join(defaultRuntimeDir(), "image-"+id+".sock")
			}
			os.MkdirAll(filepath.Dir(socket), 0o755)
			if err := owner.SocketFree(socket, "NBD socket", "--socket"); err != nil {
				return err
			}
			os.Remove(socket)
			l, err := net.Listen("unix", socket)
			if err != nil {
				return fmt.Errorf("--socket %s: %w", socket, err)
			}
			defer os.Remove(socket)
			exports := frontend.ImageExports(id, ir)
			files := frontend.ImageFUSESource(id, ir)
			out := map[string]string{"image": id, "nbd": fmt.Sprintf("nbd+unix:///%s?socket=%s", id, socket)}
			if writable {
				ov, err := frontend.NewOverlay(ir, overlayDir, id)
				if err != nil {
					return fmt.Errorf("--overlay-dir %s: %w", overlayDir, err)
				}
				defer ov.Close() // last: after the NBD server and the FUSE file stop
				x := ir.Image()
				exports = frontend.OverlayExports(id, fmt.Sprintf("backup image %s of %s, writes kept in %s and thrown away at the end", x.ID, x.Volume, ov.Path()), ov)
				files = frontend.OverlayFUSESource(id, ov)
				out["overlay"] = ov.Path()
			}
			srv := nbd.NewServer(exports, nbd.Options{Logger: slog.Default()})
			done := make(chan error, 1)
			go func() { done <- srv.Serve(ctx, l) }()
			served := false // Serve returned
			defer func() {  // before the overlay goes
				sctx, cancel := context.WithTimeout(context.Background(), 5e9)
				defer cancel()
				srv.Shutdown(sctx)
				if !served {
					<-done
				}
			}()
			if fsDir != "" && dir == "" { // the filesystem needs the file
				os.MkdirAll(defaultRuntimeDir(), 0o755)
				tmp, err := os.MkdirTemp(defaultRuntimeDir(), "image-file-")
				if err != nil {
					return fmt.Errorf("--fs: %w", err)
				}
				defer os.Remove(tmp)
				dir = tmp
			}
			if dir != "" {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					return fmt.Errorf("--dir %s: %w", dir, err)
				}
				m, err := fusefile.Mount(dir, files, fusefile.Options{})
				if err != nil {
					return fmt.Errorf("--dir %s: %w; is /dev/fuse there and are you root?", dir, err)
				}
				defer m.Unmount()
				out["file"] = filepath.Join(dir, id)
			}
			if fsDir != "" {
				mnt, err := expose.MountFile(out["file"], fsDir)
				if err != nil {
					return fmt.Errorf("--fs %s: %w", fsDir, err)
				}
				defer mnt.Unmount() // before the FUSE file goes (defers run last first)
				out["fs"], out["fstype"] = fsDir, mnt.FSType
			}
			if gflags.json {
				printJSON(os.Stdout, out)
			} else {
				if writable {
					fmt.Printf("serving image %s read-write; writes go to %s and are thrown away at the end\n  NBD: %s\n", id, out["overlay"], out["nbd"])
				} else {
					fmt.Printf("serving image %s read-only\n  NBD: %s\n", id, out["nbd"])
				}
				if f, ok := out["file"]; ok {
					fmt.Printf("  file: %s (e.g. losetup -r -f --show %s; mount -o ro,noload /dev/loopN /mnt)\n", f, f)
				}
				if d, ok := out["fs"]; ok {
					fmt.Printf("  files: %s (%s, read-only)\n", d, out["fstype"])
				}
				fmt.Println("Ctrl-C stops (it unmounts what it mounted; detach loop devices you attached first)")
			}
			select {
			case <-ctx.Done():
			case err := <-done:
				served = true
				if err != nil && !errors.Is(err, nbd.ErrServerClosed) {
					return err
				}
			}
			return nil
		},
	}
	rf.add(cmd)
	cmd.Flags().StringVar(&socket, "socket", "", "unix socket of the NBD export (default RUNTIME/image-IMAGE.sock)")
	cmd.Flags().StringVar(&dir, "dir", "", "also serve the image as a read-only file IMAGE in this directory (FUSE)")
	cmd.Flags().StringVar(&fsDir, "fs", "", "also mount the image's filesystem read-only at this directory (loop over the FUSE file; root)")
	cmd.Flags().BoolVar(&writable, "writable", false, "serve the image read-write: writes go to an overlay file (sparse, in --overlay-dir) that is removed at the end; the repository is never written")
	cmd.Flags().StringVar(&overlayDir, "overlay-dir", os.TempDir(), "directory of --writable's overlay file (it grows by what is written)")
	return cmd
}
