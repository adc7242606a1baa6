#!/usr/bin/env bash
# bench/vm.sh: the same fio jobs, in one VM (scripts/vmtest: Debian's kernel
# under qemu, TCG unless VM_ACCEL=kvm, VM_SMP CPUs, default 2), on
#   plain        a virtio disk
#   umbra        Umbra's NBD export of a virtio disk through the kernel's
#                nbd-client, no snapshot
#   umbra+snap   the same with a live snapshot taken before the first write
#   umbra+psnap  the same with a live persistent snapshot (--persistent:
#                each preserved chunk and its mapping are fsynced before
#                the write goes on, as dm-snapshot's persistent store does)
#   nbdkit       nbdkit's file plugin over a virtio disk, through the same
#                kernel nbd client (a userspace NBD peer, no snapshot)
#   qemu-nbd     qemu-nbd over a virtio disk, likewise
#   lvm-thick    an LVM LV with a thick (dm-snapshot) snapshot
#   lvm-thin     a thin LV with a thin snapshot
# Each target gets its own virtio disk (Umbra's shadow storage: ext4 on one
# more), is filled once, then: first write (4 KiB random writes over the
# whole region, each block once: under a snapshot every one copies),
# rewrite (the same again), read (4 KiB random reads). Throughput is
# reported as a ratio to the plain disk: under TCG absolute numbers mean
# little. The plain disk is measured first and again last, and the ratios
# are to the mean of the two: how far they lie apart shows how much the
# host's load moved during the run. Each pass also prints the share of the
# guest's CPU time that was idle during it (from /proc/stat): a path that
# leaves the CPUs idle waits (for a disk, a wakeup), one that does not is
# bound by the emulated CPU.
#
#   bench/vm.sh [REGION_MIB]     (default 32)
#
# VM_ACCEL=kvm runs the guest under KVM (scripts/vmtest --accel kvm) where
# /dev/kvm works: the comparison that decides the speed goal of issue 32.
#
# The guest's clock: under TCG the guest reads it from the TSC (kernel
# arguments clocksource=tsc tsc=reliable), as a server on real hardware
# or a KVM guest (kvm-clock) does, through the vDSO without a system
# call. Left to itself the TCG guest's kernel distrusts the emulated TSC
# and picks hpet, which has no vDSO path: every clock read of every
# process is then a system call and an emulated device access. That
# taxes the programs that read the clock often — fio itself, and Go's
# scheduler in `umbra serve` (5109 clock_gettime calls in 2048 first
# writes, 2.5 a request, measured 2026-12-07; none with tsc) — far more
# than in-kernel dm, and the comparison would measure the emulated
# clock, not the paths. VM_CLOCKSOURCE=hpet measures the old way; under
# KVM the kernel's own choice (kvm-clock) stands unless it is given.
# The guest prints the clocksource it runs with.
#
# VM_CONNS=N connects each nbd device with N connections (nbd-client -C
# N; qemu-nbd then takes N clients), default 1. Two measured no faster
# for Umbra in this VM (2 vCPUs, TCG; 2026-12-07): see docs/benchmarks.md.
#
# VM_JOBS=N (2, 4, 8 or 16) adds a fourth pass to every target, after
# the three of one fio job: a first write by N fio jobs at once, each on
# its own slice of the region and its own CPU (fio --numjobs,
# cpus_allowed_policy=split), iodepth 16/N each (16 in flight in all, as
# in the one-job passes), the nbd devices reconnected with N connections
# (nbd-client -C N) and each target's snapshot taken again first, so that
# every block is a first write once more. Real servers write from many
# processes at once; the kernel's nbd client sends a request on the
# connection of the CPU that submitted it, so this pass is where several
# connections can help.
#
# VM_SMP=N gives the guest N virtual CPUs (default 2), for every target
# alike.
#
# VM_CHUNK=SIZE serves Umbra's volumes with that copy-on-write chunk size
# (`umbra serve --chunk-size`, 4K to 1M; default 4K, dm-snapshot's here):
# VM_CHUNK=64K copies as LVM-thin's pool does (64 KiB chunks).
#
# VM_TARGETS="plain umbra nbdkit" runs only those targets (plain always
# runs: it is what the others are divided by), for shorter runs while
# working on one path.
#
# VM_PROFILE=DIR measures where a first write's time goes instead: each
# target runs only its first-write pass; `umbra serve` runs under
# UMBRA_CPUPROFILE (DIR/serve.prof, covering the fills and the
# first-write passes of the Umbra targets), and each first-write pass of
# a userspace server (Umbra, nbdkit, qemu-nbd) runs a second time under
# `strace -c -f` attached to that server (DIR/strace-TARGET.txt; the
# ratios printed are those of the passes without strace).
#
# VM_UMBRA_B=BINARY compares this tree's umbra (A) with another build (B,
# a path outside /tmp) instead: only the first write under a live
# snapshot, A and B alternating for VM_ROUNDS rounds (default 3), each
# pass on a freshly started server, freshly filled volume and new
# snapshot; it prints each pass and the ratio B/A per round.
set -euo pipefail

