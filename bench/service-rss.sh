#!/usr/bin/env bash
# The service's memory around a full backup (issue 28): a real `umbra
# serve` with a synthetic COW volume of N unique, compressible 4 KiB
# chunks (`nbdkit pattern`: every 8-byte word is its offset) followed by
# a hole 15 times as large, backed up with `umbra backup` into a local,
# unencrypted repository. Reports the service's RSS before the backup,
# its peak during it (VmHWM, reset just before), its RSS when the
# backup has returned, and WAIT seconds later (default 60; the service
# closes a repository no backup used for --repo-idle, 30 s, and gives
# the freed memory back).
# The volume and repository live under DIR (default /tmp: disk, 4 GiB
# of data at 1 Mi chunks). CHUNKS_M is the millions of chunks (default
# 1). Usage:
#   bench/service-rss.sh            # one markdown table row on stdout
#   CHUNKS_M=4 WAIT=90 bench/service-rss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for t in nbdkit nbdcopy; do
	command -v $t >/dev/null || { echo "bench/service-rss.sh: needs $t (apt-get install nbdkit libnbd-bin)" >&2; exit 1; }
done
bench/machine.sh
CHUNKS_M=${CHUNKS_M:-1}
WAIT=${WAIT:-60}
DIR=${DIR:-/tmp}
W=$(mktemp -d "$DIR/umbra-bench-service-rss.XXXXXX")
cleanup() {
	[ -n "${SERVE:-}" ] && kill "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT
BIN=$W/umbra
go build -o "$BIN" ./cmd/umbra
n=$((CHUNKS_M * 1048576))
IMG=$W/vol.img
nbdcopy -- [ nbdkit pattern size=$((n * 4096)) ] "$IMG"
truncate -s $((16 * n * 4096)) "$IMG" # nbdcopy made it the data's size
"$BIN" serve --state-dir "$W/state" --api-socket "$W/api.sock" --nbd-socket "$W/nbd.sock" --volume "vol=$IMG" 2>"$W/serve.log" &
SERVE=$!
for _ in $(seq 100); do [ -S "$W/api.sock" ] && break; sleep 0.1; done
umbra() { "$BIN" --api-socket "$W/api.sock" "$@"; }
kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$SERVE/status"; }
mib() { echo "scale=1; $1 / 1024" | bc; }
UMBRA_PASSWORD= umbra repo init --repo "$W/repo" >/dev/null
before=$(kib VmRSS)
echo 5 >"/proc/$SERVE/clear_refs" # VmHWM starts again from VmRSS
t0=$(date +%s.%N)
umbra backup vol --repo "$W/repo" --writers=false >/dev/null
t1=$(date +%s.%N)
peak=$(kib VmHWM)
after=$(kib VmRSS)
sleep "$WAIT"
later=$(kib VmRSS)
echo "| unique chunks | service RSS before | peak during the backup | when it returned | ${WAIT} s later | backup s |"
echo "|---|---|---|---|---|---|"
echo "| $CHUNKS_M Mi | $(mib "$before") MiB | $(mib "$peak") MiB | $(mib "$after") MiB | $(mib "$later") MiB | $(printf "%.1f" "$(echo "$t1 - $t0" | bc)") |"
