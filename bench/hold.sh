#!/usr/bin/env bash
# Hold window under fio load (issue 4): fio writes 4 KiB blocks at random
# at queue depth 16 through the NBD export of a volume while snapshot sets
# are taken through the API, one after another; each set reports how long
# writes were held (flush-and-hold, commit, release). Prints p50/p99/max
# of the hold and fio's IOPS. Everything on tmpfs.
#   bench/hold.sh [snapshots] [fio-jobs] [hogs-per-core]
# hogs-per-core > 0 is the loaded-machine row: that many CPU hogs (busy
# loops at normal priority) per core run beside fio for the whole
# measurement, as other work on a busy host would.
# UMBRA_BIN=path runs that binary instead of building one (A/B runs);
# UMBRA_SERVE_ARGS adds flags to `umbra serve` (--hold-priority normal).
set -euo pipefail
cd "$(dirname "$0")/.."
bench/machine.sh
N=${1:-100}
JOBS=${2:-1}
HOGS=${3:-0}
for t in fio python3; do
	command -v $t >/dev/null || { echo "bench/hold.sh: needs $t"; exit 1; }
done
W=/dev/shm/umbra-bench-hold
rm -rf "$W"; mkdir -p "$W"
SERVE=""
FIO=""
HOGPIDS=""
cleanup() {
	[ -n "$HOGPIDS" ] && kill $HOGPIDS 2>/dev/null || true
	[ -n "$FIO" ] && kill "$FIO" 2>/dev/null || true
	[ -n "$SERVE" ] && kill "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT
if [ -n "${UMBRA_BIN:-}" ]; then cp "$UMBRA_BIN" "$W/umbra"; else go build -o "$W/umbra" ./cmd/umbra; fi
truncate -s 1G "$W/img"
"$W/umbra" serve --volume disk="$W/img" --state-dir "$W/state" --nbd-socket "$W/nbd.sock" --api-socket "$W/api.sock" ${UMBRA_SERVE_ARGS:-} 2>"$W/serve.log" &
SERVE=$!
for _ in $(seq 100); do [ -S "$W/api.sock" ] && break; sleep 0.1; done
umbra() { "$W/umbra" --api-socket "$W/api.sock" "$@"; }

fio --name=load --ioengine=nbd --uri="nbd+unix:///disk?socket=$W/nbd.sock" --rw=randwrite --bs=4k \
	--iodepth=16 --numjobs="$JOBS" --size=512M --time_based --runtime=3600 --group_reporting \
	--output-format=json >"$W/fio.json" 2>/dev/null &
FIO=$!
for _ in $(seq $((HOGS * $(nproc)))); do
	(while :; do :; done) &
	HOGPIDS="$HOGPIDS $!"
done
sleep 2 # fio at full speed
start=$(date +%s.%N)
for i in $(seq "$N"); do
	umbra snapshot create disk --id "h$i" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["hold_micros"])' >>"$W/holds"
	# Keep a few snapshots live, as a schedule does: first writes are COW.
	[ "$i" -gt 3 ] && umbra snapshot delete disk "h$((i - 3))" >/dev/null
done
end=$(date +%s.%N)
[ -n "$HOGPIDS" ] && kill $HOGPIDS 2>/dev/null || true
HOGPIDS=""
kill -INT "$FIO" 2>/dev/null || true # fio may have run its time out
wait "$FIO" 2>/dev/null || true
FIO=""
python3 - "$W/holds" "$W/fio.json" "$N" "$JOBS" "$start" "$end" "$HOGS" "$(nproc)" "${UMBRA_SERVE_ARGS:-}" "$(cut -d' ' -f1 /proc/loadavg)" <<'EOF'
import json, sys
holds = sorted(int(x) for x in open(sys.argv[1]))
def pct(p):
    return holds[min(len(holds) - 1, int(round(p / 100 * (len(holds) - 1))))]
try:
    text = open(sys.argv[2]).read()
    d = json.loads(text[text.index("{"):])
    iops = int(d["jobs"][0]["write"]["iops"])
except Exception:
    iops = 0
hogs = int(sys.argv[7])
load = f", {hogs * int(sys.argv[8])} CPU hogs ({hogs} per core)" if hogs else ""
args = f", serve {sys.argv[9]}" if sys.argv[9] else ""
print(f"hold window over {sys.argv[3]} snapshot sets under fio nbd randwrite 4k QD16 x{sys.argv[4]}{load}{args} ({iops} IOPS over the run), {float(sys.argv[6]) - float(sys.argv[5]):.1f} s, load average {sys.argv[10]} at the end")
print(f"| p50 | p90 | p99 | max |")
print(f"|---|---|---|---|")
print(f"| {pct(50)} µs | {pct(90)} µs | {pct(99)} µs | {holds[-1]} µs |")
EOF
