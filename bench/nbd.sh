#!/usr/bin/env bash
# NBD front-end speed (issue 4): Umbra's server beside nbdkit's file
# plugin and qemu-nbd, all serving the same image file on tmpfs, driven by
# fio's nbd engine in the same run. Prints a table of ratios to nbdkit.
# Each test runs ROUNDS times, the servers taking turns; the table gives
# the medians (single runs move by +-30 % on two shared cores).
#   bench/nbd.sh [seconds-per-test] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
bench/machine.sh
RT=${1:-5}
ROUNDS=${2:-3}
for t in fio nbdkit qemu-nbd python3; do
  command -v $t >/dev/null || { echo "bench/nbd.sh: needs $t (apt-get install fio nbdkit qemu-utils)"; exit 1; }
done
W=$(mktemp -d /dev/shm/umbra-nbd-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
go build -o "$W/umbra" ./cmd/umbra
IMG=$W/disk.img
dd if=/dev/urandom of="$IMG" bs=1M count=1024 status=none

waitsock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1"; exit 1; }

"$W/umbra" serve --volume disk="$IMG" --state-dir "$W/state" --nbd-socket "$W/umbra.sock" --api-socket "$W/api.sock" 2>"$W/umbra.log" &
PIDS+=($!); waitsock "$W/umbra.sock"; waitsock "$W/api.sock"
nbdkit -f -U "$W/nbdkit.sock" file "$IMG" &
PIDS+=($!); waitsock "$W/nbdkit.sock"
qemu-nbd -f raw --cache=writeback --aio=threads -k "$W/qemu.sock" --shared=8 -t "$IMG" &
PIDS+=($!); waitsock "$W/qemu.sock"

declare -A URI=(
  [umbra]="nbd+unix:///disk?socket=$W/umbra.sock"
  [nbdkit]="nbd+unix:///?socket=$W/nbdkit.sock"
  [qemu-nbd]="nbd+unix:///?socket=$W/qemu.sock"
)

# fio RW BS DEPTH JOBS URI -> "MB/s IOPS"
runfio() {
  fio --name=b --ioengine=nbd --uri="$5" --rw="$1" --bs="$2" --iodepth="$3" --numjobs="$4" \
    --size=512M --time_based --runtime="$RT" --group_reporting --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; r=j["read"]; w=j["write"]; print("%.0f %.0f" % ((r["bw_bytes"]+w["bw_bytes"])/1e6, r["iops"]+w["iops"]))'
}

TESTS=("read 1M 16" "write 1M 16" "randread 4k 16" "randwrite 4k 16")
echo "fio nbd engine, ${RT}s per test, median of $ROUNDS rounds taking turns, 1 GiB image on tmpfs, $(nproc) cores; ratio = umbra / nbdkit"
printf "%-22s %-5s %12s %12s %12s %8s %8s\n" test conns umbra nbdkit qemu-nbd "u/nbdkit" "u/qemu"
row() { # label jobs uri-umbra tag
  local t=($1) label="$1" jobs=$2 u="" k="" q="" i
  for i in $(seq "$ROUNDS"); do
    u+="$(runfio ${t[0]} ${t[1]} ${t[2]} $jobs "$3");"
    k+="$(runfio ${t[0]} ${t[1]} ${t[2]} $jobs "${URI[nbdkit]}");"
    q+="$(runfio ${t[0]} ${t[1]} ${t[2]} $jobs "${URI[qemu-nbd]}");"
  done
  python3 - "$label" "$jobs" "$u" "$k" "$q" "$4" <<'EOF'
import statistics, sys
label, jobs, u, k, q, tag = sys.argv[1:]
unit = 0 if "1M" in label else 1  # MB/s for 1M, IOPS for 4k
med = lambda runs: statistics.median(float(r.split()[unit]) for r in runs.split(";") if r)
uv, kv, qv = med(u), med(k), med(q)
fmt = "%.0f MB/s" if unit == 0 else "%.0f IOPS"
print("%-22s %-5s %12s %12s %12s %8.2f %8.2f" % (label + tag, jobs, fmt % uv, fmt % kv, fmt % qv, uv / kv, uv / qv))
EOF
}
for jobs in 1 4; do
  for t in "${TESTS[@]}"; do row "$t" $jobs "${URI[umbra]}" ""; done
done
# The same with a live non-persistent snapshot on the Umbra volume: every
# first write to a chunk is preserved through the whole path.
"$W/umbra" --api-socket "$W/api.sock" snapshot create disk --id bench >/dev/null
for t in "write 1M 16" "randwrite 4k 16"; do row "$t" 1 "${URI[umbra]}" " +snap"; done
"$W/umbra" --api-socket "$W/api.sock" snapshot list
