#!/usr/bin/env bash
# Step 2 of the GPU check, on the GPU machine, from the folder scripts/gpu-prepare.sh built
# (copied there as gpu-bundle/gpu-check.sh). Needs the NVIDIA driver, CUDA 13 libraries (toolkit
# or the python wheels), and python3 with torch + transformers; no Rust, no network.
#
# At most 6 minutes: every step's timeout is cut to what is left of $GPU_CHECK_SECONDS (default
# 350; the device call's limit is 360). Leaves exactly two files in $OUT (default ./out), because
# the GPU machine returns at most 8:
#   gpu-check.md            every table, the versions, and the end verdict
#   gpu-check-logs.tar.gz   gpu-check-logs/: the logs, the JSON of both sides, parallel/, the CLI
#                           outputs; rewritten after every step and on exit, so a step that fails
#                           or hangs still leaves the ones before it
# $GPU_CHECK_WORK (default /tmp/arbiter-gpu-check) holds the models written for the check (kept
# for a second run) and the logs folder before it is archived.
#
# `gpu-check.sh --fp8` runs only the FP8 check (gpu_check --sections fp8, issue 19: the FP8
# kernels and GEMMs against the CPU reference, FP8 vs bf16 GEMMs at the 340B rank shapes with fast
# and slow accumulation, gpu-1b in FP8 vs bf16) in the same time limit, with the same two files.
set -uo pipefail
case "${1:-}" in
    "") MODE=all ;;
    --fp8) MODE=fp8 ;;
    *) echo "usage: gpu-check.sh [--fp8]" >&2; exit 2 ;;
esac
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE/out}
WORK=${GPU_CHECK_WORK:-/tmp/arbiter-gpu-check}
LOGS=$WORK/gpu-check-logs
REPORT=$OUT/gpu-check.md
ARCHIVE=$OUT/gpu-check-logs.tar.gz
# Each file that goes back may hold 16 MB; a log is cut to its end beyond this.
LOG_CAP_BYTES=$((4 * 1000 * 1000))
mkdir -p "$OUT" "$WORK"
rm -rf "$LOGS" "$REPORT" "$ARCHIVE"
mkdir -p "$LOGS"
cd "$HERE" || exit 2
START=$(date +%s)
END=$((START + ${GPU_CHECK_SECONDS:-350}))
status=0

# Archives the logs folder into $OUT (to a temporary name first: a kill mid-write leaves the
# previous archive). Called after every step and on exit.
archive() {
    local f
    for f in "$LOGS"/*.log "$LOGS"/*/*.log; do
        [ -f "$f" ] || continue
        if [ "$(stat -c %s "$f")" -gt "$LOG_CAP_BYTES" ]; then
            tail -c "$LOG_CAP_BYTES" "$f" >"$f.cut" && mv "$f.cut" "$f"
        fi
    done
    tar -czf "$ARCHIVE.part" -C "$WORK" gpu-check-logs && mv "$ARCHIVE.part" "$ARCHIVE"
}
trap archive EXIT
trap 'echo "gpu-check: interrupted" | tee -a "$REPORT"; exit 130' INT TERM

# Seconds for the next step: its own budget, cut to what is left before END (at least 1).
budget() {
    local left=$((END - $(date +%s)))
    [ "$left" -lt "$1" ] && set -- "$left"
    [ "$1" -lt 1 ] && set -- 1
    echo "$1"
}

# Says why a step failed, in the report too.
failed() {
    echo "$1" | tee -a "$REPORT"
    status=1
}

# Records a step's exit code RC (second argument) under NAME (first) when it is not 0.
exited() {
    case $2 in
        0) ;;
        124) failed "$1 timed out (killed at the end of its time budget)" ;;
        *) failed "$1 exited $2" ;;
    esac
}

