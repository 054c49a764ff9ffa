"""End to end without a cluster: run a rendered workflow's containers on this machine, in dependency order.

Each DAG task becomes a subprocess running the container's command line (`rethink ...` with Argo's
`{{inputs.parameters.*}}` filled in from the task's arguments), with the container's environment (its Secret
references replaced by the test S3 server's credentials) and a fresh directory for each pod's /data volume,
against a real S3 server. What this checks that the schema cannot: the pods' command lines work together
(the data step, every training run by its index, the aggregation finding every run) and the report lands in
the bucket. Sized to finish in well under a minute on a 2-core CPU: fig2b (2 runs), smoke sizing, 1 epoch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflows"))

import rethink_workflow as rw  # noqa: E402

PARAM = re.compile(r"\{\{inputs\.parameters\.([\w-]+)\}\}")


def _dependencies(expression: str) -> set[str]:
    """Task names an Argo `depends` expression mentions ('a.Succeeded || b' -> {'a', 'b'})."""
    return {m.group(1) for m in re.finditer(r"([A-Za-z0-9-]+)(?:\.[A-Za-z]+)?", expression)}


def _depends_holds(expression: str, phases: dict[str, str]) -> bool:
    """Evaluate a `depends` expression of the forms the builder writes, given each finished task's phase."""

    def term(match: re.Match) -> str:
        task, result = match.group(1), match.group(2) or "Succeeded"
        return str(phases[task] == result)

    python = re.sub(r"([A-Za-z0-9-]+)(?:\.([A-Za-z]+))?", term, expression)
    return eval(python.replace("||", " or ").replace("&&", " and "), {"__builtins__": {}})


def execution_order(wf: dict) -> list[dict]:
    """The main DAG's tasks in an order that respects `depends`."""
    (main,) = [t for t in wf["spec"]["templates"] if "dag" in t]
    pending = {t["name"]: t for t in main["dag"]["tasks"]}
    order: list[dict] = []
    while pending:
        ready = [
            t for t in pending.values() if _dependencies(t.get("depends", "")) <= {o["name"] for o in order}
        ]
        assert ready, f"cycle or unknown dependency among {list(pending)}"
        for t in ready:
            order.append(pending.pop(t["name"]))
    return order


