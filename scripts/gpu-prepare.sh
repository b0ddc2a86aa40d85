#!/usr/bin/env bash
# Step 1 of the GPU check, on this (CPU) machine: builds what the GPU machine runs, which has no
# Rust toolchain and takes at most 64 MB per call, into one folder under 60 MB:
#
#   gpu-bundle/bin/{arbiter,gpu_check}   release, --features cuda, stripped
#   gpu-bundle/fixtures/golden/          the golden fixtures
#   gpu-bundle/kernels/*.cu              the kernel sources (also embedded in the binaries)
#   gpu-bundle/gpu-check.sh, gpu_hf.py   step 2 (see docs/gpu-owed.md)
#
# Usage: scripts/gpu-prepare.sh [BUNDLE_DIR]          (default: gpu-bundle, ignored by git)
#        scripts/gpu-prepare.sh --check-size DIR      (only the size check; used by its test)
# Then, on the GPU machine: cd gpu-bundle && ./gpu-check.sh   (results under $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT_BYTES=$((60 * 1000 * 1000))

# Fails when DIR holds LIMIT_BYTES or more (apparent sizes, what the transfer carries).
check_size() {
    local dir=$1 bytes
    bytes=$(du -sb --apparent-size "$dir" | cut -f1)
    if [ "$bytes" -ge "$LIMIT_BYTES" ]; then
        echo "gpu-prepare: $dir is $bytes bytes, over the limit of $LIMIT_BYTES (the GPU machine takes 64 MB per call with the repository)" >&2
        du -ab --apparent-size "$dir" | sort -rn | head -5 >&2
        return 1
    fi
    echo "gpu-prepare: $dir is $bytes bytes (limit $LIMIT_BYTES)"
}

if [ "${1:-}" = "--check-size" ]; then
    [ -d "${2:-}" ] || { echo "usage: $0 --check-size DIR" >&2; exit 2; }
    check_size "$2"
    exit
fi

BUNDLE=${1:-gpu-bundle}
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo build --release --locked -p arbiter-server --features cuda --bin arbiter
cargo build --release --locked -p arbiter-engine --features cuda --example gpu_check

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/bin" "$BUNDLE/fixtures" "$BUNDLE/kernels"
# Where cargo put them: $CARGO_TARGET_DIR when set (shared build folders), else target/.
release=${CARGO_TARGET_DIR:-target}/release
cp "$release/arbiter" "$release/examples/gpu_check" "$BUNDLE/bin/"
strip "$BUNDLE/bin/"*
cp -r tests/fixtures/golden "$BUNDLE/fixtures/golden"
cp kernels/*.cu "$BUNDLE/kernels/"
cp scripts/gpu-check.sh scripts/gpu_hf.py "$BUNDLE/"
{
    echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!gpu-bundle' || echo ' (with uncommitted changes)')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
} >"$BUNDLE/BUILD"
check_size "$BUNDLE"
echo "gpu-prepare: ready. On the GPU machine: cd $BUNDLE && ./gpu-check.sh"
