#!/usr/bin/env python3
"""Offline checks of deploy/Dockerfile (no Docker engine here, and no hadolint):

- every ${VAR} in a FROM line is a global ARG with a default; stage names are unique; every
  COPY --from names an earlier stage;
- every COPY source from the build context exists and is not excluded by Dockerfile.dockerignore;
- the cargo build names workspace packages, their binaries and features (a pending feature from
  deploy/pending.txt counts until the package has it); the binaries copied out are those built;
- RUST_VERSION is at least the workspace's rust-version;
- the final stage runs as a numeric non-root USER and its exec-form ENTRYPOINT was copied in;
- the final stage links libnccl.so (cudarc 0.19 never looks for the image's libnccl.so.2).
    lint_dockerfile.py deploy/Dockerfile
"""
from __future__ import annotations

import fnmatch
import json
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_manifests import pending  # noqa: E402


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf, start = [], "", 0
    for no, line in enumerate(text.splitlines(), 1):
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if not buf:
            start = no
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def workspace() -> dict[str, dict]:
    """package name -> {"bins": set, "features": set} for the workspace members."""
    root = tomllib.loads((REPO / "Cargo.toml").read_text())
    out = {}
    for member in root["workspace"]["members"]:
        toml = tomllib.loads((REPO / member / "Cargo.toml").read_text())
        name = toml["package"]["name"]
        bins = {b["name"] for b in toml.get("bin", [])} | {p.stem for p in (REPO / member / "src" / "bin").glob("*.rs")}
        out[name] = {"bins": bins, "features": set(toml.get("features", {}))}
    return out


def ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) for p in patterns)


def problems(dockerfile: Path) -> list[str]:
    out = []
    bad = out.append
    ins = instructions(dockerfile.read_text())
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    ignores = [ln.strip() for ln in ignore_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")] \
        if ignore_file.exists() else []
    args = {}
    stages: list[str] = []
    built_bins: set[str] = set()
    for no, word, rest in ins:
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        if word == "FROM":
            for var in re.findall(r"\$\{(\w+)\}", rest):
                if not args.get(var):
                    bad(f"line {no}: FROM uses ${{{var}}}, which is no global ARG with a default")
            m = re.search(r"\s+AS\s+(\S+)$", rest, re.I)
            name = m.group(1) if m else f"#{len(stages)}"
            if name in stages:
                bad(f"line {no}: stage name {name} used twice")
            stages.append(name)
        if word == "COPY":
            opts = re.findall(r"--(\w+)=(\S+)", rest)
            paths = re.sub(r"--\w+=\S+\s*", "", rest).split()
            frm = dict(opts).get("from")
            if frm is not None:
                if frm not in stages[:-1]:
                    bad(f"line {no}: COPY --from={frm} names no earlier stage ({stages[:-1]})")
                if frm == "build":
                    for src in paths[:-1]:
                        if Path(src).name not in built_bins:
                            bad(f"line {no}: copies {src}, which the build stage does not build ({sorted(built_bins)})")
            else:
                for src in paths[:-1]:
                    if src in (".", "./"):
                        continue
                    if ignored(src, ignores):
                        bad(f"line {no}: COPY source {src} is excluded by {ignore_file.name}")
                    elif not (REPO / src).exists():
                        bad(f"line {no}: COPY source {src} does not exist in the build context")
        if word == "RUN" and "cargo build" in rest:
            ws = workspace()
            rest = rest[rest.index("cargo build"):].split("&&")[0]
            pkgs = re.findall(r"(?:-p|--package)\s+(\S+)", rest)
            bins = re.findall(r"--bin\s+(\S+)", rest)
            feats = [f for group in re.findall(r"--features\s+(\S+)", rest) for f in group.split(",")]
            for p in pkgs:
                if p not in ws:
                    bad(f"line {no}: cargo build -p {p}: no such workspace package ({sorted(ws)})")
            for b in bins:
                if not any(b in ws[p]["bins"] for p in pkgs if p in ws):
                    bad(f"line {no}: cargo build --bin {b}: no such binary in {pkgs}")
            for f in feats:
                for p in (p for p in pkgs if p in ws):
                    have, waiting = f in ws[p]["features"], f"{p} {f}" in pending("feature")
                    if have and waiting:
                        bad(f"pending.txt: feature {p} {f} exists now; remove the line")
                    elif not have and not waiting:
                        bad(f"line {no}: cargo build --features {f}: {p} has no such feature")
            if "--locked" not in rest:
                bad(f"line {no}: cargo build without --locked")
            built_bins |= set(bins)
    root = tomllib.loads((REPO / "Cargo.toml").read_text())
    need = root["workspace"]["package"]["rust-version"]
    if version_tuple(args.get("RUST_VERSION", "0")) < version_tuple(need):
        bad(f"ARG RUST_VERSION={args.get('RUST_VERSION')} is older than the workspace's rust-version {need}")
    final = [(no, w, r) for no, w, r in ins][max(i for i, (_, w, _) in enumerate(ins) if w == "FROM"):]
    users = [r for _, w, r in final if w == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        bad(f"the final stage must end with a numeric non-root USER (Kubernetes runAsNonRoot checks numbers), got {users}")
    entry = [r for _, w, r in final if w == "ENTRYPOINT"]
    if not entry:
        bad("the final stage has no ENTRYPOINT")
    else:
        try:
            argv = json.loads(entry[-1])
        except json.JSONDecodeError:
            argv = None
        if not isinstance(argv, list):
            bad(f"ENTRYPOINT must be in exec form (a JSON array) so signals reach arbiter, got {entry[-1]}")
        elif not any(w == "COPY" and r.split()[-1] == argv[0] for _, w, r in final):
            bad(f"ENTRYPOINT {argv[0]} is not copied into the final stage")
    # cudarc 0.19 dlopens libnccl.so, .so.13, .12, .11, .10, .9 or .1; the CUDA images ship only
    # libnccl.so.2, so without a link named libnccl.so tensor parallelism cannot start.
    runs = " ".join(r for _, w, r in final if w == "RUN")
    if not re.search(r"\bln\s+-\w*s\w*\s+\S+\s+\S*/libnccl\.so(?![.\w])", runs):
        bad("the final stage makes no libnccl.so link (ln -s ... DIR/libnccl.so): cudarc never loads libnccl.so.2")
    return out


def main() -> int:
    path = Path(sys.argv[1])
    found = problems(path)
    for p in found:
        print(f"FAIL {path.name}: {p}")
    print(f"{path}: {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
