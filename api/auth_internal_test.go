package api

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"umbra/api/umbrav1"
)

func TestAuditRedactsSecrets(t *testing.T) {
	p := filepath.Join(t.TempDir(), "audit.log")
	a, err := OpenAudit(p)
	if err != nil {
		t.Fatal(err)
	}
	a.log(identity{name: "bob", role: RoleOperator}, "", "/umbra.v1.Umbra/Backup",
		&umbrav1.BackupRequest{Volumes: []string{"db"}, Repo: "s3://h/b", Password: "hunter2hunter2", S3AccessKey: "AKIAXYZ", S3SecretKey: "verysecretkey"}, nil, false)
	a.Close()
	b, _ := os.ReadFile(p)
	for _, secret := range []string{"hunter2hunter2", "AKIAXYZ", "verysecretkey"} {
		if strings.Contains(string(b), secret) {
			t.Fatalf("the audit log holds a secret: %s", b)
		}
	}
	if !strings.Contains(string(b), `"db"`) || !strings.Contains(string(b), `"who":"bob"`) {
		t.Fatalf("audit line lacks the request or who: %s", b)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
		t.Fatalf("audit log mode %v", fi.Mode())
	}
}

func TestEveryMethodHasARole(t *testing.T) {
	for _, m := range umbrav1.Umbra_ServiceDesc.Methods {
		if _, ok := methodRoles[m.MethodName]; !ok {
			t.Errorf("method %s has no role in methodRoles (it would need admin)", m.MethodName)
		}
	}
	for _, m := range umbrav1.Umbra_ServiceDesc.Streams {
		if _, ok := methodRoles[m.StreamName]; !ok {
			t.Errorf("stream %s has no role in methodRoles", m.StreamName)
		}
	}
}
