#!/usr/bin/env bash
# Live restore figures of issue 31, beside a plain restore in one run:
#   - a SIZE (default 2G) ext4 image holding DATA (default 512M) of
#     random files in 16 directories (sparse otherwise), backed up into a
#     local repository and into one on versitygw;
#   - plain `umbra restore` time;
#   - `umbra restore --live`: time until a file on the filesystem of the
#     restored volume (FUSE file, loop device, mount) is read, with the
#     background restore at full speed;
#   - random 4 KiB reads at QD16 of data not restored yet (fio on the FUSE
#     file, O_DIRECT, over the data part; the background restore held
#     back with --rate 1), local and versitygw: IOPS and latency;
#   - background restore throughput with no foreground I/O (restore --live
#     until the service's live_restore_done event for it) against the
#     plain restore.
# REPS (default 3) rounds of the plain restore, the first read and the
# background restore, in turn: the median round and the range.
# The script waits on the service's events (one `umbra events` process
# followed from the start), not by polling `umbra volume list`: a
# process every 50 ms took CPU from the live restore it measured.
# Needs root, fio, mkfs.ext4, losetup, bc, jq, versitygw. Usage:
#   sudo bench/liverestore.sh          # SIZE=8G DATA=1G for others
#   sudo SIZE=64G bench/liverestore.sh # the 64 GiB case: ~3 GiB of disk
set -euo pipefail
cd "$(dirname "$0")/.."
bench/machine.sh
SIZE=${SIZE:-2G}
DATA=${DATA:-512M}
FIO_SECS=${FIO_SECS:-10}
REPS=${REPS:-3}
for t in fio mkfs.ext4 losetup bc jq; do
	command -v $t >/dev/null || { echo "bench/liverestore.sh: needs $t" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench/liverestore.sh: needs root (FUSE, loop devices, mount)" >&2; exit 1; }
VGW=$(go env GOPATH)/bin/versitygw
[ -x "$VGW" ] || { echo "bench/liverestore.sh: needs versitygw in $(go env GOPATH)/bin" >&2; exit 1; }
W=${W:-/var/tmp/umbra-bench-live}
rm -rf "$W"; mkdir -p "$W/mnt" "$W/s3"
BIN=$W/umbra
go build -o "$BIN" ./cmd/umbra
U() { "$BIN" --api-socket "$W/api.sock" "$@"; }
export AWS_ACCESS_KEY_ID=benchkey AWS_SECRET_ACCESS_KEY=benchsecret

cleanup() {
	[ -n "${EVENTS:-}" ] && kill "$EVENTS" 2>/dev/null || true
	for m in "$W"/mnt*; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
	for f in "$W"/fuse/*; do for d in $(losetup -j "$f" -O NAME -n 2>/dev/null); do losetup -d "$d"; done; done
	[ -n "${SERVE:-}" ] && kill "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null || true
	[ -n "${S3PID:-}" ] && kill "$S3PID" 2>/dev/null && wait "$S3PID" 2>/dev/null || true
	mountpoint -q "$W/fuse" 2>/dev/null && umount -l "$W/fuse" || true
	rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }
ratio() { printf "%.2f" "$(echo "scale=4; $1 / $2" | bc)"; }
median() { printf "%s\n" "$@" | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f", v[int((NR + 1) / 2)] }'; }
range() { printf "%s\n" "$@" | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f-%.2f", v[1], v[NR] }'; }

# The volume: ext4 with DATA of random files, the rest sparse.
IMG=$W/vol.img
truncate -s "$SIZE" "$IMG"
mkfs.ext4 -q -F "$IMG"
mount -o loop "$IMG" "$W/mnt"
# Files in 16 top-level directories, which ext4 spreads over its block
# groups: at SIZE=64G the data lies all over the volume.
n=$(( $(numfmt --from=iec "$DATA") / (8 << 20) ))
for i in $(seq 1 "$n"); do mkdir -p "$W/mnt/d$((i % 16))"; head -c 8M /dev/urandom >"$W/mnt/d$((i % 16))/f$i"; done
echo "hello from the backup" >"$W/mnt/hello.txt"
umount "$W/mnt"

"$VGW" --port 127.0.0.1:7071 --access benchkey --secret benchsecret posix --nometa "$W/s3" >/dev/null 2>&1 &
S3PID=$!
"$BIN" serve --state-dir "$W/state" --nbd-socket "$W/nbd.sock" --api-socket "$W/api.sock" --fuse-dir "$W/fuse" --volume src="$IMG" 2>"$W/serve.log" &
SERVE=$!
for _ in $(seq 100); do [ -S "$W/api.sock" ] && break; sleep 0.1; done
# The service's events from here on: the backups' ends, then each live
# restore's.
exec 3< <(exec "$BIN" --api-socket "$W/api.sock" events --kind backup_done,live_restore_done --json)
EVENTS=$!
wait_event() { # KIND [VOLUME]: reads events until that one
	local line
	while read -r -t 900 line <&3; do
		case "$line" in *"\"kind\":\"$1\""*) [ -z "${2:-}" ] || [[ "$line" == *"\"volume\":\"$2\""* ]] && return 0 ;; esac
	done
	echo "bench/liverestore.sh: no $1 event${2:+ for volume $2} from the service" >&2
	exit 1
}
LOCAL=$W/repo
S3=s3+http://127.0.0.1:7071/bench/repo
U repo init --repo "$LOCAL" >/dev/null
U repo init --repo "$S3" >/dev/null
ID=$(U backup src --repo "$LOCAL" --json | jq -r '.images[0].image')
wait_event backup_done # the events are followed
IDS3=$(U backup src --repo "$S3" --json | jq -r '.images[0].image')
wait_event backup_done

# REPS rounds, each a plain restore, a live restore read at once and a
# live restore left alone, in turn: on a shared machine one run of each
# says more about the load of its moment than about the restores. The
# tables give the median round's figures and the range.
load0=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq 1 "$REPS"); do
	# Plain restore.
	t0=$(now)
	U restore "$ID" --repo "$LOCAL" --to "$W/full.img" >/dev/null
	fulls+=("$(secs "$t0" "$(now)")")
	rm -f "$W/full.img"

	# restore --live to the first read of a file on its filesystem, with
	# the background restore at full speed; then until it is done.
	t0=$(now)
	U restore "$ID" --repo "$LOCAL" --live --to "$W/live$r.img" --volume "live$r" >/dev/null
	for _ in $(seq 1000); do [ -e "$W/fuse/live$r" ] && break; sleep 0.01; done
	dev=$(losetup -f --show "$W/fuse/live$r")
	mkdir -p "$W/mnt-live"
	mount -o ro,noload "$dev" "$W/mnt-live"
	cat "$W/mnt-live/hello.txt" >/dev/null
	firsts+=("$(secs "$t0" "$(now)")")
	umount "$W/mnt-live"
	losetup -d "$dev"
	wait_event live_restore_done "live$r"
	bg_firsts+=("$(secs "$t0" "$(now)")")

	# Background throughput with no foreground I/O.
	t0=$(now)
	U restore "$ID" --repo "$LOCAL" --live --to "$W/bg$r.img" --volume "bg$r" >/dev/null
	wait_event live_restore_done "bg$r"
	bgs+=("$(secs "$t0" "$(now)")")
done
full=$(median "${fulls[@]}")
first=$(median "${firsts[@]}")
bg_first=$(median "${bg_firsts[@]}")
bg=$(median "${bgs[@]}")

# Random 4 KiB reads of data not restored yet, QD16 (the background held
# back), over the part of the volume that holds the files.
datasize=$(( $(numfmt --from=iec "$DATA") ))
randread() { # volume
	fio --name=live --filename="$W/fuse/$1" --rw=randread --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
		--size="$datasize" --offset=0 --runtime="$FIO_SECS" --time_based --output-format=json 2>/dev/null |
		jq -r '.jobs[0].read | "\(.iops|floor) \(.clat_ns.mean/1000|floor) \(.clat_ns.percentile["99.000000"]/1000|floor)"'
}
U restore "$ID" --repo "$LOCAL" --live --to "$W/paused.img" --volume paused --rate 1 >/dev/null
read -r iops_l lat_l p99_l <<<"$(randread paused)"
U restore "$IDS3" --repo "$S3" --live --to "$W/paused3.img" --volume paused3 --rate 1 >/dev/null
read -r iops_s lat_s p99_s <<<"$(randread paused3)"

echo
echo "load average (1, 5, 15 min) before the rounds: $load0; after them: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| $SIZE image, $DATA of files | plain \`umbra restore\` | \`umbra restore --live\` |"
echo "|---|---:|---:|"
echo "| until a file on it is read | $full s (all of it) | $first s |"
echo "| until all of it is restored | $full s | $bg s (no other I/O; $(ratio "$full" "$bg")× the plain restore's throughput) |"
echo "| ... with a mount and a read first | | $bg_first s |"
echo "| range of the $REPS rounds (s) | $(range "${fulls[@]}") | first read $(range "${firsts[@]}"), all $(range "${bgs[@]}") |"
echo
echo "| random 4 KiB reads of unrestored data, QD16, fio O_DIRECT on the FUSE file | IOPS | mean latency | p99 latency |"
echo "|---|---:|---:|---:|"
echo "| local repository | $iops_l | $lat_l µs | $p99_l µs |"
echo "| versitygw (S3) repository | $iops_s | $lat_s µs | $p99_s µs |"
