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
}

func (f *repoFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.location, "repo", filepath.Join(defaultStateDir(), "repo"),
		"backup repository: a directory, or s3://HOST[:PORT]/BUCKET[/PREFIX] (s3+http:// without TLS; credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
	cmd.Flags().StringVar(&f.passwordFile, "password-file", "", "file holding the repository's password (default: $UMBRA_PASSWORD; none: not encrypted)")
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
			return "", usageError{fmt.Errorf("--password-file: %w", err)}
		}
		pw := strings.TrimRight(string(b), "\r\n")
		if pw == "" {
			return "", usageError{fmt.Errorf("--password-file %s is empty", f.passwordFile)}
		}
		return pw, nil
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
	return where, backup.Settings{Password: pw, Cred: backup.Credentials{AccessKey: os.Getenv("AWS_ACCESS_KEY_ID"), SecretKey: os.Getenv("AWS_SECRET_ACCESS_KEY")}}, nil
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
