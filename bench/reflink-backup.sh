#!/usr/bin/env bash
# Issue 8: incremental image backup of a reflink volume after 1 % of its
# 4 KiB blocks changed, against a full read of the file in the same run:
# Umbra's full image, `cat` (through the page cache) and `dd
# iflag=direct` (around it, through the loop device). XFS (reflink=1) on a
# loop device over a file in /dev/shm, so the disk is not what is
# measured. Three rounds of change + incremental; medians. Needs root.
#   sudo bench/reflink-backup.sh [SIZE_MIB]   (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
bench/machine.sh
MIB=${1:-1024}
ROUNDS=3
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
# timed CMD...: run CMD, print its wall-clock seconds.
timed() { local t0 t1; t0=$(now); "$@" >/dev/null; t1=$(now); echo "$t1 - $t0" | bc; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
fmt() { printf '%.3f' "$1"; }
ratio() { printf '%.2fx' "$(echo "scale=6; $1 / $2" | bc)"; }

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

cat_s=() dd_s=()
for _ in $(seq $ROUNDS); do
	cat_s+=("$(timed cat "$VM")")
	dd_s+=("$(timed dd if="$VM" of=/dev/null bs=1M iflag=direct status=none)")
done
cat_m=$(median "${cat_s[@]}") dd_m=$(median "${dd_s[@]}")
full_s=$(timed umbra backup "$VM" --repo "$W/repo")

blocks=$((MIB * 256 / 100))
incr_s=() incr_in=() extents=() exact=yes
for round in $(seq $ROUNDS); do
	python3 - "$VM" "$blocks" "$round" <<'PY'
import os, random, sys
path, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(seed)
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
for b in random.sample(range(size // 4096), n):
    os.pwrite(fd, os.urandom(4096), b * 4096)
os.fsync(fd)
os.close(fd)
PY
	extents+=("$(filefrag "$VM" | sed -E 's/.*: ([0-9]+) extents? found/\1/')")
	t0=$(now); umbra backup "$VM" --repo "$W/repo" --json >"$W/incr.json" 2>/dev/null; t1=$(now)
	incr_s+=("$(echo "$t1 - $t0" | bc)")
	read -r inc read_b in_s < <(python3 -c '
import json, sys
x = json.load(open(sys.argv[1]))["images"][0]
print(int(x.get("incremental", False)), int(x.get("bytes_read", 0)), x.get("seconds", 0))' "$W/incr.json")
	incr_in+=("$in_s")
	if [ "$inc" != 1 ] || [ "$read_b" != $((blocks * 4096)) ]; then
		exact="no (round $round: incremental=$inc, read $read_b bytes)"
	fi
done
incr_m=$(median "${incr_s[@]}") incr_in_m=$(median "${incr_in[@]}")

echo "### Run of $(date -u +%Y-%m-%d), $(nproc) cores, XFS on a loop device over tmpfs"
echo
echo "$MIB MiB file of random data; each round rewrites $blocks random 4 KiB blocks (1 %) and takes an incremental image. Medians of $ROUNDS."
echo
echo "| measure | seconds | vs cat | vs dd iflag=direct | vs Umbra full |"
echo "|---|---|---|---|---|"
echo "| cat the file (page cache) | $(fmt "$cat_m") | 1 | $(ratio "$cat_m" "$dd_m") | $(ratio "$cat_m" "$full_s") |"
echo "| dd iflag=direct bs=1M (loop device) | $(fmt "$dd_m") | $(ratio "$dd_m" "$cat_m") | 1 | $(ratio "$dd_m" "$full_s") |"
echo "| umbra backup, full image | $(fmt "$full_s") | $(ratio "$full_s" "$cat_m") | $(ratio "$full_s" "$dd_m") | 1 |"
echo "| umbra backup, incremental image (CLI wall clock) | $(fmt "$incr_m") | $(ratio "$incr_m" "$cat_m") | $(ratio "$incr_m" "$dd_m") | $(ratio "$incr_m" "$full_s") |"
echo "| of which the image itself (the service's seconds) | $(fmt "$incr_in_m") | $(ratio "$incr_in_m" "$cat_m") | $(ratio "$incr_in_m" "$dd_m") | $(ratio "$incr_in_m" "$full_s") |"
echo
rounds=""
for i in "${!incr_s[@]}"; do rounds+="${rounds:+; }$(fmt "${incr_s[$i]}") s at ${extents[$i]} extents"; done
echo "Rounds (CLI wall clock; extents of the file before the image): $rounds."
echo "Every incremental read exactly the changed blocks ($((blocks * 4096)) bytes): $exact."
