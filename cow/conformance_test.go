package cow_test

import (
	"os"
	"path/filepath"
	"testing"

	"umbra/cow"
	"umbra/provider/providertest"
)

func TestConformance(t *testing.T) {
	providertest.Run(t, func(t *testing.T) providertest.Volume {
		dir := t.TempDir()
		origin := filepath.Join(dir, "o.img")
		os.WriteFile(origin, nil, 0o600)
		os.Truncate(origin, 4<<20)
		v, err := cow.Open("conf", origin, cow.Options{StorageDir: filepath.Join(dir, "diff")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { v.Close() })
		p := cow.NewProvider()
		p.Add(v)
		return providertest.Volume{
			Provider: p, Name: "conf", Size: v.Size(),
			Write: func(t *testing.T, off int64, b []byte) {
				if _, err := v.WriteAt(b, off); err != nil {
					t.Fatal(err)
				}
			},
			Read: func(t *testing.T, off int64, b []byte) {
				if _, err := v.ReadAt(b, off); err != nil {
					t.Fatal(err)
				}
			},
		}
	})
}
