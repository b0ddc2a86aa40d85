#!/usr/bin/env bash
# The one test command (README, .ci/run): formatting, lints, and every test of the workspace.
# Installs what the tests need by itself; needs only a Rust toolchain and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
