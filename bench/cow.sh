#!/usr/bin/env bash
# COW engine figures of issue 3: each benchmark measures a no-snapshot
# baseline and the COW case in the same run and prints their ratio.
# Files live on tmpfs (/dev/shm) except the persistent case, which
# measures fsync on the real disk.
set -euo pipefail
cd "$(dirname "$0")/.."
bench/machine.sh
go test ./cow -run '^$' -bench "${1:-.}" -benchtime 1x -count 1 | grep -E '^Benchmark' |
  sed -E 's/-[0-9]+ +1 +[0-9]+ ns\/op//'
