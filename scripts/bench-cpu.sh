#!/usr/bin/env bash
# Runs the CPU benchmark of arbiter and of HF transformers on "bench-small" side by side, in one
# run on the same machine, and prints the ratio. Needs the fixture venv:
#   python3 -m venv .venv && .venv/bin/pip install -r tests/fixtures/requirements.txt
# Usage: scripts/bench-cpu.sh [iters]   (PYTHON=... to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
iters="${1:-5}"
py="${PYTHON:-.venv/bin/python}"
cargo build --release -q -p arbiter-engine --example bench_small
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
ours=$(target/release/examples/bench_small --iters "$iters" --threads 2)
theirs=$("$py" tests/fixtures/bench_hf.py --iters "$iters" --threads 2)
echo "$ours" | grep -v '^ARBITER_TOKENS_PER_S'
echo "$theirs" | grep -v '^HF_TOKENS_PER_S'
a=$(echo "$ours" | awk '/^ARBITER_TOKENS_PER_S/ {print $2}')
h=$(echo "$theirs" | awk '/^HF_TOKENS_PER_S/ {print $2}')
echo
echo "ratio arbiter / HF transformers (f32, 2 threads): $(python3 -c "print(f'{$a / $h:.2f}x')")"
