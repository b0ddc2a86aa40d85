"""Tests of deploy/tools and deploy/entrypoint.sh: the real files pass, and each kind of mistake
the checks exist for is caught, with a message that names it. Run by deploy/check.sh:
    .venv/bin/python -m unittest discover -s deploy/tests -t deploy
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(DEPLOY / "tools"))

import check_manifests as cm  # noqa: E402
import dashboard_rules as dr  # noqa: E402
import lint_dockerfile as ld  # noqa: E402

K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
SCRAPE = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
IMAGE_ENV = cm.image_env(DEPLOY / "Dockerfile")


def docs() -> list[tuple[str, dict]]:
    return cm.load(K8S)


def find(ds, kind, name_part=""):
    return next(d for w, d in ds if d["kind"] == kind and name_part in d["metadata"]["name"])


def container(tmpl):
    return tmpl["spec"]["containers"][0]


def env_set(c, name, value):
    for e in c["env"]:
        if e["name"] == name:
            e["value"] = value
            return
    c["env"].append({"name": name, "value": value})


def lws_templates(ds):
    lwt = find(ds, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return lwt["leaderTemplate"], lwt["workerTemplate"]


class Manifests(unittest.TestCase):
    def problems(self, ds, scrape=SCRAPE, known=None):
        return cm.cross_problems(ds, known, IMAGE_ENV, scrape)

    def assertCaught(self, ds, needle, **kw):
        found = self.problems(ds, **kw)
        self.assertTrue(any(needle in p for p in found), f"expected a problem containing {needle!r}, got {found}")

    def test_the_shipped_manifests_pass(self):
        self.assertEqual(self.problems(docs()), [])
        for w, d in docs():
            self.assertEqual(cm.schema_problems(w, d, "1.30"), [], w)

    def test_gpus_must_match_tensor_times_pipeline_parallel(self):
        ds = docs()
        c = container(find(ds, "Deployment")["spec"]["template"])
        c["resources"]["limits"][cm.GPU] = c["resources"]["requests"][cm.GPU] = 4
        self.assertCaught(ds, "1 pod(s) x 4 GPUs = 4, but ARBITER_TP x ARBITER_PP = 8 x 1 = 8")
        ds = docs()
        for t in lws_templates(ds):
            env_set(container(t), "ARBITER_PP", "1")
        self.assertCaught(ds, "2 pod(s) x 8 GPUs = 16, but ARBITER_TP x ARBITER_PP = 8 x 1 = 8")

    def test_gpu_request_must_equal_limit(self):
        ds = docs()
        container(find(ds, "Deployment")["spec"]["template"])["resources"]["requests"][cm.GPU] = 7
        self.assertCaught(ds, "request 7 != limit 8")

    def test_model_volume_must_be_read_only(self):
        ds = docs()
        tmpl = find(ds, "Deployment")["spec"]["template"]
        next(m for m in container(tmpl)["volumeMounts"] if m["name"] == "model")["readOnly"] = False
        self.assertCaught(ds, "model volume model must be mounted readOnly")
        ds = docs()
        tmpl = find(ds, "Deployment")["spec"]["template"]
        next(v for v in tmpl["spec"]["volumes"] if v["name"] == "model")["persistentVolumeClaim"]["readOnly"] = False
        self.assertCaught(ds, "model claim arbiter-models must be readOnly")

    def test_probes_must_use_the_grpc_port_and_wait_for_loading(self):
        ds = docs()
        c = container(find(ds, "Deployment")["spec"]["template"])
        env_set(c, "ARBITER_LISTEN", "0.0.0.0:7000")
        self.assertCaught(ds, "container port named grpc is 50051, the server listens on 7000")
        self.assertCaught(ds, "readinessProbe must ask the gRPC health service on port 7000")
        ds = docs()
        container(find(ds, "Deployment")["spec"]["template"])["startupProbe"]["failureThreshold"] = 30
        self.assertCaught(ds, "the startup probe gives up after 300 s")
        ds = docs()
        del container(find(ds, "Deployment")["spec"]["template"])["livenessProbe"]
        self.assertCaught(ds, "no livenessProbe")

    def test_grace_period_must_cover_the_drain(self):
        ds = docs()
        env_set(container(find(ds, "Deployment")["spec"]["template"]), "ARBITER_SHUTDOWN_GRACE_SECONDS", "120")
        self.assertCaught(ds, "terminationGracePeriodSeconds 60 < preStop 5.0 + drain 120.0 + linger 1.0")

    def test_the_service_of_a_group_selects_leaders_only(self):
        ds = docs()
        del find(ds, "Service", "h100")["spec"]["selector"][cm.COMPONENT]
        self.assertCaught(ds, "selects the workers of")
        ds = docs()
        find(ds, "Service", "h200")["spec"]["selector"]["app.kubernetes.io/instance"] = "arbiter-h300"
        self.assertCaught(ds, "selects no pod template")
        ds = docs()
        find(ds, "Service", "h200")["spec"]["ports"][0]["targetPort"] = "gprc"
        self.assertCaught(ds, "targetPort gprc is not a named port")

    def test_pdb_must_select_pods(self):
        ds = docs()
        find(ds, "PodDisruptionBudget", "h100")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "arbitr"
        self.assertCaught(ds, "PodDisruptionBudget/arbiter-h100x2: selector")

    def test_group_rules(self):
        ds = docs()
        find(ds, "LeaderWorkerSet")["spec"]["startupPolicy"] = "LeaderReady"
        self.assertCaught(ds, "LeaderReady deadlocks")
        ds = docs()
        find(ds, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "None"
        self.assertCaught(ds, "use restartPolicy RecreateGroupOnPodRestart")
        ds = docs()
        env_set(container(lws_templates(ds)[1]), "ARBITER_MAX_BATCH_TOKENS", "8192")
        self.assertCaught(ds, "leaderTemplate.spec and workerTemplate.spec differ")
        ds = docs()
        for t in lws_templates(ds):
            container(t)["ports"] = [p for p in container(t)["ports"] if p["name"] != "rendezvous"]
        self.assertCaught(ds, "container port named rendezvous is None, the rendezvous uses 29500")

    def test_scrape_config_must_keep_every_pod(self):
        scrape = copy.deepcopy(SCRAPE)
        scrape["scrape_configs"][0]["relabel_configs"][1]["regex"] = "prometheus"
        self.assertCaught(docs(), "does not keep this pod's metrics port", scrape=scrape)
        scrape = copy.deepcopy(SCRAPE)
        scrape["scrape_configs"][0]["job_name"] = "reward"
        self.assertCaught(docs(), "no scrape job named arbiter", scrape=scrape)

    def test_env_names_must_be_known(self):
        ds = docs()
        known = {e["name"] for _, d in ds for _, t, _ in cm.pod_templates(d) for e in container(t)["env"]}
        self.assertEqual(self.problems(ds, known=known), [])
        env_set(container(find(ds, "Deployment")["spec"]["template"]), "ARBITER_MAX_BATCH_TOKEN", "1")
        self.assertCaught(ds, "env ARBITER_MAX_BATCH_TOKEN is not a variable arbiter reads", known=known)

    def test_schemas_reject_unknown_fields_and_values(self):
        ds = docs()
        lws = find(ds, "LeaderWorkerSet")
        lws["spec"]["leaderWorkerTemplate"]["sise"] = 2
        container(lws["spec"]["leaderWorkerTemplate"]["workerTemplate"])["imagePullPolice"] = "Always"
        found = cm.schema_problems("lws", lws, "1.30")
        self.assertTrue(any("'sise' was unexpected" in p for p in found), found)
        self.assertTrue(any("workerTemplate.spec.containers.0" in p and "imagePullPolice" in p for p in found), found)
        lws = find(docs(), "LeaderWorkerSet")
        lws["spec"]["leaderWorkerTemplate"]["size"] = 0
        self.assertTrue(any("size" in p for p in cm.schema_problems("lws", lws, "1.37")))
        dep = find(docs(), "Deployment")
        container(dep["spec"]["template"])["startupProbe"]["grpc"]["port"] = "grpc"
        found = cm.schema_problems("dep", dep, "1.30")
        self.assertTrue(any("startupProbe.grpc.port" in p for p in found), found)


class Dashboard(unittest.TestCase):
    def dash(self):
        return json.loads((DEPLOY / "grafana" / "arbiter.json").read_text())

    def test_every_query_becomes_a_rule(self):
        d = self.dash()
        exprs = dr.expressions(d)
        targets = sum(len(p["targets"]) for p in d["panels"])
        variables = sum(1 for v in d["templating"]["list"] if v["type"] == "query")
        self.assertEqual(len(exprs), targets + variables)
        self.assertFalse([e for _, e in exprs if "$" in e], "no Grafana variable is left in a rule")
        rules = yaml.safe_load(dr.rules_yaml(exprs))["groups"][0]["rules"]
        self.assertEqual([r["expr"] for r in rules], [e for _, e in exprs])

    def test_unknown_variable_is_an_error(self):
        d = self.dash()
        d["panels"][0]["targets"][0]["expr"] += ' + on() vector($replicas)'
        with self.assertRaisesRegex(dr.DashboardError, r"unknown variable \$replicas"):
            dr.expressions(d)

    def test_structure_rules(self):
        d = self.dash()
        d["panels"][1]["id"] = d["panels"][0]["id"]
        with self.assertRaisesRegex(dr.DashboardError, "used twice"):
            dr.expressions(d)
        d = self.dash()
        d["panels"][2]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "prod-prom"}
        with self.assertRaisesRegex(dr.DashboardError, "not the \\$\\{datasource\\} variable"):
            dr.expressions(d)


class Dockerfile(unittest.TestCase):
    def lint(self, edit):
        text = edit((DEPLOY / "Dockerfile").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "Dockerfile"
            p.write_text(text)
            (Path(tmp) / "Dockerfile.dockerignore").write_text((DEPLOY / "Dockerfile.dockerignore").read_text())
            return ld.problems(p)

    def test_the_shipped_dockerfile_passes(self):
        self.assertEqual(self.lint(lambda t: t), [])

    def test_mistakes_are_caught(self):
        cases = {
            "numeric non-root USER": lambda t: t.replace("USER 10001:10001", "USER root"),
            "no such binary": lambda t: t.replace("--bin arbiter-load", "--bin arbiter-lod"),
            "names no earlier stage": lambda t: t.replace("--from=cuda-headers", "--from=headers"),
            "older than the workspace's rust-version": lambda t: t.replace("RUST_VERSION=1.95", "RUST_VERSION=1.70"),
            "excluded by": lambda t: t.replace("COPY deploy/entrypoint.sh", "COPY target/entrypoint.sh"),
            "exec form": lambda t: t.replace('ENTRYPOINT ["/usr/local/bin/arbiter-entrypoint"]',
                                             "ENTRYPOINT /usr/local/bin/arbiter-entrypoint"),
            "does not exist in the build context": lambda t: t.replace("COPY deploy/entrypoint.sh", "COPY deploy/entry.sh"),
            "no such workspace package": lambda t: t.replace("-p arbiter-server", "-p arbiter"),
            "without --locked": lambda t: t.replace("cargo build --release --locked", "cargo build --release"),
            "no libnccl.so link": lambda t: t.replace('&& ln -sf "$nccl" "$dir/libnccl.so" \\\n', ""),
            "makes no libnccl.so link": lambda t: t.replace('/libnccl.so" \\', '/libnccl.so.2" \\'),
        }
        for needle, edit in cases.items():
            with self.subTest(needle):
                found = self.lint(edit)
                self.assertTrue(any(needle in p for p in found), found)


class Entrypoint(unittest.TestCase):
    """deploy/entrypoint.sh with ARBITER_BIN pointing at a script that prints what it got."""

    def run_entry(self, env: dict, *args: str):
        with tempfile.TemporaryDirectory() as tmp:
            fake = Path(tmp) / "arbiter"
            fake.write_text('#!/bin/sh\necho "args=$*"\nenv | grep "^ARBITER_" | grep -v ARBITER_BIN | sort\n')
            fake.chmod(0o755)
            base = {"PATH": os.environ["PATH"], "ARBITER_BIN": str(fake)}
            return subprocess.run(["sh", str(DEPLOY / "entrypoint.sh"), *args], env={**base, **env},
                                  capture_output=True, text=True)

    def test_outside_a_group_nothing_is_mapped(self):
        r = self.run_entry({"ARBITER_TP": "8"}, "serve", "--demo")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.splitlines(), ["args=serve --demo", "ARBITER_TP=8"])

    def test_a_group_maps_onto_the_rendezvous_settings(self):
        lws = {"LWS_LEADER_ADDRESS": "arbiter-h100x2-0.arbiter-h100x2.rm", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}
        r = self.run_entry(lws, "serve")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.splitlines(), [
            "args=serve", "ARBITER_LEADER_ADDR=arbiter-h100x2-0.arbiter-h100x2.rm:29500",
            "ARBITER_NODES=2", "ARBITER_NODE_RANK=1"])
        r = self.run_entry({**lws, "ARBITER_RENDEZVOUS_PORT": "31000", "ARBITER_NODE_RANK": "0"}, "serve")
        self.assertIn("ARBITER_LEADER_ADDR=arbiter-h100x2-0.arbiter-h100x2.rm:31000", r.stdout.splitlines())
        self.assertIn("ARBITER_NODE_RANK=0", r.stdout.splitlines(), "a value set in the pod spec wins")

    def test_half_a_group_is_refused(self):
        r = self.run_entry({"LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}, "serve")
        self.assertEqual(r.returncode, 2)
        self.assertIn("a LeaderWorkerSet sets all three", r.stderr)
        self.assertEqual(r.stdout, "", "arbiter is not started")
        r = self.run_entry({"LWS_LEADER_ADDRESS": "x", "LWS_GROUP_SIZE": "two", "LWS_WORKER_INDEX": "1"}, "serve")
        self.assertEqual(r.returncode, 2)
        self.assertIn("must be whole numbers", r.stderr)


if __name__ == "__main__":
    unittest.main()
