package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"umbra/api/umbrav1"
	"umbra/writer"
)

func init() { verbs = append(verbs, newSambaCmd) }

// snapDirName is where the snapshots of a filesystem are mounted, at its
// root, for Samba's shadow_copy2 (its default shadow:snapdir).
const snapDirName = ".snapshots"

// gmtFormat names snapshots as shadow_copy2's default shadow:format.
const gmtFormat = "2006.01.02-15.04.05"

// newSambaCmd gives Samba the three commands of vfs_shell_snap (FSRVP
// from Windows: check a share path, create a snapshot and print its
// path, delete it) and lays the snapshots out for vfs_shadow_copy2
// (Windows "Previous Versions"): each is mounted read-only at
// MOUNTPOINT/.snapshots/@GMT-YYYY.MM.DD-hh.mm.ss. smb.conf lines are in
// docs/samba.md.
func newSambaCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "samba", Short: "Commands for Samba: vfs_shell_snap's check/create/delete, snapshots laid out for shadow_copy2"}
	check := &cobra.Command{
		Use:   "check PATH",
		Short: "Exit 0 if the share path is on a volume Umbra can shadow-copy (shell_snap:check path command)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				vol, err := volumeOf(ctx, c, args[0])
				if err != nil || !gflags.json { // Samba only reads the exit code
					return err
				}
				return printJSON(os.Stdout, map[string]string{"path": args[0], "volume": vol})
			})
		},
	}
	create := &cobra.Command{
		Use:   "create PATH",
		Short: "Take an application-consistent persistent snapshot of the volume holding PATH, mount it for shadow_copy2, print PATH inside it (shell_snap:create command)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			path, err := filepath.Abs(args[0])
			if err != nil {
				return usageError{err}
			}
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				vol, err := volumeOf(ctx, c, path)
				if err != nil {
					return err
				}
				root, err := mountPointOf(path)
				if err != nil {
					return err
				}
				var id string
				for {
					id = "GMT-" + time.Now().UTC().Format(gmtFormat)
					_, err = c.CreateSnapshotSet(ctx, &umbrav1.CreateSnapshotSetRequest{Volumes: []string{vol}, Writers: true, Persistent: true, Id: id})
					if err == nil || !strings.Contains(err.Error(), "exists") {
						break
					}
					time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second))) // one name per second
				}
				if err != nil {
					return err
				}
				dir := filepath.Join(root, snapDirName, "@"+id)
				if _, err := c.ExposeSnapshot(ctx, &umbrav1.ExposeSnapshotRequest{Volume: vol, Id: id, Dir: dir}); err != nil {
					c.DeleteSnapshots(ctx, &umbrav1.DeleteSnapshotsRequest{Volume: vol, Id: id})
					return err
				}
				rel, _ := filepath.Rel(root, path)
				if gflags.json {
					return printJSON(os.Stdout, map[string]string{"path": filepath.Join(dir, rel), "volume": vol, "snapshot": id})
				}
				fmt.Println(filepath.Join(dir, rel)) // what shell_snap reads
				return nil
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete BASE-PATH SNAPSHOT-PATH",
		Short: "Unmount and delete the snapshot that SNAPSHOT-PATH (printed by create) lies in (shell_snap:delete command)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var id, expDir string // the snapshot and where create exposed it
			parts := strings.Split(filepath.Clean(args[1]), string(filepath.Separator))
			for i, part := range parts {
				if strings.HasPrefix(part, "@GMT-") {
					id, expDir = part[1:], "/"+filepath.Join(parts[:i+1]...)
				}
			}
			if id == "" {
				return usageError{fmt.Errorf("%s is not a snapshot path made by `umbra samba create` (no @GMT- component)", args[1])}
			}
			return call(cmd.Context(), func(ctx context.Context, c umbrav1.UmbraClient) error {
				vol, err := volumeOf(ctx, c, args[0])
				if err != nil {
					return err
				}
				// The snapshot is in use by its own exposure (what create
				// mounted): force unexposes it first. Anyone else it cuts
				// off is named.
				resp, err := c.DeleteSnapshots(ctx, &umbrav1.DeleteSnapshotsRequest{Volume: vol, Id: id, Force: true})
				if err != nil {
					return err
				}
				for _, cut := range resp.CutOff {
					if cut != vol+"@"+id+": exposed at "+expDir {
						fmt.Fprintf(os.Stderr, "umbra: deleted while in use: %s\n", cut)
					}
				}
				if !gflags.json {
					return nil
				}
				return printJSON(os.Stdout, map[string]string{"volume": vol, "snapshot": id, "deleted": "true"})
			})
		},
	}
	cmd.AddCommand(check, create, del)
	return cmd
}

// volumeOf asks the service which volume holds path (exit 3 if none).
func volumeOf(ctx context.Context, c umbrav1.UmbraClient, path string) (string, error) {
	r, err := c.IsPathSupported(ctx, &umbrav1.PathRequest{Path: path})
	if err != nil {
		return "", err
	}
	if !r.Supported {
		return "", notFoundError{errors.New(r.WhyNot)}
	}
	return r.Volume, nil
}

// mountPointOf returns the mount point of the filesystem holding path.
func mountPointOf(path string) (string, error) {
	mounts, err := writer.ReadMounts()
	if err != nil {
		return "", err
	}
	best := ""
	for _, m := range mounts {
		if writer.Under(path, m.Point) && len(m.Point) > len(best) && !strings.Contains(m.Point, string(filepath.Separator)+snapDirName+string(filepath.Separator)) {
			best = m.Point
		}
	}
	if best == "" {
		return "", fmt.Errorf("%s: no mounted filesystem holds it", path)
	}
	if _, err := os.Stat(best); err != nil {
		return "", err
	}
	return best, nil
}
