#!/usr/bin/env bash
# Served vs offline throughput: starts `arbiter serve` on a demo-tokenizer model (the toy demo
# model, then the CPU benchmark's bench-small config), drives it with `arbiter-load` at
# saturation, and prints the load generator's table for each (served tokens/s over the engine's
# offline tokens/s on the same inputs). Usage: scripts/bench-serve.sh [seconds] [concurrency]
# ARBITER_BIN_DIR: run the release binaries in that folder instead of building them here.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
conc="${2:-32}"
if [ -n "${ARBITER_BIN_DIR:-}" ]; then
  bin="$ARBITER_BIN_DIR"
else
  cargo build --release -q -p arbiter-server
  bin=target/release
fi
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
header=0
for preset in demo bench-small; do
  dir="$work/$preset"
  "$bin/arbiter" demo-model --preset "$preset" --out "$dir" 2>/dev/null
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$bin/arbiter" serve --model "$dir" --listen "127.0.0.1:$port" --metrics-listen none \
    --max-batch-tokens 8192 --shutdown-linger-seconds 0 2>"$work/$preset.log" &
  pid=$!
  for _ in $(seq 3000); do grep -q "SERVING" "$work/$preset.log" 2>/dev/null && grep -q "addr=127" "$work/$preset.log" && \
    grep -qv "NOT_SERVING until" <(grep "SERVING" "$work/$preset.log" | tail -1) && break; sleep 0.1; done
  out=$("$bin/arbiter-load" --addr "http://127.0.0.1:$port" --model "$dir" --label "$preset" \
    --duration "$secs" --concurrency "$conc" --batch-tokens 8192 2>/dev/null)
  if [ $header -eq 0 ]; then echo "$out"; header=1; else echo "$out" | tail -1; fi
  kill -TERM $pid; wait $pid
done
