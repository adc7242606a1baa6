package main

import (
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"
)

// startHeapProfile writes a heap profile to path each time the
// process's resident set passes its highest yet by 4 MiB (checked every
// 50 ms, after a collection so that the profile is current): the file
// left is the heap at the peak, for finding what a command's (or the
// service's) memory grows with. The returned function stops it.
func startHeapProfile(path string) (stop func()) {
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		high := 0
		for {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			if rss := residentKiB(); rss > high+4<<10 {
				high = rss
				runtime.GC()
				tmp := path + ".tmp"
				if f, err := os.Create(tmp); err == nil {
					err = pprof.Lookup("heap").WriteTo(f, 0)
					if cerr := f.Close(); err == nil && cerr == nil {
						os.Rename(tmp, path)
					}
				}
			}
		}
	}()
	return func() {
		close(done)
		<-exited
	}
}

// residentKiB is the process's resident set (VmRSS), 0 when unknown.
func residentKiB() int {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				kb, _ := strconv.Atoi(f[0])
				return kb
			}
		}
	}
	return 0
}
