#!/usr/bin/env bash
# The one test command (README, .ci/run): formatting, lints, and every test of the workspace.
# Installs what the tests need by itself; needs only a Rust toolchain and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# kernels/tests/emulation.rs runs the CUDA sources on the CPU through g++ (with AddressSanitizer).
if ! command -v g++ >/dev/null; then
    echo "== installing g++ (kernel emulation tests)"
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo clippy, CUDA backend (builds with no CUDA installed: cudarc loads it at run time)"
cargo clippy -p arbiter-engine -p arbiter-server --features cuda --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== cargo test, CUDA backend's host-side logic (tiles, library probing, no-driver errors, gpu_check helpers)"
cargo test -p arbiter-engine --features cuda --lib --example gpu_check --locked

echo "== deploy checks (manifests, Dockerfile, promtool on rules and dashboard)"
deploy/check.sh

echo "== CUDA kernels: NVRTC compile check for sm_80/sm_90 (no GPU needed)"
scripts/kernels-check.sh

echo "== python client tests (pytest, against the arbiter binary cargo test just built)"
# cargo test built target/debug/arbiter for the server's integration tests; a separate
# `cargo build -p` would resolve features differently and rebuild half the graph.
[ -x target/debug/arbiter ] || cargo build --locked -p arbiter-server --bin arbiter
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -e "clients/python[test]"
ARBITER_BIN="$PWD/target/debug/arbiter" .venv/bin/python -m pytest -q -p no:cacheprovider clients/python/tests

echo "== arbiter convert's tokenizer step (real SentencePiece through Python)"
.venv/bin/pip install -q --disable-pip-version-check -r tests/convert/requirements.txt
ARBITER_BIN="$PWD/target/debug/arbiter" .venv/bin/python -m pytest -q -p no:cacheprovider tests/convert
