package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"umbra/backup"
)

// repoFlags are the flags that name and open a backup repository.
type repoFlags struct {
	location     string
	passwordFile string
	// The names of the flags and of the environment variables (the
	// defaults when empty: --repo, --password-file, UMBRA_PASSWORD,
	// AWS_*): a command that opens two repositories names the second's
	// its own way (addAs).
	pwFlag, pwEnv, awsEnv string
}

func (f *repoFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.location, "repo", filepath.Join(defaultStateDir(), "repo"),
		"backup repository: a directory, or s3://HOST[:PORT]/BUCKET[/PREFIX] (s3+http:// without TLS; credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
	cmd.Flags().StringVar(&f.passwordFile, "password-file", "", "file holding the repository's password (default: $UMBRA_PASSWORD; none: not encrypted)")
}

// addAs adds --NAME (the repository, no default) and --NAME-password-file,
// whose default is $pwEnv; its S3 credentials come from
// ${awsEnv}ACCESS_KEY_ID and ${awsEnv}SECRET_ACCESS_KEY when set, else
// from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
func (f *repoFlags) addAs(cmd *cobra.Command, name, what, pwEnv, awsEnv string) {
	f.pwFlag, f.pwEnv, f.awsEnv = "--"+name+"-password-file", pwEnv, awsEnv
	creds := "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
	if awsEnv != "" {
		creds = awsEnv + "ACCESS_KEY_ID and " + awsEnv + "SECRET_ACCESS_KEY, else " + creds
	}
	cmd.Flags().StringVar(&f.location, name, "", what+" repository: a directory, or s3://HOST[:PORT]/BUCKET[/PREFIX] (s3+http:// without TLS; credentials from "+creds+")")
	cmd.Flags().StringVar(&f.passwordFile, name+"-password-file", "", "file holding the "+what+" repository's password (default: $"+pwEnv+"; none: not encrypted)")
}

func (f *repoFlags) passwordFlag() string {
	if f.pwFlag == "" {
		return "--password-file"
	}
	return f.pwFlag
}

// where is the location the service and backends understand: local
// paths made absolute.
func (f *repoFlags) where() (string, error) {
	if strings.Contains(f.location, "://") {
		return f.location, nil
	}
	abs, err := filepath.Abs(f.location)
	if err != nil {
		return "", usageError{err}
	}
	return abs, nil
}

func (f *repoFlags) password() (string, error) {
	if f.passwordFile != "" {
		b, err := os.ReadFile(f.passwordFile)
		if err != nil {
			return "", usageError{fmt.Errorf("%s: %w", f.passwordFlag(), err)}
		}
		pw := strings.TrimRight(string(b), "\r\n")
		if pw == "" {
			return "", usageError{fmt.Errorf("%s %s is empty", f.passwordFlag(), f.passwordFile)}
		}
		return pw, nil
	}
	if f.pwEnv != "" {
		return os.Getenv(f.pwEnv), nil
	}
	return os.Getenv("UMBRA_PASSWORD"), nil
}

func (f *repoFlags) settings() (string, backup.Settings, error) {
	where, err := f.where()
	if err != nil {
		return "", backup.Settings{}, err
	}
	pw, err := f.password()
	if err != nil {
		return "", backup.Settings{}, err
	}
	cred := backup.Credentials{AccessKey: os.Getenv("AWS_ACCESS_KEY_ID"), SecretKey: os.Getenv("AWS_SECRET_ACCESS_KEY")}
	if k := os.Getenv(f.awsEnv + "ACCESS_KEY_ID"); f.awsEnv != "" && k != "" {
		cred = backup.Credentials{AccessKey: k, SecretKey: os.Getenv(f.awsEnv + "SECRET_ACCESS_KEY")}
	}
	return where, backup.Settings{Password: pw, Cred: cred}, nil
}

// open opens the repository, mapping a missing one to exit code 3.
func (f *repoFlags) open(ctx context.Context) (*backup.Repo, error) {
	where, set, err := f.settings()
	if err != nil {
		return nil, err
	}
	r, err := backup.OpenWith(ctx, where, set)
	switch {
	case errors.Is(err, backup.ErrNoRepo):
		return nil, notFoundError{err}
	case errors.Is(err, backup.ErrWrongPassword), errors.Is(err, backup.ErrNeedPassword):
		return nil, accessError{err}
	}
	if errors.Is(err, backup.ErrNotEncrypted) {
		return nil, usageError{err}
	}
	return r, err
}

// command gives c the repository flags (add) and a RunE that opens the
// repository, runs run with it and closes it: every command that works
// on one repository is declared this way, so that they name, open and
// report a repository alike. Checks of the command's own flags that must
// come before the repository is opened go in c.PreRunE.
func (f *repoFlags) command(c *cobra.Command, run func(cmd *cobra.Command, args []string, r *backup.Repo) error) *cobra.Command {
	c.RunE = func(cmd *cobra.Command, args []string) error {
		r, err := f.open(cmd.Context())
		if err != nil {
			return err
		}
		defer r.Close()
		return run(cmd, args, r)
	}
	f.add(c)
	return c
}
