"""How far a submitted suite is, read from its Workflow object alone: training pods pending, running,
succeeded and failed; failed attempts split into preemptions and other failures (`builder.is_preemption`, the
retry expression's own test); the run ids of the failures; the report once aggregation finished.

`rethink status --store s3://...` stays the store's view (which runs have results); this is Argo's view
(which pods ran, how often they were retried), and it needs nothing but read access to the workflow.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from workflows import builder as rw
from workflows.cluster import ClusterError

STATES = ("pending", "running", "succeeded", "failed", "not run")
FINISHED = ("Succeeded", "Failed", "Error")  # a workflow's (or node's) phases that are final
FAILED = ("Failed", "Error")
DEFAULT_INTERVAL = 30.0  # seconds between two reads of the workflow
LOST_CONTACT_LIMIT = 10  # consecutive failed reads before --watch gives up


@dataclass(frozen=True)
class Attempt:
    """One pod of a training task."""

    phase: str  # Argo's node phase: Pending, Running, Succeeded, Failed, Error
    exit_code: str | None
    message: str

    @property
    def failed(self) -> bool:
        return self.phase in FAILED

    @property
    def preempted(self) -> bool:
        return self.failed and rw.is_preemption(self.exit_code, self.message)


@dataclass(frozen=True)
class Task:
    """One training task of the DAG (a run, or a pack of runs) and its attempts so far."""

    name: str  # the DAG task: train-012, pack-003
    what: str  # "run 3f2a..." or "pack 3 (8 runs)"
    runs: int
    state: str  # one of STATES
    attempts: tuple[Attempt, ...]
    message: str  # why it failed, when it did
    waiting_to_retry: bool  # its last attempt failed and Argo is backing off before the next


@dataclass(frozen=True)
class Progress:
    name: str
    phase: str  # the workflow's: Pending, Running, Succeeded, Failed, Error
    message: str
    tasks: tuple[Task, ...]
    packs: bool  # one task per pack of runs (submit.py --pack)
    on_demand_after: int | None  # --on-demand-after N, read from the training template
    aggregate: str | None  # the aggregate node's phase, None before it exists
    aggregate_message: str
    report: str | None  # where the report lands
    unreadable: str = ""  # why the nodes could not be read (offloaded to Argo's database), or ""

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.tasks)

    @property
    def preemptions(self) -> int:
        return sum(a.preempted for t in self.tasks for a in t.attempts)

    @property
    def other_failures(self) -> int:
        return sum(a.failed and not a.preempted for t in self.tasks for a in t.attempts)

    @property
    def failed(self) -> list[Task]:
        return [t for t in self.tasks if t.state == "failed"]

    @property
    def on_demand(self) -> int:
        """Running tasks whose current attempt went to on-demand nodes."""
        if self.on_demand_after is None:
            return 0
        return sum(t.state == "running" and not t.waiting_to_retry and len(t.attempts) > self.on_demand_after
                   for t in self.tasks)  # fmt: skip


# ---------------------------------------------------------------------------------------------- reading


def workflow_nodes(workflow: dict) -> tuple[dict, str]:
    """The status' nodes by id (inflated when Argo compressed them), and why they are unreadable, if they are."""
    status = workflow.get("status") or {}
    if status.get("nodes"):
        return status["nodes"], ""
    if status.get("compressedNodes"):
        try:
            return json.loads(gzip.decompress(base64.b64decode(status["compressedNodes"]))), ""
        except (ValueError, OSError):
            return (
                {},
                "its node status is compressed in a format this reader does not know: pass --argo-server",
            )
    if status.get("offloadNodeStatusVersion"):
        return (
            {},
            "its node status is offloaded to Argo's database: pass --argo-server to read it through the server",
        )
    return {}, ""


def _params(obj: dict | None) -> dict[str, str]:
    return {p["name"]: str(p.get("value", "")) for p in ((obj or {}).get("parameters") or [])}


def progress(workflow: dict) -> Progress:
    """What the Workflow object says about the suite."""
    spec, status = workflow.get("spec") or {}, workflow.get("status") or {}
    templates = {t["name"]: t for t in spec.get("templates") or []}
    main = templates.get(spec.get("entrypoint", "main")) or {}
    planned = [t for t in (main.get("dag") or {}).get("tasks") or [] if t.get("template") == "train"]
    nodes, unreadable = workflow_nodes(workflow)
    phase = status.get("phase") or "Pending"

    # DAG task name -> its node: the Retry node, or the Pod node of a template without retries
    by_task: dict[str, dict] = {}
    for node in nodes.values():
        if node.get("templateName") == "train" and node.get("type") in ("Retry", "Pod"):
            name = node.get("displayName", "")
            if node["type"] == "Retry" or not re.search(r"\(\d+\)$", name):
                by_task[name] = node

    tasks = []
    names = [t["name"] for t in planned] or sorted(by_task)
    arguments = {t["name"]: _params(t.get("arguments")) for t in planned}
    for name in names:
        node = by_task.get(name)
        values = {**arguments.get(name, {}), **_params((node or {}).get("inputs"))}
        tasks.append(_task(name, node, nodes, values, finished=phase in FINISHED))

    aggregate = next((n for n in nodes.values() if n.get("templateName") == "aggregate"
                      and n.get("type") in ("Retry", "Pod") and n.get("displayName") == "aggregate"), None)  # fmt: skip
    patch = (templates.get("train") or {}).get("podSpecPatch") or ""
    fallback = re.search(r"asInt\(retries\) >= (\d+)", patch)
    return Progress(
        name=(workflow.get("metadata") or {}).get("name", "?"),
        phase=phase,
        message=status.get("message") or "",
        tasks=tuple(tasks),
        packs=any(t.what.startswith("pack ") for t in tasks),
        on_demand_after=int(fallback.group(1)) if fallback else None,
        aggregate=aggregate.get("phase") if aggregate else None,
        aggregate_message=(aggregate or {}).get("message") or "",
        report=_report(templates.get("aggregate") or {}),
        unreadable=unreadable,
    )


