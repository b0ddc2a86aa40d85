#!/usr/bin/env bash
# Step 2 of the GPU check, on the GPU machine, from the folder scripts/gpu-prepare.sh built
# (copied there as gpu-bundle/gpu-check.sh). Needs the NVIDIA driver, CUDA 13 libraries (toolkit
# or the python wheels), and python3 with torch + transformers; no Rust, no network.
# At most 5 minutes. Results under $OUT (default ./out): gpu-check.md (all tables), logs, JSON.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE/out}
mkdir -p "$OUT"
cd "$HERE"
START=$(date +%s)
status=0

# Libraries. The driver's libcuda is normally on the loader path; cuBLASLt, NVRTC and NCCL come
# from the toolkit or from the NVIDIA wheels next to torch.
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
shim=/tmp/arbiter-libs
mkdir -p "$shim"
for d in "${libdirs[@]}"; do
    if [ -e "$d/libnccl.so.2" ] && [ ! -e "$shim/libnccl.so" ]; then ln -sf "$d/libnccl.so.2" "$shim/libnccl.so"; fi
done
libdirs+=("$shim")
LD_LIBRARY_PATH=$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
if [ ! -f /usr/local/cuda/include/cuda_bf16.h ] && [ -n "${WHEEL_INC:-}" ]; then export ARBITER_CUDA_INCLUDE=$WHEEL_INC; fi
export ARBITER_KERNEL_CACHE=${ARBITER_KERNEL_CACHE:-/tmp/arbiter-kernel-cache}

{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    cat BUILD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/GPU: /'
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "ARBITER_CUDA_INCLUDE=${ARBITER_CUDA_INCLUDE:-}"
} | tee "$OUT/gpu-check.md"

echo "== gpu_check (kernels, NCCL, golden fixtures, gpu-1b, throughput)"
timeout 150 bin/gpu_check --out "$OUT" --fixtures fixtures/golden --work /tmp/arbiter-gpu-check \
    --sections ops,nccl,golden,bench-small,gpu1b,throughput 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "gpu_check exited $rc"; status=1; }
[ -f "$OUT/rust-report.md" ] && cat "$OUT/rust-report.md" >>"$OUT/gpu-check.md"

echo "== gpu_check, model parallelism (TP=2 and TP=2 x PP=2 on one GPU; the 340B rank shape)"
timeout 60 bin/gpu_check --out "$OUT/parallel" --fixtures fixtures/golden --work /tmp/arbiter-gpu-check \
    --sections parallel 2>&1 | tee "$OUT/gpu_check_parallel.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "gpu_check (parallel) exited $rc"; status=1; }
[ -f "$OUT/parallel/rust-report.md" ] && cat "$OUT/parallel/rust-report.md" >>"$OUT/gpu-check.md"

echo "== transformers comparison"
if [ -f "$OUT/rust-results.json" ]; then
    PYTHONUNBUFFERED=1 timeout 70 python3 gpu_hf.py --out "$OUT" 2>&1 | tee "$OUT/hf.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "gpu_hf.py exited $rc"; status=1; }
else
    echo "skipped: gpu_check wrote no results"
    status=1
fi

echo "== arbiter score --device cuda against --device cpu (demo model, through the CLI)"
cli_in=/tmp/arbiter-cli-in.jsonl
printf '%s\n' '{"text": "The assistant gives a short and helpful answer."}' \
    '{"text": "A longer text about reward models, packed batches and GPUs, scored twice."}' \
    '{"token_ids": [5, 6, 7, 8, 9, 10, 11]}' >"$cli_in"
if timeout 20 bin/arbiter score --demo --device cuda --input "$cli_in" --output /tmp/arbiter-cli-cuda.jsonl 2>"$OUT/cli.log" &&
    timeout 20 bin/arbiter score --demo --device cpu --input "$cli_in" --output /tmp/arbiter-cli-cpu.jsonl 2>>"$OUT/cli.log"; then
    python3 - <<'PY' | tee -a "$OUT/gpu-check.md"
import json
cuda = [json.loads(l) for l in open("/tmp/arbiter-cli-cuda.jsonl")]
cpu = [json.loads(l) for l in open("/tmp/arbiter-cli-cpu.jsonl")]
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
    echo "CLI: arbiter score failed (see cli.log)" | tee -a "$OUT/gpu-check.md"
    tail -5 "$OUT/cli.log"
    status=1
fi

echo "== done in $(($(date +%s) - START)) s; tables in $OUT/gpu-check.md"
grep -E "^RESULT|FAIL|MISSED|SKIPPED" "$OUT/gpu-check.md" || true
[ "$status" -eq 0 ] && echo "GPU CHECK: PASSED" || echo "GPU CHECK: FAILED"
exit "$status"
