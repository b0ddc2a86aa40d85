#!/usr/bin/env bash
# Compile-check of the CUDA kernels (kernels/*.cu) with NVRTC, on a machine without a GPU:
# installs the pinned CUDA 13.0 NVRTC and runtime-header wheels into the repo's .venv, lints the
# kernels crate with its `nvrtc` feature, and runs arbiter-kernels-check, which compiles every
# module for sm_80 and sm_90 (attention for several head dims), the FP8 module (fp8.cu, e4m3)
# for sm_89 and sm_90 only, and fails on any error.
# Called by scripts/test.sh; runs on its own too.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
# 13.0 matches cudarc's cuda-13000 bindings and the GPU machines' CUDA 13.0 / driver 580.
# nvidia-cuda-runtime carries cuda_bf16.h and the headers it includes (cuda_fp16.h, vector_types.h).
.venv/bin/pip install -q --disable-pip-version-check "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*"
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cuda="$site/nvidia/cu13"
[ -f "$cuda/lib/libnvrtc.so.13" ] || { echo "kernels-check: no libnvrtc.so.13 in $cuda/lib" >&2; exit 1; }
[ -f "$cuda/include/cuda_bf16.h" ] || { echo "kernels-check: no cuda_bf16.h in $cuda/include" >&2; exit 1; }
# fp8.cu includes cuda_fp8.h (and it cuda_fp8.hpp): shipped by nvidia-cuda-runtime 13.0 as well.
for h in cuda_fp8.h cuda_fp8.hpp; do
    [ -f "$cuda/include/$h" ] || { echo "kernels-check: no $h in $cuda/include" >&2; exit 1; }
done

echo "== cargo clippy -p arbiter-kernels --features nvrtc"
cargo clippy -p arbiter-kernels --all-targets --features nvrtc --locked -- -D warnings
echo "== cargo test -p arbiter-kernels --features nvrtc (unit tests)"
cargo test -p arbiter-kernels --features nvrtc --locked --lib --bins  # the emulation tests ran in the workspace tests
cargo build -p arbiter-kernels --features nvrtc --locked --bin arbiter-kernels-check

echo "== arbiter-kernels-check (NVRTC and headers from the 13.0 wheels, via LD_LIBRARY_PATH and ARBITER_CUDA_INCLUDE)"
LD_LIBRARY_PATH="$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ARBITER_CUDA_INCLUDE="$cuda/include" \
    target/debug/arbiter-kernels-check

# The same binary with no environment help: discovery must find the wheels in .venv by itself
# (libnvrtc and its builtins loaded by path), as a server started from the checkout would.
echo "== arbiter-kernels-check, discovery without LD_LIBRARY_PATH / ARBITER_CUDA_INCLUDE"
env -u LD_LIBRARY_PATH -u ARBITER_CUDA_INCLUDE target/debug/arbiter-kernels-check --arch sm_90 --head-dim 128