# The verdict: every RESULT, FAIL, MISSED and SKIPPED line of the report, then PASSED or FAILED.
finish() {
    {
        echo
        echo "== done in $(($(date +%s) - START)) s; logs and JSON in $(basename "$ARCHIVE")"
        grep -E "^RESULT|FAIL|MISSED|SKIPPED" "$REPORT" || true
        [ "$status" -eq 0 ] && echo "GPU CHECK: PASSED" || echo "GPU CHECK: FAILED"
    } >"$LOGS/summary.txt"
    tee -a "$REPORT" <"$LOGS/summary.txt"
    exit "$status"
}

# Libraries. The driver's libcuda is normally on the loader path; cuBLASLt, NVRTC and NCCL come
# from the toolkit or from the NVIDIA wheels next to torch. Only the Rust binaries get these
# folders: torch loads its own cuBLAS and nvJitLink, and with the toolkit's ahead of them on
# LD_LIBRARY_PATH it can pick up a mismatched one ("undefined symbol",
# CUBLAS_STATUS_INVALID_VALUE), so every python3 below runs with the original LD_LIBRARY_PATH.
libdirs=()
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && libdirs+=("$d")
done
PYINFO=$(python3 - <<'PY' 2>/dev/null
import glob, os, sys
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
libs = sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "*", "lib", "lib*.so*"))})
incs = [d for r in roots for d in (os.path.join(r, "cu13", "include"), os.path.join(r, "cuda_runtime", "include"))
        if os.path.isfile(os.path.join(d, "cuda_bf16.h"))]
print("PREFIX", sys.prefix)
for l in libs:
    print("LIB", l)
for i in incs[:1]:
    print("INC", i)
PY
)
while read -r kind path; do
    case "$kind" in
        LIB) libdirs+=("$path") ;;
        INC) WHEEL_INC=$path ;;
        PREFIX) export VIRTUAL_ENV=$path ;;
    esac
done <<<"$PYINFO"
# cudarc looks for libnccl.so (not the wheel's libnccl.so.2): give it that name.
shim=$WORK/libs
mkdir -p "$shim"
rm -f "$shim/libnccl.so"
for d in "${libdirs[@]}"; do
    if [ -e "$d/libnccl.so.2" ] && [ ! -e "$shim/libnccl.so" ]; then ln -sf "$d/libnccl.so.2" "$shim/libnccl.so"; fi
done
libdirs+=("$shim")
RUST_LD_LIBRARY_PATH=$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# Runs a bundled Rust binary (under `timeout`) with the CUDA library folders on the loader path.
rust() {
    LD_LIBRARY_PATH=$RUST_LD_LIBRARY_PATH timeout "$@"
}
if [ ! -f /usr/local/cuda/include/cuda_bf16.h ] && [ -n "${WHEEL_INC:-}" ]; then export ARBITER_CUDA_INCLUDE=$WHEEL_INC; fi
export ARBITER_KERNEL_CACHE=${ARBITER_KERNEL_CACHE:-$WORK/kernel-cache}

{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    cat BUILD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/GPU: /'
    nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9.]*" | sed 's/^/driver /'
    # Driver 580 (CUDA 13.0) cannot load the PTX of NVRTC 13.1 or later: show every candidate
    # (gpu_check's report names the one it loaded and its version).
    for d in "${libdirs[@]}"; do
        for f in "$d"/libnvrtc.so*; do [ -e "$f" ] && echo "libnvrtc candidate: $f -> $(readlink -f "$f")"; done
    done
    echo "LD_LIBRARY_PATH for the Rust binaries: $RUST_LD_LIBRARY_PATH"
    echo "LD_LIBRARY_PATH for python3 (as given): ${LD_LIBRARY_PATH:-}"
    echo "ARBITER_CUDA_INCLUDE=${ARBITER_CUDA_INCLUDE:-}"
} | tee "$REPORT"

