#!/usr/bin/env bash
# Issue 8: incremental image backup of a reflink volume after 1 % of its
# 4 KiB blocks changed, against a full image and against reading the
# whole file (cat), same run. XFS (reflink=1) on a loop device over a
# file in /dev/shm, so the disk is not what is measured. Needs root.
#   sudo bench/reflink-backup.sh [SIZE_MIB]   (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-1024}
W=/dev/shm/umbra-bench-reflink
rm -rf "$W"; mkdir -p "$W/mnt"
BIN=$W/umbra
go build -o "$BIN" ./cmd/umbra
cleanup() {
	[ -n "${SERVE:-}" ] && kill "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null || true
	mountpoint -q "$W/mnt" && umount "$W/mnt"
	[ -n "${DEV:-}" ] && losetup -d "$DEV" || true
	rm -rf "$W"
}
trap cleanup EXIT
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }
truncate -s $((MIB * 2 + 512))M "$W/xfs.img"
DEV=$(losetup -f --show "$W/xfs.img")
mkfs.xfs -q -f -m reflink=1 "$DEV"
mount "$DEV" "$W/mnt"
VM=$W/mnt/vm.img
head -c $((MIB << 20)) /dev/urandom >"$VM"
sync
"$BIN" serve --state-dir "$W/state" --api-socket "$W/api.sock" --nbd-socket "$W/nbd.sock" --reflink-volume "$VM" 2>"$W/serve.log" &
SERVE=$!
for _ in $(seq 100); do [ -S "$W/api.sock" ] && break; sleep 0.1; done
umbra() { "$BIN" --api-socket "$W/api.sock" "$@"; }
umbra repo init --repo "$W/repo" >/dev/null

t0=$(now); cat "$VM" >/dev/null; t1=$(now); cat_s=$(secs "$t0" "$t1")
t0=$(now); umbra backup "$VM" --repo "$W/repo" >/dev/null; t1=$(now); full_s=$(secs "$t0" "$t1")
blocks=$((MIB * 256 / 100))
python3 - "$VM" "$blocks" <<'PY'
import os, random, sys
path, n = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
for b in random.sample(range(size // 4096), n):
    os.pwrite(fd, os.urandom(4096), b * 4096)
os.fsync(fd)
os.close(fd)
PY
t0=$(now); umbra backup "$VM" --repo "$W/repo" --json >"$W/incr.json" 2>/dev/null; t1=$(now); incr_s=$(secs "$t0" "$t1")
read_b=$(grep '"bytes_read"' "$W/incr.json" | sed -E 's/[^0-9]//g')
echo "### Reflink volume incremental backup, $(date -u +%Y-%m-%d), $(nproc) cores, XFS on tmpfs"
echo
echo "$MIB MiB file, $blocks random 4 KiB blocks rewritten (1 %)."
echo
echo "| measure | seconds | ratio |"
echo "|---|---|---|"
echo "| cat the file (full read) | $cat_s | 1 |"
echo "| umbra full image | $full_s | $(echo "scale=2; $full_s / $cat_s" | bc)x cat |"
echo "| umbra incremental image | $incr_s | $(echo "scale=3; $incr_s / $full_s" | bc)x full |"
echo
echo "The incremental read $read_b bytes for $((blocks * 4096)) changed bytes."
