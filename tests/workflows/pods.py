"""A rendered workflow's pods run without a cluster, in dependency order: the `argo` of the end-to-end tests.

`Pods.pod` resolves what Kubernetes would make of a task: the template's args with the task's parameters
filled in, its environment with Secret references resolved, its labels, and a fresh, empty directory for
each volume (a retried pod is a new pod). How a pod then runs is a subclass's business: `LocalPods` runs it
as a process of this checkout (tests/workflows/test_cluster_e2e.py), `ContainerPods` as a container of the image
(tests/workflows/test_container.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from workflows import builder as rw

ROOT = Path(__file__).resolve().parents[2]

PARAM = re.compile(r"\{\{inputs\.parameters\.([\w-]+)\}\}")


def dependencies(expression: str) -> set[str]:
    """Task names an Argo `depends` expression mentions ('a.Succeeded || b' -> {'a', 'b'})."""
    return {m.group(1) for m in re.finditer(r"([A-Za-z0-9-]+)(?:\.[A-Za-z]+)?", expression)}


def depends_holds(expression: str, phases: dict[str, str]) -> bool:
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
            t for t in pending.values() if dependencies(t.get("depends", "")) <= {o["name"] for o in order}
        ]
        assert ready, f"cycle or unknown dependency among {list(pending)}"
        for t in ready:
            order.append(pending.pop(t["name"]))
    return order


@dataclass
class Pod:
    """One attempt of one task, as Kubernetes would create it."""

    task: str
    attempt: int
    template: dict  # the rendered template (its volumes, metadata)
    container: dict  # the rendered container
    args: list[str]  # the container's args, parameters filled in
    env: dict[str, str]  # the container's environment, Secret references resolved
    labels: dict[str, str]
    volumes: dict[str, Path]  # mount path -> a fresh host directory
    dir: Path  # this attempt's own directory (its volumes live below it)


class Pods:
    """Runs a workflow's tasks once their dependencies finished; `execute` says how one pod runs."""

    def __init__(self, wf: dict, secrets: dict[str, str], workdir: Path):
        self.wf = wf
        self.templates = {t["name"]: t for t in wf["spec"]["templates"]}
        self.secrets = secrets
        self.workdir = workdir
        self.phases: dict[str, str] = {}
        self.logs: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        self.labels: dict[str, dict[str, str]] = {}  # each pod's labels, as Argo would set them

    def pod(self, task: dict) -> Pod:
        template = self.templates[task["template"]]
        container = template["container"]
        values = {p["name"]: p["value"] for p in task.get("arguments", {}).get("parameters", [])}
        declared = {p["name"] for p in template.get("inputs", {}).get("parameters", [])}
        assert set(values) == declared, (task["name"], values, declared)
        args = [PARAM.sub(lambda m: values[m.group(1)], a) for a in container["args"]]
        labels = {
            k: PARAM.sub(lambda m: values[m.group(1)], v) for k, v in template["metadata"]["labels"].items()
        }
        self.attempts[task["name"]] = attempt = self.attempts.get(task["name"], 0) + 1
        pod_dir = self.workdir / f"{task['name']}-{attempt}"  # a retried pod is a new pod
        volumes = {}
        for mount in container.get("volumeMounts", []):
            volumes[mount["mountPath"]] = pod_dir / mount["name"]
            volumes[mount["mountPath"]].mkdir(parents=True)
        env = {}
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
        return Pod(task["name"], attempt, template, container, args, env, labels, volumes, pod_dir)

    def execute(self, pod: Pod) -> tuple[int, str]:
        """Run the pod to its end: (exit code, log)."""
        raise NotImplementedError

    def run(self, task: dict) -> None:
        if "depends" in task and not depends_holds(task["depends"], self.phases):
            self.phases[task["name"]] = "Omitted"
            return
        code, self.logs[task["name"]] = self.execute(self.pod(task))
        self.phases[task["name"]] = "Succeeded" if code == 0 else "Failed"

    def run_all(self) -> None:
        """Every task once its dependencies finished; ready tasks at once, up to the workflow's parallelism."""
        done: set[str] = set()
        order = execution_order(self.wf)
        with ThreadPoolExecutor(max_workers=self.wf["spec"].get("parallelism", 1)) as pool:
            while len(done) < len(order):
                ready = [
                    t for t in order if t["name"] not in done and dependencies(t.get("depends", "")) <= done
                ]
                list(pool.map(self.run, ready))
                done |= {t["name"] for t in ready}


class LocalPods(Pods):
    """Each pod a local process of this checkout's CLI, its volumes' paths substituted into its args."""

    def execute(self, pod: Pod) -> tuple[int, str]:
        args = [str(pod.volumes.get(a, a)) for a in pod.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(pod.env, HOME=str(pod.dir))
        out = subprocess.run([sys.executable, "-m", "rethink", *args], env=env, cwd=pod.dir,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        return out.returncode, out.stdout + out.stderr
