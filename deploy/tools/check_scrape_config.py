#!/usr/bin/env python3
"""`promtool check config` on deploy/prometheus/prometheus.yml, even with Debian's promtool.

Debian builds Prometheus without Kubernetes service discovery, so its promtool rejects
`kubernetes_sd_configs` ("field kubernetes_sd_configs not found"). When that happens, this script
checks the Kubernetes SD blocks itself (known keys, a known role, relabel rules that read only
meta labels that role provides) and runs promtool again on a copy in which each such block is
swapped for a file_sd_configs block: everything else (global, rule_files and the rules they name,
every relabel rule) is still checked by promtool. With an upstream promtool the file is checked
as it is.
    check_scrape_config.py PROMTOOL deploy/prometheus/prometheus.yml
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# Prometheus' kubernetes_sd_config fields (docs: configuration, <kubernetes_sd_config>).
K8S_SD_KEYS = {"role", "api_server", "kubeconfig_file", "namespaces", "selectors", "attach_metadata", "basic_auth",
               "authorization", "oauth2", "tls_config", "proxy_url", "no_proxy", "proxy_from_environment",
               "proxy_connect_header", "follow_redirects", "enable_http2"}
ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
# Meta label prefixes each role provides (pods: __meta_kubernetes_pod_*, plus the namespace).
ROLE_META = {"pod": ("__meta_kubernetes_pod_", "__meta_kubernetes_namespace")}


def k8s_sd_problems(cfg: dict) -> list[str]:
    out = []
    for job in cfg.get("scrape_configs", []):
        name = job.get("job_name")
        for sd in job.get("kubernetes_sd_configs", []):
            extra = set(sd) - K8S_SD_KEYS
            if extra:
                out.append(f"job {name}: unknown kubernetes_sd_configs keys {sorted(extra)}")
            role = sd.get("role")
            if role not in ROLES:
                out.append(f"job {name}: kubernetes_sd_configs role {role!r} is not one of {sorted(ROLES)}")
            prefixes = ROLE_META.get(role)
            for r in job.get("relabel_configs", []):
                for src in r.get("source_labels", []):
                    if prefixes and src.startswith("__meta_kubernetes_") and not src.startswith(prefixes):
                        out.append(f"job {name}: role {role} provides no {src}")
    return out


def main() -> int:
    promtool, config = sys.argv[1], Path(sys.argv[2])
    first = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    if first.returncode == 0:
        print(first.stdout, end="")
        return 0
    if "field kubernetes_sd_configs not found" not in first.stdout + first.stderr:
        print(first.stdout + first.stderr, end="")
        return 1
    cfg = yaml.safe_load(config.read_text())
    problems = k8s_sd_problems(cfg)
    for p in problems:
        print(f"FAIL {config.name}: {p}")
    print(f"{promtool} was built without Kubernetes service discovery: checked kubernetes_sd_configs here "
          f"({len(problems)} problem(s)); promtool checks the rest with file_sd_configs in its place")
    with tempfile.TemporaryDirectory() as tmp:
        for rf in cfg.get("rule_files", []):
            for f in config.parent.glob(rf):
                shutil.copy(f, Path(tmp) / f.relative_to(config.parent))
        (Path(tmp) / "targets.json").write_text("[]")
        for job in cfg.get("scrape_configs", []):
            if job.pop("kubernetes_sd_configs", None) is not None:
                job.setdefault("file_sd_configs", []).append({"files": ["targets.json"]})
        copy = Path(tmp) / config.name
        copy.write_text(yaml.safe_dump(cfg, sort_keys=False))
        second = subprocess.run([promtool, "check", "config", str(copy)], capture_output=True, text=True)
        print(second.stdout + second.stderr, end="")
    return 1 if problems or second.returncode != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
