#!/usr/bin/env bash
# Two builds of arbiter side by side, for refactors that must not cost speed: `arbiter score` on
# a 2,000-line file (tests/compare/make_inputs.py, CPU, demo model) and scripts/bench-serve.sh's
# served/offline ratio, each run 3 times alternating A and B; prints every run and the medians.
#
# Usage: scripts/bench-builds.sh BIN_DIR_A BIN_DIR_B [serve seconds]
#   BIN_DIR_*: folders with release `arbiter` and `arbiter-load` binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 BIN_DIR_A BIN_DIR_B [serve seconds]" >&2; exit 2; }
a="$1"; b="$2"; secs="${3:-10}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 tests/compare/make_inputs.py "$work/in.jsonl" 2000
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
echo "| run | build | arbiter score, 2000 lines (s) | served / offline (demo) | served / offline (bench-small) |"
echo "|---|---|---|---|---|"
declare -A cli demo small
for run in 1 2 3; do
  for side in a b; do
    dir=$([ $side = a ] && echo "$a" || echo "$b")
    t0=$(date +%s.%N)
    "$dir/arbiter" score --demo --input "$work/in.jsonl" --output "$work/out.jsonl" 2>/dev/null || true
    t1=$(date +%s.%N)
    s=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
    ratios=$(ARBITER_BIN_DIR="$dir" scripts/bench-serve.sh "$secs" 32 | awk -F'|' '/^\| (demo|bench-small) /{gsub(/ /, "", $14); print $14}' | xargs)
    echo "| $run | $side | $s | ${ratios% *} | ${ratios#* } |"
    cli[$side]+="$s "; demo[$side]+="${ratios% *} "; small[$side]+="${ratios#* } "
  done
done
median() { python3 -c "import statistics, sys; print(statistics.median(float(x) for x in sys.argv[1:]))" $1; }
for side in a b; do
  echo "| median | $side | $(median "${cli[$side]}") | $(median "${demo[$side]}") | $(median "${small[$side]}") |"
done
