#!/usr/bin/env bash
# Incremental backup wall time, small: a 2 GiB ext4 volume with 400 MiB
# of random data in /dev/shm, served by `umbra serve`; a full backup,
# then INCR incrementals, each after 1 % of the volume rewritten in
# scattered 4 KiB blocks through NBD (qemu-io), timed as a user runs
# them (the CLI's start included): a small stand-in for bench/backup.sh's
# incremental (2 GiB ext4, 1 % scattered 4 KiB writes), ~15 s a round.
#
# usage: bench/incr-wall.sh BIN [BIN...]
#   ROUNDS=3 rounds; each round runs every BIN in turn (old and new
#   builds alternate, so load changes hit both alike), each on a fresh
#   volume and repository. Prints one line per incremental
#   ("round R: binK incrN SECONDS"), then per BIN the median of its incrementals
#   and of the full backups, and the load average (uptime) before and
#   after: figures measured under load say so.
#   INCR=5 incrementals a round. STRACE=1 traces the last incremental
#   (service and CLI: strace -f -tt -T) into /dev/shm/incrw-*.strace.
# Needs root (mount, loop device), mkfs.ext4, qemu-io, bc.
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
	sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
	exit 2
fi
ROUNDS=${ROUNDS:-3}
INCR=${INCR:-5}
W=/dev/shm/incrw-$$
export UMBRA_PASSWORD=bench-password
SERVE=
cleanup() {
	if [ -n "$SERVE" ]; then kill "$SERVE" 2>/dev/null || true; wait "$SERVE" 2>/dev/null || true; fi
	SERVE=
	mountpoint -q $W/mnt 2>/dev/null && umount $W/mnt
	rm -rf $W
}
trap cleanup EXIT
RES=$(mktemp /tmp/incrw-results.XXXXXX)
trap 'cleanup; rm -f $RES' EXIT

# one BIN TAG: a fresh volume, service and repository; a full backup
# and INCR incrementals.
one() {
	local BIN=$1 TAG=$2 s e
	mkdir -p $W/mnt
	truncate -s 2G $W/vol.img
	mkfs.ext4 -q -F $W/vol.img
	mount -o loop $W/vol.img $W/mnt
	head -c 400M /dev/urandom >$W/mnt/data
	umount $W/mnt
	"$BIN" serve --state-dir $W/state --api-socket $W/api.sock --nbd-socket $W/nbd.sock --volume "vol=$W/vol.img" 2>$W/serve.log &
	SERVE=$!
	for _ in $(seq 100); do [ -S $W/api.sock ] && break; sleep 0.1; done
	u() { "$BIN" --api-socket $W/api.sock "$@"; }
	u repo init --repo $W/repo >/dev/null
	s=$(date +%s.%N); u backup vol --repo $W/repo --writers=false --json >/dev/null 2>>$W/cli.err; e=$(date +%s.%N)
	echo "$TAG full $(echo "$e - $s" | bc)" | tee -a $RES
	for i in $(seq "$INCR"); do
		n=$((2 * 1024 * 1024 / 4 / 100))
		awk -v n=$n -v seed=$i 'BEGIN { srand(seed); for (i = 0; i < n; i++) printf "write -P %d %d 4k\n", int(rand()*255)+1, int(rand()*524288)*4096 }' |
			qemu-io -f raw "nbd+unix:///vol?socket=$W/nbd.sock" >/dev/null
		sleep 1
		if [ "${STRACE:-}" = 1 ] && [ "$i" = "$INCR" ]; then
			strace -f -tt -T -o /dev/shm/incrw-serve-$TAG.strace -p $SERVE &
			local SP=$!
			sleep 1
			strace -f -tt -T -o /dev/shm/incrw-cli-$TAG.strace "$BIN" --api-socket $W/api.sock backup vol --repo $W/repo --writers=false --json >/dev/null
			kill $SP; wait $SP || true
			continue
		fi
		s=$(date +%s.%N); u backup vol --repo $W/repo --writers=false --json >/dev/null 2>>$W/cli.err; e=$(date +%s.%N)
		echo "$TAG incr$i $(echo "$e - $s" | bc)" | tee -a $RES
	done
	cleanup
}

"$(dirname "$0")"/machine.sh
echo "load before: $(uptime)"
for r in $(seq "$ROUNDS"); do
	k=0
	for BIN in "$@"; do
		k=$((k + 1))
		one "$BIN" "bin$k" >/dev/null
		grep "^bin$k " $RES | tail -$((INCR + 1)) | sed "s/^/round $r: /"
	done
done
echo "load after: $(uptime)"
k=0
for BIN in "$@"; do
	k=$((k + 1))
	med() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] " (" a[1] "-" a[NR] ", " NR " runs)" }'; }
	echo "bin$k $BIN: incremental median $(grep "^bin$k incr" $RES | awk '{ print $3 }' | med); full $(grep "^bin$k full" $RES | awk '{ print $3 }' | med)"
done
