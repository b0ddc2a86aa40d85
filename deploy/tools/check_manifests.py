#!/usr/bin/env python3
"""Offline checks of deploy/k8s/*.yaml: schemas first, then the facts the files must agree on.

Schemas: built-in kinds with kubernetes-validate (strict: unknown fields are errors) for each
Kubernetes version asked for; LeaderWorkerSet with deploy/schemas/leaderworkerset-v1.schema.json,
whose pod templates point at the same version's PodTemplateSpec.

Facts a schema cannot see: GPUs per pod x pods per group = TP x PP; probes and Services on the
ports the server listens on; selectors that select the pods they are meant for (and a Service of
a multi-node group only its leaders); the model mounted read-only; a writable kernel cache; a grace
period longer than the drain; every ARBITER_* variable known to the binary; the scrape config
keeping every pod. Prints each problem and exits 1 if there is any.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
LWS_SCHEMA = DEPLOY / "schemas" / "leaderworkerset-v1.schema.json"
DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"
# Defaults of `arbiter serve` (docs/serving.md) and of the image (deploy/Dockerfile ENV).
DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9090
DEFAULT_RENDEZVOUS_PORT = 29500
DEFAULT_SHUTDOWN_GRACE = 30.0
DEFAULT_SHUTDOWN_LINGER = 1.0
# Reading 682 GB of weights, compiling kernels and a warm-up batch: the startup probe must wait.
MIN_STARTUP_SECONDS = 1800
GPU = "nvidia.com/gpu"
COMPONENT = "app.kubernetes.io/component"


def load(paths: list[Path]) -> list[tuple[str, dict]]:
    """Every document of every file, named `file#index` for messages."""
    docs = []
    for p in paths:
        for i, d in enumerate(yaml.safe_load_all(p.read_text())):
            if d is not None:
                docs.append((f"{p.name}#{i} {d.get('kind', '?')}/{d.get('metadata', {}).get('name', '?')}", d))
    return docs


def schema_problems(where: str, doc: dict, version: str) -> list[str]:
    """Schema errors of one document against Kubernetes `version` (strict)."""
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate import utils as kv

    if doc.get("kind") == "LeaderWorkerSet":
        from referencing import Registry, Resource

        ver = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(version)][-1]
        defs = kv.schema_contents(f"kubernetes-json-schema/v{ver}-local-strict/_definitions.json", version)
        registry = Registry().with_resource(DEFINITIONS_URI, Resource.from_contents(defs))
        schema = json.loads(LWS_SCHEMA.read_text())
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        return [f"{where}: k8s {version}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: k8s {version}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]
    return []


def pod_templates(doc: dict) -> list[tuple[str, dict, int]]:
    """(role, pod template, pods per group) of a workload document; [] for other kinds."""
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet"):
        return [("server", spec.get("template", {}), 1)]
    if kind == "LeaderWorkerSet":
        lwt = spec.get("leaderWorkerTemplate", {})
        size = int(lwt.get("size", 1))
        out = [("worker", lwt.get("workerTemplate", {}), size)]
        if "leaderTemplate" in lwt:
            out.insert(0, ("leader", lwt["leaderTemplate"], size))
        return out
    return []


def port_of(addr: str | None, default: int) -> int:
    return default if not addr else int(addr.rsplit(":", 1)[1])


def under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def pod_problems(where: str, role: str, tmpl: dict, pods: int, known_env: set[str] | None, image_env: dict) -> list[str]:
    """Problems of one pod template of an arbiter workload."""
    out = []
    bad = out.append
    spec = tmpl.get("spec", {})
    containers = spec.get("containers", [])
    c = next((c for c in containers if c.get("name") == "arbiter"), None)
    if c is None:
        return [f"{where} {role}: no container named arbiter"]
    env = dict(image_env)
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            env[e["name"]] = None
    if known_env is not None:
        for e in c.get("env", []):
            if e["name"].startswith("ARBITER_") and e["name"] not in known_env:
                bad(f"{where} {role}: env {e['name']} is not a variable arbiter reads (typo, or a flag that does not exist yet?)")
    if (c.get("args") or c.get("command") or [None])[0] != "serve":
        bad(f"{where} {role}: the container must run `serve` (args: [serve]), got {c.get('args') or c.get('command')}")

    # GPUs against the parallel layout.
    res = c.get("resources", {})
    limit, request = res.get("limits", {}).get(GPU), res.get("requests", {}).get(GPU)
    if limit is None:
        bad(f"{where} {role}: no {GPU} limit")
    elif request is not None and int(request) != int(limit):
        bad(f"{where} {role}: {GPU} request {request} != limit {limit} (Kubernetes needs them equal)")
    gpus = int(limit or 0)
    tp, pp = int(env.get("ARBITER_TP") or 1), int(env.get("ARBITER_PP") or 1)
    if gpus * pods != tp * pp:
        bad(f"{where} {role}: {pods} pod(s) x {gpus} GPUs = {gpus * pods}, but ARBITER_TP x ARBITER_PP = {tp} x {pp} = {tp * pp}")
    if tp > gpus:
        bad(f"{where} {role}: tensor parallel {tp} spans more than the {gpus} GPUs of one pod")
    if gpus and env.get("ARBITER_DEVICE") != "cuda":
        bad(f"{where} {role}: {gpus} GPUs but ARBITER_DEVICE={env.get('ARBITER_DEVICE')!r}, not cuda")
    if "memory" not in res.get("requests", {}):
        bad(f"{where} {role}: no memory request")

    # Ports, probes.
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    grpc = port_of(env.get("ARBITER_LISTEN"), DEFAULT_GRPC_PORT)
    metrics = port_of(env.get("ARBITER_METRICS_LISTEN"), DEFAULT_METRICS_PORT)
    if ports.get("grpc") != grpc:
        bad(f"{where} {role}: container port named grpc is {ports.get('grpc')}, the server listens on {grpc}")
    if ports.get("metrics") != metrics:
        bad(f"{where} {role}: container port named metrics is {ports.get('metrics')}, /metrics is on {metrics}")
    if pods > 1:
        rdv = int(env.get("ARBITER_RENDEZVOUS_PORT") or DEFAULT_RENDEZVOUS_PORT)
        if ports.get("rendezvous") != rdv:
            bad(f"{where} {role}: container port named rendezvous is {ports.get('rendezvous')}, the rendezvous uses {rdv}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe)
        if p is None:
            bad(f"{where} {role}: no {probe}")
            continue
        if p.get("grpc", {}).get("port") != grpc:
            bad(f"{where} {role}: {probe} must ask the gRPC health service on port {grpc}, got {p}")
    sp = c.get("startupProbe") or {}
    budget = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    if budget < MIN_STARTUP_SECONDS:
        bad(f"{where} {role}: the startup probe gives up after {budget} s; loading the model needs up to {MIN_STARTUP_SECONDS} s")

    # Shutdown: the grace period covers preStop, the drain and the linger.
    pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command") or []
    pre_s = float(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0.0
    drain = float(env.get("ARBITER_SHUTDOWN_GRACE_SECONDS") or DEFAULT_SHUTDOWN_GRACE)
    linger = float(env.get("ARBITER_SHUTDOWN_LINGER_SECONDS") or DEFAULT_SHUTDOWN_LINGER)
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    if tgps < pre_s + drain + linger:
        bad(f"{where} {role}: terminationGracePeriodSeconds {tgps} < preStop {pre_s} + drain {drain} + linger {linger}")

    # Volumes.
    mounts = c.get("volumeMounts", [])
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    model = env.get("ARBITER_MODEL")
    mm = [m for m in mounts if model and under(model, m["mountPath"])]
    if not model:
        bad(f"{where} {role}: no ARBITER_MODEL")
    elif not mm:
        bad(f"{where} {role}: ARBITER_MODEL {model} is on no mounted volume")
    else:
        m = max(mm, key=lambda m: len(m["mountPath"]))
        if not m.get("readOnly"):
            bad(f"{where} {role}: the model volume {m['name']} must be mounted readOnly")
        pvc = volumes.get(m["name"], {}).get("persistentVolumeClaim")
        if pvc is not None and not pvc.get("readOnly"):
            bad(f"{where} {role}: the model claim {pvc.get('claimName')} must be readOnly")
    cache = env.get("ARBITER_KERNEL_CACHE")
    cm = [m for m in mounts if cache and under(cache, m["mountPath"])]
    if cache and (not cm or max(cm, key=lambda m: len(m["mountPath"])).get("readOnly")):
        bad(f"{where} {role}: the kernel cache {cache} needs a writable volume mounted over it")
    if gpus > 1:
        shm = next((m for m in mounts if m["mountPath"] == "/dev/shm"), None)
        if shm is None or volumes.get(shm["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
            bad(f"{where} {role}: NCCL over {gpus} GPUs needs /dev/shm from an emptyDir with medium Memory")
    if c.get("securityContext", {}).get("readOnlyRootFilesystem"):
        if not any(m["mountPath"] == "/tmp" for m in mounts):
            bad(f"{where} {role}: read-only root file system without a /tmp volume")
    if not spec.get("securityContext", {}).get("runAsNonRoot"):
        bad(f"{where} {role}: the pod must set runAsNonRoot")
    return out


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def scrape_keeps(job: dict, labels: dict, port_names: list[str]) -> bool:
    """Whether the job's `keep` relabel rules on pod labels and port names keep this pod's metrics port."""
    for r in job.get("relabel_configs", []):
        if r.get("action") != "keep":
            continue
        (src,) = r["source_labels"]
        rx = re.compile(f"^(?:{r.get('regex', '(.*)')})$")
        if src.startswith("__meta_kubernetes_pod_label_"):
            name = src[len("__meta_kubernetes_pod_label_"):]
            val = next((v for k, v in labels.items() if re.sub(r"[^a-zA-Z0-9_]", "_", k) == name), "")
            if not rx.match(val):
                return False
        elif src == "__meta_kubernetes_pod_container_port_name":
            if not any(rx.match(n) for n in port_names):
                return False
    return True


def cross_problems(docs: list[tuple[str, dict]], known_env: set[str] | None, image_env: dict, scrape: dict | None) -> list[str]:
    """Problems between documents, and within each arbiter workload."""
    out = []
    pods = []  # (where, role, labels, named ports)
    for where, d in docs:
        for role, tmpl, n in pod_templates(d):
            labels = tmpl.get("metadata", {}).get("labels", {})
            ports = [p.get("name") for c in tmpl.get("spec", {}).get("containers", []) for p in c.get("ports", [])]
            pods.append((where, role, labels, ports))
            out += pod_problems(where, role, tmpl, n, known_env, image_env)
            if labels.get(COMPONENT) != role:
                out.append(f"{where} {role}: label {COMPONENT} is {labels.get(COMPONENT)!r}, expected {role!r}")
        if d.get("kind") == "Deployment":
            sel = d["spec"].get("selector", {}).get("matchLabels", {})
            if not matches(sel, d["spec"]["template"].get("metadata", {}).get("labels", {})):
                out.append(f"{where}: selector {sel} does not select its own pod template")
        if d.get("kind") == "LeaderWorkerSet":
            spec = d["spec"]
            lwt = spec["leaderWorkerTemplate"]
            if spec.get("startupPolicy") == "LeaderReady":
                out.append(f"{where}: startupPolicy LeaderReady deadlocks: the leader is ready only once the workers joined")
            if int(lwt.get("size", 1)) > 1 and lwt.get("restartPolicy") != "RecreateGroupOnPodRestart":
                out.append(f"{where}: a pipeline stage cannot rejoin a running group; use restartPolicy RecreateGroupOnPodRestart")
            leader, worker = lwt.get("leaderTemplate"), lwt.get("workerTemplate")
            if leader is not None and leader.get("spec") != worker.get("spec"):
                out.append(f"{where}: leaderTemplate.spec and workerTemplate.spec differ; both run the same arbiter")
    for where, d in docs:
        kind = d.get("kind")
        if kind == "Service":
            sel = d["spec"].get("selector", {})
            hit = [p for p in pods if matches(sel, p[2])]
            if not hit:
                out.append(f"{where}: selector {sel} selects no pod template")
            for pw, role, _, ports in hit:
                if role == "worker":
                    out.append(f"{where}: selects the workers of {pw}, which do not serve the RewardService")
                for sp in d["spec"].get("ports", []):
                    if isinstance(sp.get("targetPort"), str) and sp["targetPort"] not in ports:
                        out.append(f"{where}: targetPort {sp['targetPort']} is not a named port of {pw} {role}")
        if kind == "PodDisruptionBudget":
            sel = d["spec"].get("selector", {}).get("matchLabels", {})
            if not any(matches(sel, p[2]) for p in pods):
                out.append(f"{where}: selector {sel} selects no pod template")
    if scrape is not None:
        job = next((j for j in scrape.get("scrape_configs", []) if j.get("job_name") == "arbiter"), None)
        if job is None:
            out.append("prometheus.yml: no scrape job named arbiter (the alerts and the dashboard select job=\"arbiter\")")
        else:
            for where, role, labels, ports in pods:
                if not scrape_keeps(job, labels, ports):
                    out.append(f"{where} {role}: prometheus.yml's arbiter job does not keep this pod's metrics port")
    return out


def image_env(dockerfile: Path) -> dict:
    """The ENV defaults of the Dockerfile's last stage."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    env = {}
    for line in text.split("FROM ")[-1].splitlines():
        if line.startswith("ENV "):
            for k, v in re.findall(r"(\w+)=(\S+)", line[4:]):
                env[k] = v
    return env