if [ "$MODE" = fp8 ]; then
    echo "== gpu_check --sections fp8 (FP8 kernels and GEMMs vs the CPU; FP8 vs bf16 GEMMs and gpu-1b)"
    # Writes gpu-1b twice (bf16, FP8) unless a previous run left them in $WORK.
    rust "$(budget 330)" bin/gpu_check --out "$LOGS/fp8" --fixtures fixtures/golden --work "$WORK" \
        --sections fp8 2>&1 | tee "$LOGS/gpu_check_fp8.log"
    rc=${PIPESTATUS[0]}
    [ -f "$LOGS/fp8/rust-report.md" ] && cat "$LOGS/fp8/rust-report.md" >>"$REPORT"
    exited "gpu_check (fp8)" "$rc"
    archive
    finish
fi

echo "== gpu_check (kernels, golden fixtures, gpu-1b, throughput, NCCL)"
rust "$(budget 150)" bin/gpu_check --out "$LOGS" --fixtures fixtures/golden --work "$WORK" \
    --sections ops,golden,bench-small,gpu1b,throughput,nccl 2>&1 | tee "$LOGS/gpu_check.log"
rc=${PIPESTATUS[0]}
[ -f "$LOGS/rust-report.md" ] && cat "$LOGS/rust-report.md" >>"$REPORT"
exited gpu_check "$rc"
archive

echo "== gpu_check, model parallelism (TP=2 and TP=2 x PP=2 on one GPU; the 340B rank shape)"
# Writes and loads the 3.45 GB rank-shape model besides running it.
rust "$(budget 90)" bin/gpu_check --out "$LOGS/parallel" --fixtures fixtures/golden --work "$WORK" \
    --sections parallel 2>&1 | tee "$LOGS/gpu_check_parallel.log"
rc=${PIPESTATUS[0]}
[ -f "$LOGS/parallel/rust-report.md" ] && cat "$LOGS/parallel/rust-report.md" >>"$REPORT"
exited "gpu_check (parallel)" "$rc"
archive

echo "== transformers comparison"
if [ -f "$LOGS/rust-results.json" ]; then
    PYTHONUNBUFFERED=1 timeout "$(budget 70)" python3 gpu_hf.py --out "$LOGS" --report "$REPORT" 2>&1 |
        tee "$LOGS/hf.log"
    exited gpu_hf.py "${PIPESTATUS[0]}"
else
    failed "transformers comparison skipped: gpu_check wrote no results"
fi
archive

echo "== arbiter score --device cuda against --device cpu (demo model, through the CLI)"
cli_in=$LOGS/cli-in.jsonl
printf '%s\n' '{"text": "The assistant gives a short and helpful answer."}' \
    '{"text": "A longer text about reward models, packed batches and GPUs, scored twice."}' \
    '{"token_ids": [5, 6, 7, 8, 9, 10, 11]}' >"$cli_in"
if rust "$(budget 15)" bin/arbiter score --demo --device cuda --input "$cli_in" --output "$LOGS/cli-cuda.jsonl" 2>"$LOGS/cli.log" &&
    rust "$(budget 15)" bin/arbiter score --demo --device cpu --input "$cli_in" --output "$LOGS/cli-cpu.jsonl" 2>>"$LOGS/cli.log"; then
    python3 - "$LOGS/cli-cuda.jsonl" "$LOGS/cli-cpu.jsonl" <<'PY' | tee -a "$REPORT"
import json, sys
cuda = [json.loads(l) for l in open(sys.argv[1])]
cpu = [json.loads(l) for l in open(sys.argv[2])]
worst = 0.0
for a, b in zip(cuda, cpu):
    # The issue's error over each line's attributes (the reward alone can sit near zero).
    ref = b["attributes"]
    diff = max(abs(a["attributes"][k] - v) for k, v in ref.items())
    worst = max(worst, diff / max(max(abs(v) for v in ref.values()), 1e-3))
ok = len(cuda) == len(cpu) == 3 and worst <= 2e-2
print(f"\nCLI: {len(cuda)} lines scored on cuda and cpu, worst attribute error {worst:.2e}: {'ok' if ok else 'FAIL'}")
raise SystemExit(0 if ok else 1)
PY
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    failed "CLI: arbiter score failed (see cli.log in the archive)"
    tail -5 "$LOGS/cli.log"
fi

finish
