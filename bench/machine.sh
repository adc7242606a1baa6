#!/usr/bin/env bash
# Prints the date and the machine the figures that follow are measured
# on, in the words docs/benchmarks.md puts above each table. Every bench
# script runs it first.
set -euo pipefail
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mem=$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)
virt=""
if command -v systemd-detect-virt >/dev/null; then
	vm=$(systemd-detect-virt --vm 2>/dev/null || true)
	ct=$(systemd-detect-virt --container 2>/dev/null || true)
	[ -n "$vm" ] && [ "$vm" != none ] && virt="$virt, virtual machine ($vm)"
	[ -n "$ct" ] && [ "$ct" != none ] && virt="$virt, container ($ct)"
fi
echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores (${cpu:-unknown CPU}), ${mem} GiB${virt}, Linux $(uname -r)"
