#!/usr/bin/env bash
# Image backup at scale (issue 28): memory and metadata against the
# number of unique chunks, Umbra side by side with restic.
#   - Umbra: BenchmarkScale (backup/scale_bench_test.go) in its own
#     process per size: a synthetic volume of N unique, compressible
#     4 KiB chunks (every 8-byte word is its offset, as `nbdkit pattern`)
#     followed by a hole 15 times as large; full backup, an incremental
#     after 1 % of the data chunks were rewritten at scattered places
#     (from a change bitmap, as the service's), verify, delete of the
#     full image (prune), stats, restore of the incremental (into a sink
#     that checks every chunk against the pattern and stores nothing:
#     16 Mi chunks would need 64 GiB of disk), repair --dry-run
#     (UMBRA_SCALE_SKIP=repair-check,... leaves phases out); peak RSS
#     of each phase (VmHWM, reset before it), RSS once it ended and its
#     memory was given back, metadata the incremental wrote (everything
#     but packs); on stderr, what each phase's resident set was made of
#     at its highest (RssAnon, RssFile, RssShmem; the Go heap's objects,
#     free spans, goal: BenchmarkScale's PHASE-peak-* lines).
#   - restic: `restic backup` of the same data (`nbdkit pattern` served
#     as a file through nbdfuse; only the data part, restic would read
#     the hole too), `restic restore`, `restic check --read-data`,
#     `restic forget --prune`, each with /usr/bin/time's peak RSS.
# The repositories live under DIR (default /tmp: disk, not tmpfs, so
# 4 M chunks fit). SIZES lists millions of chunks (default "1 4"; 16
# takes about an hour on 2 cores). Usage:
#   bench/scale.sh                 # markdown table on stdout
#   SIZES="1 4 16" bench/scale.sh
#   UMBRA=0 / RESTIC=0 bench/scale.sh   # one side only
set -euo pipefail
cd "$(dirname "$0")/.."
bench/machine.sh
SIZES=${SIZES:-"1 4"}
DIR=${DIR:-/tmp}
W=$(mktemp -d "$DIR/umbra-bench-scale.XXXXXX")
export RESTIC_PASSWORD=bench-password
unmount() { umount "$1" 2>/dev/null || fusermount3 -u "$1"; }
cleanup() {
	if [ -n "${FUSE:-}" ] && mountpoint -q "$FUSE"; then unmount "$FUSE" || true; fi
	rm -rf "$W"
}
trap cleanup EXIT
go test -c -o "$W/backup.test" ./backup
have_restic=1
command -v restic >/dev/null && command -v nbdfuse >/dev/null && command -v nbdkit >/dev/null || have_restic=0
rss() { grep 'Maximum resident' "$1" | awk '{printf "%.0f", $NF/1024}'; } # MiB
mib() { echo "scale=1; $1 / 1048576" | bc; }

echo "| unique chunks | tool | backup peak RSS | RSS after | incremental peak RSS | incremental metadata (% of changed bytes) | restore peak RSS | verify peak RSS | prune peak RSS | stats peak RSS | repair check peak RSS | repository | backup s | incremental s |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for m in $SIZES; do
	n=$((m * 1048576))
	out=$W/umbra-$m.txt
	if [ "${UMBRA:-1}" = 1 ]; then
		(cd "$W" && UMBRA_SCALE_CHUNKS=$n UMBRA_SCALE_DIR=$W ./backup.test -test.run XXX -test.bench BenchmarkScale -test.benchtime 1x >"$out" 2>&1) || { cat "$out" >&2; exit 1; }
		v() { awk -v k="$1" '$3 == k {print $4}' "$out"; }
		grep -- '-peak-' "$out" | grep -v -- '-peak-rss ' >&2 || true
		echo "| $m M | umbra | $(v backup-peak-rss) MiB | $(v backup-after-rss) MiB | $(v incremental-peak-rss) MiB | $(v incremental-metadata) MiB ($(v incremental-metadata-pct) %) of $(v incremental-changed) MiB | $(v restore-peak-rss) MiB | $(v verify-peak-rss) MiB | $(v prune-peak-rss) MiB | $(v stats-peak-rss) MiB | $(v repair-check-peak-rss) MiB | $(v repo-size) MiB | $(v backup-s) | $(v incremental-s) |"
	fi
	[ "$have_restic" = 1 ] && [ "${RESTIC:-1}" = 1 ] || continue
	FUSE=$W/fuse
	mkdir -p "$FUSE"
	nbdfuse "$FUSE" --command nbdkit -s pattern size=$((n * 4096)) &
	for _ in $(seq 50); do [ -e "$FUSE/nbd" ] && break; sleep 0.1; done
	R=$W/restic-repo
	restic init -q -r "$R"
	t0=$(date +%s.%N)
	/usr/bin/time -v restic backup -q -r "$R" "$FUSE/nbd" 2>"$W/rb.txt" >/dev/null
	t1=$(date +%s.%N)
	/usr/bin/time -v restic restore -q -r "$R" latest --target "$W/restored" 2>"$W/rr.txt" >/dev/null
	rm -rf "$W/restored"
	/usr/bin/time -v restic check -q -r "$R" --read-data 2>"$W/rc.txt" >/dev/null
	size=$(du -sb "$R" | cut -f1)
	snap=$(restic snapshots -q -r "$R" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["short_id"])')
	/usr/bin/time -v restic forget -q -r "$R" --prune "$snap" 2>"$W/rp.txt" >/dev/null
	unmount "$FUSE"
	wait
	echo "| $m M | restic 0.14 | $(rss "$W/rb.txt") MiB | (exits) | (reads everything) | — | $(rss "$W/rr.txt") MiB | $(rss "$W/rc.txt") MiB | $(rss "$W/rp.txt") MiB | — | — | $(mib "$size") MiB | $(echo "$t1 - $t0" | bc) | — |"
	rm -rf "$R"
done
