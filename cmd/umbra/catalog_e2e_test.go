package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCatalogSurvivesRestart: a storage association changed through the
// API and the writers' history (a failed hook) outlive a clean restart
// and a kill -9; a configuration changed since the API change wins.
func TestCatalogSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	hooks := filepath.Join(dir, "hooks")
	os.Mkdir(hooks, 0o755)
	fail := filepath.Join(dir, "fail")
	os.WriteFile(filepath.Join(hooks, "10-check"), []byte("#!/bin/sh\nif [ \"$1\" = freeze ] && [ -e "+fail+" ]; then echo 'database busy' >&2; exit 3; fi\n"), 0o755)
	s := startService(t, dir, []string{"a"}, "--hooks-dir", hooks, "--max-storage", "4M")
	s.ok("storage", "resize", "a", "--max", "2M")
	os.WriteFile(fail, nil, 0o644)
	if _, code := s.umbra("snapshot", "create", "a", "--writers"); code == 0 {
		t.Fatal("a set with a failing hook succeeded")
	}
	type storage struct {
		Storage []struct {
			MaxBytes int64 `json:"max_bytes"`
		} `json:"storage"`
	}
	type writers struct {
		Writers []struct {
			Name      string `json:"name"`
			LastError string `json:"last_error"`
			History   []struct {
				Phase string `json:"phase"`
			} `json:"history"`
		} `json:"writers"`
	}
	check := func(when string, max int64) {
		t.Helper()
		var st storage
		json.Unmarshal([]byte(s.ok("storage", "list", "a", "--json")), &st)
		if len(st.Storage) != 1 || st.Storage[0].MaxBytes != max {
			t.Fatalf("%s: storage %+v, want max %d", when, st, max)
		}
		var w writers
		json.Unmarshal([]byte(s.ok("writers", "list", "--json")), &w)
		found := false
		for _, x := range w.Writers {
			if strings.Contains(x.LastError, "database busy") && len(x.History) > 0 {
				found = true
			}
		}
		if !found {
			t.Fatalf("%s: the hook's failure is not in the writers' history: %+v", when, w)
		}
	}
	check("before restart", 2097152)
	s.stop()
	s.start()
	check("after a clean restart", 2097152)
	s.kill9()
	s.start()
	check("after kill -9", 2097152)
	// The configuration changed since: it wins.
	s.stop()
	for i, a := range s.args {
		if a == "4M" {
			s.args[i] = "8M"
		}
	}
	s.start()
	check("after the configuration changed", 8388608)
}
