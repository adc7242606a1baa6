package jobs

import (
	"context"
	"log/slog"
	"os"
	"slices"
	"strings"
	"time"

	"umbra/api/umbrav1"
	"umbra/backup"
)

// Kind is one kind of job. Each lives in its own file (snapshot.go,
// backup.go, verify.go) and registers itself from that file's init.
type Kind struct {
	Name string
	// Check refuses a definition the kind cannot run, naming the field
	// (fieldErr); unused refuses the fields it does not read.
	Check func(d *Def) error
	// Run runs the job once. It fills out (bytes moved, a one-line
	// summary) as it goes, also when it fails; the error it returns
	// fails the run.
	Run func(ctx context.Context, env *Env, d *Def, out *Outcome) error
}

// Outcome is what a run reports beside success or failure.
type Outcome struct {
	Bytes  int64  // what the run moved: a backup's bytes written, a verify's bytes checked
	Detail string // one line: what it made, kept, deleted, found
}

var kinds = map[string]*Kind{}

// register adds a kind; called from the kind's file's init.
func register(k *Kind) { kinds[k.Name] = k }

// KindNames lists the kinds, sorted.
func KindNames() []string {
	var out []string
	for n := range kinds {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// API is the part of the service's API that jobs go through, so that a
// job's snapshot sets come from the coordinator and its deletions pass
// the same checks as `umbra snapshot delete`. *api.Server implements it.
type API interface {
	ListSnapshots(context.Context, *umbrav1.ListSnapshotsRequest) (*umbrav1.ListSnapshotsResponse, error)
	CreateSnapshotSet(context.Context, *umbrav1.CreateSnapshotSetRequest) (*umbrav1.CreateSnapshotSetResponse, error)
	DeleteSnapshots(context.Context, *umbrav1.DeleteSnapshotsRequest) (*umbrav1.DeleteSnapshotsResponse, error)
	ListShadowCopySets(context.Context, *umbrav1.ListShadowCopySetsRequest) (*umbrav1.ListShadowCopySetsResponse, error)
	Backup(context.Context, *umbrav1.BackupRequest) (*umbrav1.BackupResponse, error)
}

// Env is what a kind's Run may use.
type Env struct {
	API API
	Log *slog.Logger
	Now func() time.Time
}

// repoSettings are the secrets a job's repository opens with, read at
// each run (a rotated password file is picked up): the password from
// password_file or the service's $UMBRA_PASSWORD, and S3 credentials
// from the service's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, as
// `umbra backup` takes them.
func repoSettings(d *Def) (backup.Settings, error) {
	set := backup.Settings{Password: os.Getenv("UMBRA_PASSWORD"),
		Cred: backup.Credentials{AccessKey: os.Getenv("AWS_ACCESS_KEY_ID"), SecretKey: os.Getenv("AWS_SECRET_ACCESS_KEY")}}
	if d.PasswordFile != "" {
		b, err := os.ReadFile(d.PasswordFile)
		if err != nil {
			return set, fieldErr(d, "password_file", "%w", err)
		}
		if set.Password = strings.TrimRight(string(b), "\r\n"); set.Password == "" {
			return set, fieldErr(d, "password_file", "%s is empty", d.PasswordFile)
		}
	}
	return set, nil
}
