#!/usr/bin/env bash
# FUSE front-end speed (issue 4): fio on a loop device (direct I/O) over
#  - Umbra's FUSE file of a volume (umbra serve --fuse-dir),
#  - a minimal go-fuse pass-through file (bench/passthrough), and
#  - nbdfuse in front of nbdkit's file plugin,
# all backed by the same image file on tmpfs, in one run. Needs root.
#   bench/fuse.sh [seconds-per-test]
set -euo pipefail
cd "$(dirname "$0")/.."
bench/machine.sh
RT=${1:-5}
[ "$(id -u)" = 0 ] || { echo "bench/fuse.sh: needs root (loop devices)"; exit 1; }
for t in fio nbdkit nbdfuse losetup python3; do
  command -v $t >/dev/null || { echo "bench/fuse.sh: needs $t"; exit 1; }
done
W=$(mktemp -d /dev/shm/umbra-fuse-bench.XXXXXX)
PIDS=(); LOOPS=(); MNTS=()
cleanup() {
  for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  sleep 0.5
  for m in "${MNTS[@]}"; do fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
go build -o "$W/umbra" ./cmd/umbra
go build -o "$W/passthrough" ./bench/passthrough
IMG=$W/disk.img
dd if=/dev/urandom of="$IMG" bs=1M count=1024 status=none
waitfile() { for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "no $1"; exit 1; }

mkdir -p "$W/umbra-fuse" "$W/pt" "$W/nf"
"$W/umbra" serve --volume disk="$IMG" --state-dir "$W/state" --nbd-socket "$W/umbra.sock" --api-socket "$W/api.sock" --fuse-dir "$W/umbra-fuse" 2>"$W/umbra.log" &
PIDS+=($!); MNTS+=("$W/umbra-fuse"); waitfile "$W/umbra-fuse/disk"
"$W/passthrough" "$W/pt" "$IMG" &
PIDS+=($!); MNTS+=("$W/pt"); waitfile "$W/pt/disk"
nbdkit -f -U "$W/nbdkit.sock" file "$IMG" &
PIDS+=($!); waitfile "$W/nbdkit.sock"
nbdfuse "$W/nf" "nbd+unix:///?socket=$W/nbdkit.sock" &
PIDS+=($!); MNTS+=("$W/nf"); waitfile "$W/nf/nbd"

loop() { losetup -f --show --direct-io=on "$1"; }
DU=$(loop "$W/umbra-fuse/disk"); LOOPS+=("$DU")
DP=$(loop "$W/pt/disk"); LOOPS+=("$DP")
DN=$(loop "$W/nf/nbd"); LOOPS+=("$DN")

runfio() { # rw bs depth dev
  timeout $((RT + 60)) fio --name=b --filename="$4" --direct=1 --ioengine=libaio --rw="$1" --bs="$2" --iodepth="$3" \
    --size=512M --time_based --runtime="$RT" --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; r=j["read"]; w=j["write"]; print("%.0f %.0f" % ((r["bw_bytes"]+w["bw_bytes"])/1e6, r["iops"]+w["iops"]))'
}
echo "fio libaio --direct=1 on loop --direct-io=on, ${RT}s per test, 1 GiB image on tmpfs, $(nproc) cores"
printf "%-18s %12s %12s %14s %9s %9s\n" test umbra-fuse passthrough "nbdfuse+nbdkit" "u/pass" "u/nbdfuse"
for t in "write 1M 16" "read 1M 16" "randwrite 4k 16" "randread 4k 16"; do
  set -- $t
  u=$(runfio $1 $2 $3 "$DU"); p=$(runfio $1 $2 $3 "$DP"); n=$(runfio $1 $2 $3 "$DN")
  python3 - "$t" "$u" "$p" "$n" <<'PY'
import sys
t, u, p, n = sys.argv[1:]
i = 0 if "1M" in t else 1
uv, pv, nv = (float(x.split()[i]) for x in (u, p, n))
fmt = "%.0f MB/s" if i == 0 else "%.0f IOPS"
print("%-18s %12s %12s %14s %9.2f %9.2f" % (t, fmt % uv, fmt % pv, fmt % nv, uv / pv, uv / nv))
PY
done
