#!/usr/bin/env bash
# Runs the CPU benchmark of arbiter and of HF transformers on "bench-small" side by side, in one
# run on the same machine, in f32 and in bf16, and prints both ratios. Needs the fixture venv:
#   python3 -m venv .venv && .venv/bin/pip install -r tests/fixtures/requirements.txt
# Usage: scripts/bench-cpu.sh [iters]   (PYTHON=... to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
iters="${1:-5}"
py="${PYTHON:-.venv/bin/python}"
cargo build --release -q -p arbiter-engine --example bench_small
cpu_field() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2 | xargs; }
isa=$(grep -m1 '^flags' /proc/cpuinfo | grep -ow -e avx512f -e avx512_bf16 -e avx2 -e fma | sort -u | xargs)
# The kind of core decides the GEMM micro-kernel and where the gap to torch lies (docs/bench-cpu.md).
echo "machine: $(nproc) cores, $(cpu_field 'model name'), cpu family $(cpu_field 'cpu family') model $(cpu_field 'model[[:space:]]*:' || true), ${isa:-no AVX}, $(date -u +%F)"
# One side-by-side pair per precision: arbiter and torch, each in f32 and in bf16.
run_pair() { # precision (f32|bf16), torch dtype, iterations
    local ours theirs a h
    ours=$("${CARGO_TARGET_DIR:-target}"/release/examples/bench_small --iters "$3" --threads 2 --dtype "$1" --precision "$1")
    theirs=$("$py" tests/fixtures/bench_hf.py --iters "$3" --threads 2 --dtype "$2")
    echo "$ours" | grep -v '^ARBITER_TOKENS_PER_S'
    echo "$theirs" | grep -v '^HF_TOKENS_PER_S'
    a=$(echo "$ours" | awk '/^ARBITER_TOKENS_PER_S/ {print $2}')
    h=$(echo "$theirs" | awk '/^HF_TOKENS_PER_S/ {print $2}')
    ratios+=("ratio arbiter / HF transformers ($1, 2 threads): $(python3 -c "print(f'{$a / $h:.2f}x')") ($a vs $h tokens/s)")
    echo
}
ratios=()
run_pair f32 float32 "$iters"
# torch's bf16 is slow on CPUs without AVX512-BF16 (tens of seconds a forward): fewer iterations.
run_pair bf16 bfloat16 "$(( iters < 3 ? iters : 3 ))"
printf '%s\n' "${ratios[@]}"
