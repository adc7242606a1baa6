package service

import (
	"errors"
	"strings"
	"testing"

	"umbra/jobs"
)

// TestConfigRefusesBadJobs: a bad [[job]] or [notify] is a ConfigError
// that names the job and the field, found before anything is opened.
func TestConfigRefusesBadJobs(t *testing.T) {
	base := Config{StateDir: "/nonexistent/state", APISocket: "/nonexistent/api.sock", NBD: NBDConfig{Socket: "/nonexistent/nbd.sock"},
		Volumes: []VolumeConfig{{Name: "a", Path: "/nonexistent/a.img"}}}
	for _, c := range []struct {
		mod  func(*Config)
		want string
	}{
		{func(c *Config) {
			c.Jobs = []jobs.Def{{Name: "tl", Kind: "snapshot", Schedule: "hourly", Keep: jobs.Keep{Hourly: 1}}}
		}, "job tl: volumes: missing"},
		{func(c *Config) {
			c.Jobs = []jobs.Def{{Name: "tl", Kind: "snapshot", Schedule: "every tuesday", Volumes: []string{"a"}, Keep: jobs.Keep{Hourly: 1}}}
		}, "job tl: schedule:"},
		{func(c *Config) { c.Notify.Webhook = "ftp://example" }, "notify.webhook"},
		{func(c *Config) { c.Notify.Exec = []string{"alert.sh"} }, "notify.exec"},
		{func(c *Config) { c.Notify.Backoff = "-1s" }, "notify.backoff"},
	} {
		cfg := base
		c.mod(&cfg)
		_, err := cfg.check()
		var ce ConfigError
		if !errors.As(err, &ce) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("got %v, want a ConfigError with %q", err, c.want)
		}
	}
}