def pending(kind: str) -> set[str]:
    """The entries of deploy/pending.txt of one kind ("env", "feature"), without the kind."""
    lines = (ln.split("#")[0].split() for ln in (DEPLOY / "pending.txt").read_text().splitlines())
    return {" ".join(f[1:]) for f in lines if f and f[0] == kind}


def known_env_names(arbiter: Path, repo: Path) -> tuple[set[str], list[str]]:
    """ARBITER_* names arbiter reads: `arbiter serve --help`, string literals in the Rust sources,
    and the pending names of deploy/pending.txt. Also returns a problem for each pending name the
    code already has, so that the pending list cannot go stale."""
    help_text = subprocess.run([str(arbiter), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    names = set(re.findall(r"env: (ARBITER_[A-Z0-9_]+)", help_text))
    for rs in repo.glob("*/src/**/*.rs"):
        names |= set(re.findall(r'"(ARBITER_[A-Z0-9_]+)"', rs.read_text(errors="replace")))
    waiting = pending("env")
    stale = [f"pending.txt: env {n} is in the code now; remove the line" for n in sorted(waiting & names)]
    return names | waiting, stale


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--k8s-version", action="append", required=True, help="repeatable, e.g. 1.30")
    ap.add_argument("--arbiter", type=Path, help="the arbiter binary, to check ARBITER_* names")
    ap.add_argument("--scrape-config", type=Path, default=DEPLOY / "prometheus" / "prometheus.yml")
    args = ap.parse_args()
    docs = load(args.files)
    problems = []
    for where, d in docs:
        for v in args.k8s_version:
            problems += schema_problems(where, d, v)
    known = None
    img = image_env(DEPLOY / "Dockerfile")
    if args.arbiter:
        known, stale = known_env_names(args.arbiter, DEPLOY.parent)
        problems += stale
        for n in sorted(set(img) | set(re.findall(r"export ((?:ARBITER_\w+ ?)+)", (DEPLOY / "entrypoint.sh").read_text())[0].split())):
            if n.startswith("ARBITER_") and n not in known:
                problems.append(f"Dockerfile/entrypoint.sh: {n} is not a variable arbiter reads")
    problems += cross_problems(docs, known, img, yaml.safe_load(args.scrape_config.read_text()))
    for p in problems:
        print(f"FAIL {p}")
    kinds = sorted({d.get("kind", "?") for _, d in docs})
    print(f"{len(docs)} documents ({', '.join(kinds)}) against Kubernetes {', '.join(args.k8s_version)}: "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
