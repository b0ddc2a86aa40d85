#!/usr/bin/env bash
# The deploy checks, offline (scripts/test.sh runs this after the cargo tests; it also runs alone):
# the Kubernetes manifests against the Kubernetes schemas and the vendored LeaderWorkerSet schema,
# plus the facts they must agree on; the Dockerfile lint; promtool on the scrape config, the alert
# rules (and their unit tests) and every PromQL expression of the Grafana dashboard; and the tests
# of these checks themselves. Installs what it needs: kubernetes-validate into .venv, and promtool
# from Debian's prometheus package (apt-get download, unpacked into .venv/bin: no service is
# installed) when promtool is not on PATH.
# The metric names the rules and the dashboard use are checked against a live server's scrape by
# server/tests/deploy_metrics.rs (cargo test).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS=(1.30 1.37)  # the oldest Kubernetes these manifests claim to support, and the newest schema known

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check "kubernetes-validate==1.37.0"

PROMTOOL="$(command -v promtool || true)"
if [ -z "$PROMTOOL" ]; then
    PROMTOOL="$PWD/.venv/bin/promtool"
    if [ ! -x "$PROMTOOL" ]; then
        echo "== promtool: unpacking Debian's prometheus package into .venv/bin"
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        if ! (cd "$tmp" && apt-get download -q prometheus >"$tmp/apt.log" 2>&1); then
            apt-get update -q >>"$tmp/apt.log" 2>&1 || true
            (cd "$tmp" && apt-get download -q prometheus >>"$tmp/apt.log" 2>&1) || { cat "$tmp/apt.log" >&2; exit 1; }
        fi
        dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
        install -m 0755 "$tmp/x/usr/bin/promtool" "$PROMTOOL"
    fi
fi
"$PROMTOOL" --version 2>&1 | head -1

echo "== deploy: tests of the checks"
.venv/bin/python -m unittest discover -s deploy/tests

echo "== deploy: Kubernetes manifests (Kubernetes ${K8S_VERSIONS[*]})"
[ -x target/debug/arbiter ] || cargo build --locked -p arbiter-server --bin arbiter
versions=()
for v in "${K8S_VERSIONS[@]}"; do versions+=(--k8s-version "$v"); done
.venv/bin/python deploy/tools/check_manifests.py "${versions[@]}" --arbiter target/debug/arbiter deploy/k8s/*.yaml

echo "== deploy: Dockerfile"
.venv/bin/python deploy/tools/lint_dockerfile.py deploy/Dockerfile
sh -n deploy/entrypoint.sh

echo "== deploy: promtool check config, check rules, test rules"
.venv/bin/python deploy/tools/check_scrape_config.py "$PROMTOOL" deploy/prometheus/prometheus.yml
"$PROMTOOL" check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && "$PROMTOOL" test rules alerts_test.yml)

echo "== deploy: every PromQL expression of the Grafana dashboard, through promtool"
rules="$(mktemp --suffix=.yml)"
.venv/bin/python deploy/tools/dashboard_rules.py deploy/grafana/arbiter.json >"$rules"
"$PROMTOOL" check rules "$rules"
rm -f "$rules"
echo "deploy checks passed"
