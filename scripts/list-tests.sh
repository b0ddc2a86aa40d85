#!/usr/bin/env bash
# Names of every test in a revision of the tree, from the sources (Rust #[test] / #[tokio::test]
# functions as path::name, Python test_ functions as path::name), sorted: to compare the test
# lists before and after a change without building both. Usage: scripts/list-tests.sh [REV]
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:-HEAD}"
git ls-tree -r --name-only "$rev" | grep -E '\.(rs|py)$' | while read -r f; do
  git show "$rev:$f" | awk -v f="$f" '
    /^[[:space:]]*#\[(tokio::)?test/ { pending = 1; next }
    pending && /fn [a-zA-Z0-9_]+/ { match($0, /fn [a-zA-Z0-9_]+/); print f "::" substr($0, RSTART + 3, RLENGTH - 3); pending = 0; next }
    f ~ /\.py$/ && /^[[:space:]]*(async )?def test_/ { match($0, /def test_[a-zA-Z0-9_]+/); print f "::" substr($0, RSTART + 4, RLENGTH - 4) }
  '
done | sort