def _task(name: str, node: dict | None, nodes: dict, values: dict[str, str], finished: bool) -> Task:
    if "pack" in values:
        runs = int(values.get("pack-runs") or 1)
        what = f"pack {values['pack']} ({runs} runs)"
    else:
        runs, what = 1, f"run {values['run-id']}" if values.get("run-id") else "run ?"
    if node is None:
        return Task(name, what, runs, "not run" if finished else "pending", (), "", False)
    pods = [nodes[c] for c in node.get("children") or [] if c in nodes] if node["type"] == "Retry" else [node]
    attempts = tuple(Attempt(p.get("phase", "Pending"), (p.get("outputs") or {}).get("exitCode"), p.get("message") or "")
                     for p in pods)  # fmt: skip
    phase = node.get("phase", "Pending")
    last = attempts[-1] if attempts else None
    if phase == "Succeeded":
        state = "succeeded"
    elif phase in FAILED:
        state = "failed"
    elif phase in ("Omitted", "Skipped"):
        state = "not run"
    elif last is None or last.phase == "Pending":
        state = "pending"  # e.g. waiting for a (spot) GPU node
    else:
        state = "running"
    message = (last.message if last and last.failed else "") or node.get("message") or ""
    return Task(name, what, runs, state, attempts, message, state == "running" and bool(last and last.failed))


def _report(aggregate_template: dict) -> str | None:
    """The report's location, from the aggregate pod's own command line (--suite S --store STORE)."""
    args = (aggregate_template.get("container") or {}).get("args") or []
    options = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
    if "--suite" in options and "--store" in options:
        return rw.report_location(options["--store"], options["--suite"], "--synthetic" in args)
    return None


# ---------------------------------------------------------------------------------------------- rendering


def summary(p: Progress) -> str:
    """One line: the workflow's phase, the tasks in each state, the failed attempts by cause."""
    if p.unreadable:
        return f"{p.name} {p.phase}: {p.unreadable}"
    runs = sum(t.runs for t in p.tasks)
    head = f"{len(p.tasks)} packs ({runs} runs)" if p.packs else f"{runs} runs"
    parts = []
    for state in STATES:
        n = p.count(state)
        if state == "not run" and not n:
            continue
        text = f"{n} {state}"
        if state == "running":
            waiting = sum(t.waiting_to_retry for t in p.tasks)
            notes = [f"{k} {what}" for k, what in ((p.on_demand, "on on-demand nodes"),
                                                   (waiting, "waiting to retry")) if k]  # fmt: skip
            text += f" ({', '.join(notes)})" if notes else ""
        parts.append(text)
    lost = f"failed attempts: {p.preemptions} preempted, {p.other_failures} other"
    return f"{p.name} {p.phase}: {head}: {', '.join(parts)}; {lost}"


def failure(t: Task) -> str:
    attempts = f"after {len(t.attempts)} attempt{'s' * (len(t.attempts) != 1)}"
    preempted = sum(a.preempted for a in t.attempts)
    note = f", {preempted} preempted" if preempted else ""
    return f"  failed {t.name} ({t.what}) {attempts}{note}: {t.message or 'no message'}"


def ending(p: Progress) -> list[str]:
    """What a finished (or, for `status`, any) workflow says about its report."""
    lines = [f"  workflow: {p.message}"] if p.message and p.finished else []
    if p.aggregate == "Succeeded":
        lines.append(f"report: {p.report}" if p.report else "report: aggregation succeeded")
    elif p.aggregate in FAILED:
        lines.append(f"no report: aggregation failed: {p.aggregate_message or 'no message'}")
    elif p.finished:
        lines.append("no report: aggregation did not run (no training task succeeded)")
    return lines


def status_lines(p: Progress) -> list[str]:
    """The whole view, as `submit.py status NAME` prints it."""
    lines = [summary(p), *map(failure, p.failed), *ending(p)]
    if not p.finished and p.aggregate is None:
        lines.append(
            f"report: {p.report} once aggregation ran" if p.report else "report: once aggregation ran"
        )
    return lines


def watch(get: Callable[[], dict], interval: float = DEFAULT_INTERVAL, out=None,
          sleep: Callable[[float], None] = time.sleep) -> int:  # fmt: skip
    """Print the summary whenever it changes and each failure once, until the workflow finishes.

    0 when it succeeded, 1 when it failed. A read that fails after the first is retried (a port-forward or
    an API server can drop for a moment) up to LOST_CONTACT_LIMIT times in a row.
    """
    out = out or sys.stdout
    last, told, lost = None, set(), 0
    workflow = get()
    while True:
        p = progress(workflow)
        line = summary(p)
        if line != last:
            print(f"{time.strftime('%H:%M:%S')} {line}", file=out, flush=True)
            last = line
        for t in p.failed:
            if t.name not in told:
                print(failure(t), file=out, flush=True)
                told.add(t.name)
        if p.finished or p.unreadable:
            for text in ending(p):
                print(text, file=out, flush=True)
            return 0 if p.phase == "Succeeded" else 1
        while True:
            sleep(interval)
            try:
                workflow, lost = get(), 0
                break
            except ClusterError as e:
                lost += 1
                if lost >= LOST_CONTACT_LIMIT:
                    raise
                if lost == 1:
                    print(f"lost contact ({e}); trying again every {interval:g} s", file=out, flush=True)
