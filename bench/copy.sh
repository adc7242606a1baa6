#!/usr/bin/env bash
# Copy between repositories (issue 30's replication), Umbra side by side
# with restic in one run, everything on tmpfs (/dev/shm) so the disk is
# not what is measured:
#   - the volume: SIZE_MIB (default 1024) MiB of real files (a tar of
#     /usr), backed up through the service into an unencrypted and an
#     encrypted Umbra repository, and by restic into its repository;
#   - `umbra copy --all` vs `restic copy` into a new repository, local →
#     local and local → versitygw (S3 on 127.0.0.1): Umbra plain → plain
#     (same chunk names: only missing chunks are read) and encrypted →
#     encrypted under another key (every chunk read and hashed again);
#     restic encrypted → encrypted (its blob IDs are plain SHA-256, so it
#     never hashes again);
#   - then 1 % of the 4 KiB blocks rewritten at scattered places (through
#     the service's NBD export), a second backup each, and the copy again
#     (only the new chunks move).
# Needs restic, qemu-io, bc, versitygw ($(go env GOPATH)/bin). Usage:
#   bench/copy.sh            # prints a markdown table
set -euo pipefail
cd "$(dirname "$0")/.."
bench/machine.sh
SIZE_MIB=${SIZE_MIB:-1024}
VERSITYGW=${VERSITYGW:-$(go env GOPATH)/bin/versitygw}
for t in restic qemu-io bc "$VERSITYGW"; do
	command -v "$t" >/dev/null || { echo "bench/copy.sh: needs $t (apt-get install restic qemu-utils bc; go install github.com/versity/versitygw/cmd/versitygw@latest)" >&2; exit 1; }
done
W=/dev/shm/umbra-bench-copy
rm -rf "$W"; mkdir -p "$W"
BIN=$W/umbra
go build -o "$BIN" ./cmd/umbra
IMG=$W/vol.img
PW=bench-password
export RESTIC_PASSWORD=$PW AWS_ACCESS_KEY_ID=benchkey AWS_SECRET_ACCESS_KEY=benchsecret

cleanup() {
	[ -n "${SERVE:-}" ] && kill "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null || true
	[ -n "${S3:-}" ] && kill "$S3" 2>/dev/null && wait "$S3" 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { printf "%.2f" "$(echo "$2 - $1" | bc)"; }
ratio() { printf "%.2f" "$(echo "scale=4; $1 / $2" | bc)"; }
mib() { printf "%.1f" "$(echo "scale=2; $1 / 1048576" | bc)"; }

# The volume: real files, laid end to end.
tar -cf - /usr/share /usr/lib /usr/bin 2>/dev/null | head -c $((SIZE_MIB << 20)) >"$IMG" || true
truncate -s "${SIZE_MIB}M" "$IMG"

# versitygw on a free port of 127.0.0.1.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$W/s3/bench"
"$VERSITYGW" --port "127.0.0.1:$port" --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" posix --nometa "$W/s3" >/dev/null 2>"$W/s3.log" &
S3=$!
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
S3U=s3+http://127.0.0.1:$port/bench
S3R=s3:http://127.0.0.1:$port/bench

# The service, with the image as a COW volume; three source repositories.
"$BIN" serve --state-dir "$W/state" --api-socket "$W/api.sock" --nbd-socket "$W/nbd.sock" --volume "vol=$IMG" 2>"$W/serve.log" &
SERVE=$!
for _ in $(seq 100); do [ -S "$W/api.sock" ] && break; sleep 0.1; done
umbra() { env -u UMBRA_PASSWORD -u UMBRA_TO_PASSWORD "$BIN" --api-socket "$W/api.sock" "$@"; }
umbra repo init --repo "$W/plain" >/dev/null
UMBRA_PASSWORD=$PW "$BIN" repo init --repo "$W/enc" >/dev/null
restic -q -r "$W/restic" init >/dev/null
backups() {
	umbra backup vol --repo "$W/plain" --writers=false >/dev/null
	UMBRA_PASSWORD=$PW "$BIN" --api-socket "$W/api.sock" backup vol --repo "$W/enc" --writers=false >/dev/null
	restic -q -r "$W/restic" backup "$IMG" >/dev/null
}
backups

# Each copy into its own target: Umbra's created by --init (plain: the
# source's hash, so the same chunk names; encrypted: a key of its own),
# restic's with the source's chunker parameters, as its manual advises.
ucopy() { # FROM TO [env...]
	local from=$1 to=$2
	shift 2
	local t0 t1
	t0=$(now); env -u UMBRA_PASSWORD -u UMBRA_TO_PASSWORD "$@" "$BIN" copy --from "$from" --to "$to" --init --all --json >"$W/copy.json" 2>/dev/null; t1=$(now)
	secs "$t0" "$t1"
}
rcopy() { # TO
	local t0 t1
	restic -q -r "$1" snapshots >/dev/null 2>&1 || restic -q -r "$1" init --from-repo "$W/restic" --from-password-file <(echo "$PW") --copy-chunker-params >/dev/null
	t0=$(now); restic -q -r "$1" copy --from-repo "$W/restic" --from-password-file <(echo "$PW") >/dev/null; t1=$(now)
	secs "$t0" "$t1"
}
moved() { grep -o '"bytes_copied": *[0-9]*' "$W/copy.json" | tail -1 | grep -o '[0-9]*$'; }

rows=()
row() { # LABEL UMBRA_S RESTIC_S
	rows+=("| $1 | $2 | $3 | $(ratio "$3" "$2")x |")
}
pass() { # ROUND: every copy, into the same targets each round
	local a b m
	a=$(ucopy "$W/plain" "$W/to-plain"); m=$(moved)
	b=$(rcopy "$W/to-restic")
	row "$1 local → local, Umbra plain → plain (moved $(mib "$m") MiB)" "$a" "$b"
	a=$(ucopy "$W/enc" "$W/to-enc" UMBRA_PASSWORD=$PW UMBRA_TO_PASSWORD=other-$PW)
	row "$1 local → local, Umbra encrypted → another key (every chunk hashed again)" "$a" "$b"
	a=$(ucopy "$W/plain" "$S3U/plain"); m=$(moved)
	b=$(rcopy "$S3R/restic")
	row "$1 local → versitygw, Umbra plain → plain (moved $(mib "$m") MiB)" "$a" "$b"
	a=$(ucopy "$W/enc" "$S3U/enc" UMBRA_PASSWORD=$PW UMBRA_TO_PASSWORD=other-$PW)
	row "$1 local → versitygw, Umbra encrypted → another key" "$a" "$b"
}
pass "first copy,"

# 1 % of the 4 KiB blocks rewritten, scattered, through NBD; a second
# backup each; the copies again.
n=$((SIZE_MIB * 256 / 100))
awk -v n=$n -v blocks=$((SIZE_MIB * 256)) 'BEGIN { srand(7); for (i = 0; i < n; i++) printf "write -P %d %d 4k\n", int(rand()*255)+1, int(rand()*blocks)*4096 }' |
	qemu-io -f raw "nbd+unix:///vol?socket=$W/nbd.sock" >/dev/null
backups
pass "after 1 % changed,"

echo
echo "Copy of a ${SIZE_MIB} MiB volume of real files (\`bench/copy.sh\`), seconds, Umbra vs restic 0.14 \`copy\` (restic's repositories encrypted, as restic always is):"
echo
echo "| copy | umbra copy, s | restic copy, s | restic's time / Umbra's |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