if [ -z "${VMTEST_OUT:-}" ]; then
  # On the host: boot the VM with eight scratch disks and run this script in it.
  cd "$(dirname "$0")/.."
  bench/machine.sh
  accel=${VM_ACCEL:-tcg}
  clock=${VM_CLOCKSOURCE:-}
  if [ -z "$clock" ] && [ "$accel" = tcg ]; then clock=tsc; fi
  smp=${VM_SMP:-2}
  echo "guest: Debian's kernel under qemu ${accel^^}, $smp vCPUs, 2 GiB, clocksource ${clock:-as the kernel chooses}; disks are sparse files (cache=unsafe)"
  case "${VM_JOBS:-1}" in 1|2|4|8|16) ;; *) echo "bench/vm.sh: VM_JOBS must be 1, 2, 4, 8 or 16" >&2; exit 2 ;; esac
  case "${VM_CHUNK:-4K}" in 4K|8K|16K|32K|64K|128K|256K|512K|1M) ;; *) echo "bench/vm.sh: VM_CHUNK must be a power of two from 4K to 1M (4K, 8K, ... 1M)" >&2; exit 2 ;; esac
  vm=(scripts/vmtest --accel "$accel" --smp "$smp" -e "VM_JOBS=${VM_JOBS:-1}" --disk 1G --disk 1G --disk 1G --disk 1G --disk 1G --disk 1G
    --disk 1G --disk 1G -e "VM_TARGETS=${VM_TARGETS:-}" -e "VM_CLOCKSOURCE=$clock" -e "VM_CONNS=${VM_CONNS:-1}"
    -e "VM_CHUNK=${VM_CHUNK:-4K}" --timeout 3600)
  if [ -n "$clock" ]; then vm+=(--append "clocksource=$clock tsc=reliable"); fi
  if [ -n "${VM_UMBRA_B:-}" ]; then
    case "$VM_UMBRA_B" in /tmp/*|/run/*) echo "bench/vm.sh: VM_UMBRA_B must lie outside /tmp and /run (the guest replaces them)" >&2; exit 2 ;; esac
    vm+=(-e "VM_UMBRA_B=$(realpath "$VM_UMBRA_B")" -e "VM_ROUNDS=${VM_ROUNDS:-3}")
  fi
  if [ -z "${VM_PROFILE:-}" ]; then exec "${vm[@]}" bench/vm.sh "${1:-32}"; fi
  mkdir -p "$VM_PROFILE"
  log=$(mktemp)
  rc=0
  "${vm[@]}" --keep -e VM_PROFILE=1 bench/vm.sh "${1:-32}" 2>&1 | tee "$log" || rc=$?
  run=$(sed -n 's/^vmtest: kept //p' "$log" | tail -1)
  rm -f "$log"
  if [ -n "$run" ] && [ -d "$run/out" ]; then
    cp "$run"/out/serve.prof "$run"/out/strace-*.txt "$VM_PROFILE"/ 2>/dev/null || true
    cp "$run/umbra" "$VM_PROFILE/umbra" 2>/dev/null || true
    rm -rf "$run"
    echo "bench/vm.sh: profiles in $VM_PROFILE ($(cd "$VM_PROFILE" && echo *))"
  fi
  exit "$rc"
fi

# In the guest.
mib=${1:-32}
conns=${VM_CONNS:-1}
jobs=${VM_JOBS:-1}
if [ $((mib % jobs)) != 0 ]; then echo "bench/vm.sh: the region ($mib MiB) must divide among VM_JOBS=$jobs jobs" >&2; exit 2; fi
cs=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)
echo "guest clocksource: $cs (available: $(cat /sys/devices/system/clocksource/clocksource0/available_clocksource))"
if [ -n "${VM_CLOCKSOURCE:-}" ] && [ "$cs" != "$VM_CLOCKSOURCE" ]; then
  echo "bench/vm.sh: the guest runs clocksource $cs, not $VM_CLOCKSOURCE as asked: the figures would not compare" >&2
  exit 1
fi
W=/tmp/bench; mkdir -p "$W/shadow" "$W/lvm"
ip link set lo up
export LVM_SYSTEM_DIR=$W/lvm
cat >"$W/lvm/lvm.conf" <<'EOF'
devices { obtain_device_list_from_udev = 0 external_device_info_source = "none" }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
global { locking_dir = "/run/lock/lvm" }
EOF
mkdir -p /run/lock/lvm

cpustat() { awk '/^cpu /{busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6}' /proc/stat; }
job() { # job NAME DEV RW [JOBS]: one fio pass over the region (by JOBS jobs, each on its own slice and CPU); prints KiB/s
  local bw a b n=${4:-1} par=()
  if [ "$n" -gt 1 ]; then
    par=(--numjobs="$n" --offset_increment="$((mib / n))M" --group_reporting
      --cpus_allowed="0-$(($(nproc) - 1))" --cpus_allowed_policy=split)
  fi
  a=$(cpustat)
  fio --name="$1" --filename="$2" --rw="$3" --bs=4k --size="$((mib / n))M" --direct=1 \
    --ioengine=libaio --iodepth="$((16 / n))" --randrepeat=0 "${par[@]}" --output-format=json >"$W/$1.json"
  b=$(cpustat)
  bw=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(int(j["write"]["bw"] + j["read"]["bw"]))' "$W/$1.json")
  if [ -n "${VM_PROFILE:-}" ] && [ -n "${trace_pid:-}" ] && [ "$3" = randwrite ] && command -v strace >/dev/null; then
    # The same pass again, under strace, for syscall counts; a snapshot
    # taken again first, so that every write copies once more.
    if [ ${#retake[@]} -gt 0 ]; then "${retake[@]}" >/dev/null; fi
    strace -c -f -o "$VMTEST_OUT/strace-$1.txt" -p "$trace_pid" 2>/dev/null &
    local st=$!
    sleep 2 # attached to every thread before the pass starts
    fio --name="$1-strace" --filename="$2" --rw="$3" --bs=4k --size="${mib}M" --direct=1 \
      --ioengine=libaio --iodepth=16 --randrepeat=0 --output-format=json >/dev/null
    kill -INT "$st"; wait "$st" || true
    echo "$(( mib * 256 )) requests of 4 KiB" >>"$VMTEST_OUT/strace-$1.txt"
  fi
  echo "$1: guest CPU idle $(awk -v a="$a" -v b="$b" 'BEGIN{split(a, x, " "); split(b, y, " "); t = y[2] - x[2]; printf "%d%%", (t > 0 ? 100 - 100 * (y[1] - x[1]) / t : 0)}')" >>"$W/idle.log"
  echo "$bw"
}
proccost() { # proccost PID: its CPU ticks (user+system), voluntary and involuntary context switches (all threads)
  { awk '{print $14 + $15}' "/proc/$1/stat"; cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt_switches/{v += $2} /^nonvoluntary_ctxt_switches/{n += $2} END{print v, n}'; } | paste -sd' '
}
fill() { dd if=/dev/urandom of="$1" bs=1M count="$mib" oflag=direct status=none; }
declare -A first rewrite rd firstn resnap nbdargs
# nbdconnect DEV ARGS...: connect an nbd device with VM_CONNS connections,
# remembering how, so that the VM_JOBS pass can connect it again with
# VM_JOBS connections (nbdreconnect DEV N).
nbdconnect() { local d=$1; shift; nbdargs[$d]="$*"; nbd-client "$@" "$d" -b 4096 -C "$conns" >/dev/null; }
nbdreconnect() {
  nbd-client -d "$1" >/dev/null
  # shellcheck disable=SC2086 # the remembered arguments, word by word
  nbd-client ${nbdargs[$1]} "$1" -b 4096 -C "$2" >/dev/null
}
targets=(plain umbra umbra+snap umbra+psnap nbdkit qemu-nbd lvm-thick lvm-thin)
if [ -n "${VM_TARGETS:-}" ]; then targets=(plain); for t in $VM_TARGETS; do [ "$t" = plain ] || targets+=("$t"); done; fi
want() { local t; for t in "$@"; do [[ " ${targets[*]} " == *" $t "* ]] && return 0; done; return 1; }
run() { # run TARGET DEV [SNAPSHOT-COMMAND]: fill, snapshot, the three passes
  local t=$1 dev=$2; shift 2
  fill "$dev"
  if [ $# -gt 0 ]; then "$@" >/dev/null; fi
  retake=("$@")
  if [ "${retake[*]:0:3}" = "$UMBRA snapshot create" ]; then retake=("${retake[@]/#s1/s2}"); retake=("${retake[@]/#p1/p2}"); fi
  first[$t]=$(job "$t-first" "$dev" randwrite)
  if [ -n "${VM_PROFILE:-}" ]; then rewrite[$t]=1 rd[$t]=1; return; fi
  rewrite[$t]=$(job "$t-rewrite" "$dev" randwrite)
  rd[$t]=$(job "$t-read" "$dev" randread)
  echo "$t: first ${first[$t]} KiB/s, rewrite ${rewrite[$t]} KiB/s, read ${rd[$t]} KiB/s"
  if [ "$jobs" -gt 1 ]; then
    if [ -n "${nbdargs[$dev]:-}" ]; then nbdreconnect "$dev" "$jobs"; fi
    if [ -n "${resnap[$t]:-}" ]; then eval "${resnap[$t]}" >/dev/null; fi
    firstn[$t]=$(job "$t-first$jobs" "$dev" randwrite "$jobs")
    if [ -n "${nbdargs[$dev]:-}" ]; then nbdreconnect "$dev" "$conns"; fi
    echo "$t: first write by $jobs jobs ${firstn[$t]} KiB/s"
  fi
}

if [ -n "${VM_UMBRA_B:-}" ]; then
  # A/B: the first write under a snapshot, this tree's umbra against another.
  mkfs.ext4 -q /dev/vdc && mount /dev/vdc "$W/shadow"
  for r in $(seq 1 "$VM_ROUNDS"); do
    for side in A B; do
      bin=$UMBRA; [ "$side" = B ] && bin=$VM_UMBRA_B
      d=$W/ab-$side-$r; mkdir -p "$d" "$W/shadow/$side-$r"
      "$bin" serve --state-dir "$d/state" --storage "$W/shadow/$side-$r" --volume v=/dev/vdd \
        --nbd-socket "$d/nbd.sock" --api-socket "$d/api.sock" >"$d/serve.log" 2>&1 &
      serve=$!
      for _ in $(seq 1 600); do "$bin" volume list --api-socket "$d/api.sock" >/dev/null 2>&1 && break; sleep 0.2; done
      nbd-client -unix "$d/nbd.sock" /dev/nbd3 -N v -b 4096 -C "$conns" >/dev/null
      fill /dev/nbd3
      "$bin" snapshot create v --id s1 --api-socket "$d/api.sock" >/dev/null
      a=$(proccost "$serve")
      first[$side-$r]=$(job "$side-$r-first" /dev/nbd3 randwrite)
      b=$(proccost "$serve")
      nbd-client -d /dev/nbd3 >/dev/null
      kill "$serve"; wait "$serve" || true
      rm -rf "$W/shadow/$side-$r"
      echo "round $r $side ($bin): first write under a snapshot ${first[$side-$r]} KiB/s; the server's $(awk -v a="$a" -v b="$b" -v n=$((mib * 256)) 'BEGIN{split(a, x, " "); split(b, y, " "); printf "CPU %.2f ms, context switches %.2f voluntary and %.2f involuntary a request", (y[1] - x[1]) * 10 / n, (y[2] - x[2]) / n, (y[3] - x[3]) / n}')"
    done
    echo "round $r: B/A $(awk -v a="${first[A-$r]}" -v b="${first[B-$r]}" 'BEGIN{printf "%.2f", b/a}')"
  done
  cat "$W/idle.log"
  exit 0
fi

run plain-start /dev/vda

if want umbra umbra+snap umbra+psnap; then
  mkfs.ext4 -q /dev/vdc && mount /dev/vdc "$W/shadow"
  prof=()
  if [ -n "${VM_PROFILE:-}" ]; then prof=(env "UMBRA_CPUPROFILE=$VMTEST_OUT/serve.prof"); fi
  "${prof[@]}" "$UMBRA" serve --state-dir "$W/state" --storage "$W/shadow" --chunk-size "${VM_CHUNK:-4K}" --volume u1=/dev/vdb --volume u2=/dev/vdd >"$W/serve.log" 2>&1 &
  serve=$! trace_pid=$!
  for _ in $(seq 1 600); do "$UMBRA" volume list >/dev/null 2>&1 && break; sleep 0.2; done
  echo "umbra chunk size: $("$UMBRA" volume list --json | jq -r '[.volumes[].chunk_size] | unique | map(tostring) | join(" ")')"
  nbdconnect /dev/nbd0 -unix /run/umbra/nbd.sock -N u1
  nbdconnect /dev/nbd1 -unix /run/umbra/nbd.sock -N u2
  resnap[umbra+psnap]='"$UMBRA" snapshot delete u1 p1 && "$UMBRA" snapshot create u1 --id p1j --persistent'
  resnap[umbra+snap]='"$UMBRA" snapshot delete u2 s1 && "$UMBRA" snapshot create u2 --id s1j'
  if want umbra; then run umbra /dev/nbd0; fi
  if want umbra+psnap; then run umbra+psnap /dev/nbd0 "$UMBRA" snapshot create u1 --id p1 --persistent; fi
  if want umbra+snap; then run umbra+snap /dev/nbd1 "$UMBRA" snapshot create u2 --id s1; fi
  nbd-client -d /dev/nbd0 >/dev/null; nbd-client -d /dev/nbd1 >/dev/null
  kill "$serve"; wait "$serve" || true
  trace_pid=
fi

# The userspace peers: the same kernel client, the same socket kind (unix),
# each server over its own virtio disk through the guest's page cache as
# Umbra's volumes are (no O_DIRECT on the server side), no snapshot.
peer() { # peer TARGET DEV SOCKET SERVER-COMMAND...: serve DEV, connect /dev/nbd2, run
  local t=$1 dev=$2 sock=$3 pid; shift 3
  "$@" >"$W/$t.log" 2>&1 &
  pid=$! trace_pid=$!
  for _ in $(seq 1 600); do [ -S "$sock" ] && break; sleep 0.2; done
  nbdconnect /dev/nbd2 -unix "$sock"
  run "$t" /dev/nbd2
  nbd-client -d /dev/nbd2 >/dev/null
  kill "$pid" 2>/dev/null || true; wait "$pid" || true
  trace_pid=
}
if want nbdkit; then peer nbdkit /dev/vdg "$W/nbdkit.sock" nbdkit -f -U "$W/nbdkit.sock" file /dev/vdg; fi
if want qemu-nbd; then peer qemu-nbd /dev/vdh "$W/qemu-nbd.sock" qemu-nbd -t -e "$(( conns > jobs ? conns : jobs ))" -f raw -k "$W/qemu-nbd.sock" /dev/vdh; fi

if want lvm-thick; then
  pvcreate -q /dev/vde && vgcreate -q vgthick /dev/vde
  lvcreate -q -y -L "${mib}M" -n lv vgthick
  resnap[lvm-thick]="lvremove -q -y vgthick/snap && lvcreate -q -y -s -L $((mib * 2))M -n snap vgthick/lv"
  run lvm-thick /dev/vgthick/lv lvcreate -q -y -s -L "$((mib * 2))M" -n snap vgthick/lv
  echo "lvm-thick snapshot chunk size: $(lvs --noheadings -o chunk_size vgthick/snap)"
  lvremove -q -y vgthick >/dev/null
fi

if want lvm-thin; then
  pvcreate -q /dev/vdf && vgcreate -q vgthin /dev/vdf
  lvcreate -q -y -L "$((mib * 3))M" -T vgthin/pool
  lvcreate -q -y -V "${mib}M" -T vgthin/pool -n lv
  resnap[lvm-thin]="lvremove -q -y vgthin/snap && lvcreate -q -y -s -n snap vgthin/lv"
  run lvm-thin /dev/vgthin/lv lvcreate -q -y -s -n snap vgthin/lv
  echo "lvm-thin pool chunk size: $(lvs --noheadings -o chunk_size vgthin/pool)"
  lvremove -q -y vgthin >/dev/null
fi

run plain-end /dev/vda
first[plain]=$(( (${first[plain-start]} + ${first[plain-end]}) / 2 ))
rewrite[plain]=$(( (${rewrite[plain-start]} + ${rewrite[plain-end]}) / 2 ))
rd[plain]=$(( (${rd[plain-start]} + ${rd[plain-end]}) / 2 ))
if [ "$jobs" -gt 1 ]; then firstn[plain]=$(( (${firstn[plain-start]} + ${firstn[plain-end]}) / 2 )); fi

echo
cat "$W/idle.log"
echo
echo "4 KiB random I/O over ${mib} MiB, iodepth 16, O_DIRECT; ratio to the plain virtio disk, the mean of its first and last pass (ratios only: absolute figures in a VM mean little)"
if [ "$jobs" -gt 1 ]; then
  echo "first write by $jobs jobs: $jobs fio jobs at once, each on a slice of the region and a CPU of its own, iodepth $((16 / jobs)) each, nbd devices with $jobs connections; ratio to the plain disk by $jobs jobs"
fi
printf '%-12s %12s %12s %12s %14s\n' target "first write" rewrite read "$([ "$jobs" -gt 1 ] && echo "first, $jobs jobs")"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
for t in plain-start plain-end "${targets[@]}"; do
  printf '%-12s %12s %12s %12s %14s\n' "$t" "$(ratio "${first[$t]}" "${first[plain]}")" \
    "$(ratio "${rewrite[$t]}" "${rewrite[plain]}")" "$(ratio "${rd[$t]}" "${rd[plain]}")" \
    "$([ "$jobs" -gt 1 ] && ratio "${firstn[$t]}" "${firstn[plain]}")"
done
for p in nbdkit qemu-nbd; do
  if want umbra && want "$p"; then
    echo "umbra (no snapshot) / $p: first write $(ratio "${first[umbra]}" "${first[$p]}"), rewrite $(ratio "${rewrite[umbra]}" "${rewrite[$p]}"), read $(ratio "${rd[umbra]}" "${rd[$p]}")"
  fi
done
# The goal (issue 32): first writes under a snapshot >= dm-snapshot's and
# >= 0.8x LVM-thin's.
for p in lvm-thick lvm-thin; do
  if want umbra+snap && want "$p"; then
    echo "first write under a snapshot, umbra+snap / $p: $(ratio "${first[umbra+snap]}" "${first[$p]}")$([ "$jobs" -gt 1 ] && echo "; by $jobs jobs $(ratio "${firstn[umbra+snap]}" "${firstn[$p]}")")"
  fi
done
