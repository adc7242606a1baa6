package coordinator

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"umbra/cow"
	"umbra/frontend"
	"umbra/fusefile"
	"umbra/internal/testutil"
	"umbra/provider"
	"umbra/writer"
	"umbra/writer/fsfreeze"
	wpg "umbra/writer/postgres"
)

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestPostgresUnderLoad: a PostgreSQL data directory on an Umbra volume
// (ext4 on loop over the FUSE file) under pgbench load; a snapshot set with
// the PostgreSQL and fsfreeze writers; the snapshot's data directory,
// copied out with the writer's backup_label, starts with pg_ctl, recovers
// only to the backup's end, and pg_dump of it succeeds.
func TestPostgresUnderLoad(t *testing.T) {
	testutil.NeedRoot(t)
	testutil.Need(t, "losetup", "mkfs.ext4", "runuser", "pgbench", "pg_dump")
	initdb, pgctl := testutil.PGBin("initdb"), testutil.PGBin("pg_ctl")
	if initdb == "" || pgctl == "" {
		t.Skip("needs the PostgreSQL server (apt-get install postgresql)")
	}
	testutil.NeedFUSE(t)
	dir := t.TempDir()
	// The postgres user must reach the data directory.
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o755)
	origin := filepath.Join(dir, "vol.img")
	testutil.SparseFile(t, origin, 256<<20)
	v, err := cow.Open("pg", origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
	if err != nil {
		t.Fatal(err)
	}
	p := cow.NewProvider()
	p.Add(v)
	fuseDir := filepath.Join(dir, "fuse")
	os.Mkdir(fuseDir, 0o755)
	srv, err := fusefile.Mount(fuseDir, frontend.FUSESource(p), fusefile.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Unmount(); v.Close() })
	dev := testutil.Losetup(t, filepath.Join(fuseDir, "pg"), false, true)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := testutil.Mount(t, dev, dir)
	os.Chmod(mnt, 0o755)
	pgdata := filepath.Join(mnt, "pgdata")
	sockDir := filepath.Join(dir, "sock")
	os.Mkdir(sockDir, 0o777)
	os.Mkdir(pgdata, 0o700)
	testutil.Run(t, "chown", "postgres:postgres", pgdata, sockDir)
	testutil.AsPostgres(t, initdb, "-D", pgdata, "-A", "trust", "-U", "postgres")
	port := freePort(t)
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses='' -c fsync=on", port, sockDir)
	testutil.AsPostgres(t, pgctl, "-D", pgdata, "-o", opts, "-w", "-l", filepath.Join(sockDir, "log"), "start")
	t.Cleanup(func() {
		exec.Command("runuser", "-u", "postgres", "--", pgctl, "-D", pgdata, "-m", "immediate", "stop").Run()
	})
	pgArgs := []string{"-h", sockDir, "-p", fmt.Sprint(port), "-U", "postgres"}
	testutil.AsPostgres(t, append(append([]string{"pgbench"}, pgArgs...), "-i", "-q", "-s", "2", "postgres")...)
	load := exec.Command("runuser", append(append([]string{"-u", "postgres", "--", "pgbench"}, pgArgs...), "-c", "2", "-T", "30", "postgres")...)
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { load.Process.Kill(); load.Wait() })
	// The set is taken under load: once pgbench has committed.
	testutil.WaitFor(t, "pgbench commits a transaction", func() bool {
		n := testutil.AsPostgres(t, append(append([]string{"psql"}, pgArgs...), "-At", "-c", "SELECT count(*) FROM pgbench_history", "postgres")...)
		return strings.TrimSpace(n) != "0"
	})

	reg := &provider.Registry{}
	reg.Register(p)
	ws := writer.NewRegistry()
	ws.Add(fsfreeze.New())
	pw := wpg.New(fmt.Sprintf("host=%s port=%d user=postgres dbname=postgres", sockDir, port), pgdata)
	ws.Add(pw)
	c := New(reg, ws, func(vol string) []string { return []string{filepath.Join(fuseDir, vol)} }, nil)
	set, err := c.CreateSet(context.Background(), Request{Volumes: []string{"pg"}, Writers: true})
	if err != nil {
		t.Fatal(err)
	}
	labels, ok := pw.Labels(set.ID)
	if !ok || !strings.Contains(labels.BackupLabel, "START WAL LOCATION") {
		t.Fatalf("no backup_label for the set: %+v", labels)
	}
	load.Process.Kill()

	// Copy the snapshot's data directory out, add backup_label, start it.
	sdev, detach := testutil.Attach(t, filepath.Join(fuseDir, "pg@"+set.Snapshots[0].ID), true, true)
	defer detach()
	smnt := testutil.Mount(t, sdev, dir, "ro", "noload")
	copyDir := filepath.Join(dir, "restored")
	testutil.Run(t, "cp", "-a", filepath.Join(smnt, "pgdata"), copyDir)
	testutil.Run(t, "umount", smnt)
	os.Remove(filepath.Join(copyDir, "postmaster.pid"))
	// The WAL written between the snapshot and pg_backup_stop is in the
	// live cluster's pg_wal (a backup tool would take it from the archive).
	segs, _ := filepath.Glob(filepath.Join(pgdata, "pg_wal", "0000*"))
	testutil.Run(t, "cp", append(segs, filepath.Join(copyDir, "pg_wal"))...)
	os.WriteFile(filepath.Join(copyDir, "backup_label"), []byte(labels.BackupLabel), 0o600)
	testutil.Run(t, "chown", "-R", "postgres:postgres", copyDir)
	port2 := freePort(t)
	logFile := filepath.Join(sockDir, "restored.log")
	if out, err := exec.Command("runuser", "-u", "postgres", "--", pgctl, "-D", copyDir, "-o", fmt.Sprintf("-p %d -k %s -c listen_addresses=''", port2, sockDir), "-w", "-l", logFile, "start").CombinedOutput(); err != nil {
		log, _ := os.ReadFile(logFile)
		t.Fatalf("starting the restored snapshot: %v %s\n%s", err, out, log)
	}
	defer exec.Command("runuser", "-u", "postgres", "--", pgctl, "-D", copyDir, "-m", "fast", "stop").Run()
	dump := testutil.AsPostgres(t, "pg_dump", "-h", sockDir, "-p", fmt.Sprint(port2), "-U", "postgres", "postgres")
	if !strings.Contains(dump, "pgbench_accounts") {
		t.Fatal("pg_dump of the restored snapshot lacks pgbench_accounts")
	}
	log, _ := os.ReadFile(logFile)
	if !strings.Contains(string(log), "starting backup recovery") && !strings.Contains(string(log), "backup_label") {
		t.Logf("server log:\n%s", log)
	}
	if strings.Contains(string(log), "database system was not properly shut down") {
		t.Fatalf("the restored snapshot needed crash recovery:\n%s", log)
	}
	t.Logf("set %s: freeze to thaw %v; restored cluster dumped %d bytes", set.ID, set.Timings.FreezeToThaw, len(dump))
}