class LocalPods:
    """Runs a workflow's container templates as local processes: the `argo` of this test."""

    def __init__(self, wf: dict, secrets: dict[str, str], workdir: Path):
        self.wf = wf
        self.templates = {t["name"]: t for t in wf["spec"]["templates"]}
        self.secrets = secrets
        self.workdir = workdir
        self.phases: dict[str, str] = {}
        self.logs: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        self.labels: dict[str, dict[str, str]] = {}  # each pod's labels, as Argo would set them

    def command(self, task: dict) -> tuple[list[str], dict[str, str], Path]:
        template = self.templates[task["template"]]
        container = template["container"]
        values = {p["name"]: p["value"] for p in task.get("arguments", {}).get("parameters", [])}
        declared = {p["name"] for p in template.get("inputs", {}).get("parameters", [])}
        assert set(values) == declared, (task["name"], values, declared)
        args = [PARAM.sub(lambda m: values[m.group(1)], a) for a in container["args"]]
        labels = {
            k: PARAM.sub(lambda m: values[m.group(1)], v) for k, v in template["metadata"]["labels"].items()
        }
        # Every pod gets fresh, empty volumes, mounted where the container expects them.
        self.attempts[task["name"]] = attempt = self.attempts.get(task["name"], 0) + 1
        pod_dir = self.workdir / f"{task['name']}-{attempt}"  # a retried pod is a new pod
        for mount in container.get("volumeMounts", []):
            local = pod_dir / mount["name"]
            local.mkdir(parents=True)
            args = [str(local) if a == mount["mountPath"] else a for a in args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["HOME"] = str(pod_dir)
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
                continue
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == rw.DEFAULT_S3_SECRET
            if ref["key"] in self.secrets:
                env[var["name"]] = self.secrets[ref["key"]]
            else:
                assert ref.get("optional"), f"the Secret has no key {ref['key']}"
        assert container["command"] == ["rethink"]
        self.labels[task["name"]] = labels
        return [sys.executable, "-m", "rethink", *args], env, pod_dir

    def run(self, task: dict) -> None:
        if "depends" in task and not _depends_holds(task["depends"], self.phases):
            self.phases[task["name"]] = "Omitted"
            return
        cmd, env, cwd = self.command(task)
        out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
        self.logs[task["name"]] = out.stdout + out.stderr
        self.phases[task["name"]] = "Succeeded" if out.returncode == 0 else "Failed"

    def run_all(self) -> None:
        """Every task once its dependencies finished; ready tasks at once, up to the workflow's parallelism."""
        done: set[str] = set()
        order = execution_order(self.wf)
        with ThreadPoolExecutor(max_workers=self.wf["spec"].get("parallelism", 1)) as pool:
            while len(done) < len(order):
                ready = [
                    t for t in order if t["name"] not in done and _dependencies(t.get("depends", "")) <= done
                ]
                list(pool.map(self.run, ready))
                done |= {t["name"] for t in ready}


def test_depends_helpers():
    assert _dependencies("train-000.Succeeded || train-001.Succeeded") == {"train-000", "train-001"}
    assert _dependencies("data") == {"data"}
    assert _depends_holds("a.Succeeded || b.Succeeded", {"a": "Failed", "b": "Succeeded"})
    assert not _depends_holds("a.Succeeded || b.Succeeded", {"a": "Failed", "b": "Failed"})
    assert not _depends_holds("data", {"data": "Failed"})


def test_rendered_workflow_runs_end_to_end(s3_server, s3_url, tmp_path):
    settings = rw.Settings(suite="fig2b", profile="local", synthetic=True, smoke=True, epochs=1, store=s3_url,
                           device="cpu")  # fmt: skip
    wf = rw.build_workflow(settings).to_dict()
    secrets = {k: v for k, v in s3_server.env.items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                                 "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}  # fmt: skip
    pods = LocalPods(wf, secrets, tmp_path / "pods")
    pods.run_all()
    report = "\n".join(f"--- {name}\n{log[-2000:]}" for name, log in pods.logs.items())
    assert set(pods.phases.values()) == {"Succeeded"}, report
    assert set(pods.phases) == {"data", "train-000", "train-001", "aggregate"}
    assert "nothing to push" in pods.logs["data"]

    # The runs the pods trained are the ones the workflow labels them with, and the report is in the bucket.
    prefix = s3_url.removeprefix(f"s3://{s3_server.bucket}/")
    listing = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix + "/")
    keys = {obj["Key"].removeprefix(prefix + "/") for obj in listing.get("Contents", [])}
    trained = {name: pods.labels[name]["rethink/run-id"] for name in ("train-000", "train-001")}
    assert len(set(trained.values())) == 2
    for name, rid in trained.items():
        assert f"runs/{rid}/result.json" in keys, sorted(keys)
        assert f"run {rid}" in pods.logs[name]  # the pod trained the run its label names
    assert "reports/fig2b/report.html" in keys, sorted(keys)

    # A retried pod of a finished run exits at once without training again (what a preempted retry relies on).
    pods.run(execution_order(wf)[1])
    assert "already finished" in pods.logs["train-000"], pods.logs["train-000"]


@pytest.mark.slow
def test_smoke_suite_runs_end_to_end(s3_server, s3_url, tmp_path):
    """The whole smoke suite (36 runs) the same way: minutes on a CPU."""
    settings = rw.Settings(suite="smoke", profile="local", synthetic=True, store=s3_url, device="cpu")
    wf = rw.build_workflow(settings).to_dict()
    secrets = {k: v for k, v in s3_server.env.items() if k.startswith("AWS_") and "FILE" not in k}
    pods = LocalPods(wf, secrets, tmp_path / "pods")
    pods.run_all()
    assert set(pods.phases.values()) == {"Succeeded"}, {k: v[-1500:] for k, v in pods.logs.items()}
    key = s3_url.removeprefix(f"s3://{s3_server.bucket}/") + "/reports/smoke/report.html"
    s3_server.client().head_object(Bucket=s3_server.bucket, Key=key)
