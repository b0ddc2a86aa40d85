#!/usr/bin/env bash
# Behaviour comparison of two builds of arbiter (CPU, demo model): `arbiter score` on a fixed
# 200-line file (tests/compare/make_inputs.py: conversations, text, token ids, bad lines, weights,
# truncation) and the answers of a served `arbiter serve --demo` to a fixed set of Score, Rank and
# ScoreStream requests (tests/compare/grpc_requests.py; timings cleared). Prints a diff and exits 1
# when anything differs.
#
# Usage: scripts/compare-outputs.sh BIN_DIR_A BIN_DIR_B [OUT_DIR]
#   BIN_DIR_*: folders holding an `arbiter` binary (e.g. a build of main before a change, and after).
#   Needs python3 with clients/python installed (scripts/test.sh makes .venv with it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 BIN_DIR_A BIN_DIR_B [OUT_DIR]" >&2; exit 2; }
a="$1"; b="$2"; out="${3:-$(mktemp -d)}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
"$py" tests/compare/make_inputs.py "$out/input.jsonl" 200

run_one() { # BIN_DIR LABEL
  local bin="$1/arbiter" label="$2" port pid
  set +e
  "$bin" score --demo --max-input-tokens 256 --input "$out/input.jsonl" --output "$out/$label.score.jsonl" \
    2>"$out/$label.score.log"
  echo "exit $?" >>"$out/$label.score.jsonl"
  set -e
  port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$bin" serve --demo --max-input-tokens 256 --listen "127.0.0.1:$port" --metrics-listen none \
    --max-batch-tokens 2048 --shutdown-linger-seconds 0 2>"$out/$label.serve.log" &
  pid=$!
  "$py" tests/compare/grpc_requests.py "127.0.0.1:$port" >"$out/$label.grpc.txt"
  kill -TERM "$pid"; wait "$pid" || true
}

run_one "$a" a
run_one "$b" b
status=0
for f in score.jsonl grpc.txt; do
  if diff -u "$out/a.$f" "$out/b.$f" >"$out/$f.diff"; then
    echo "identical: $f ($(wc -l <"$out/a.$f") lines, $(wc -c <"$out/a.$f") bytes)"
  else
    echo "DIFFERENT: $f (diff in $out/$f.diff)"; head -40 "$out/$f.diff"; status=1
  fi
done
echo "outputs in $out"
exit $status
