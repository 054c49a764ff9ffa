"""What `submit.py status NAME` and `--watch` read from a Workflow object: the recorded one mid-run (with
preemptions, an out-of-memory kill, a run failed for good, a pod on the on-demand fallback), the same object
later, packs, compressed and offloaded node status; and the preemption test the retry expression applies."""

from __future__ import annotations

import base64
import copy
import gzip
import json
import re
from pathlib import Path

import pytest
import yaml

from rethink.suites import Options, expand
from tests.workflows.fake_kube import NAMESPACE
from workflows import builder as rw
from workflows import submit, watch

RECORDED = Path(__file__).parent / "recorded" / "rethink-fig1a-x7k2p.yaml"
NAME = "rethink-fig1a-x7k2p"


@pytest.fixture
def running() -> dict:
    return yaml.safe_load(RECORDED.read_text())


def node(wf: dict, display_name: str) -> dict:
    (found,) = [n for n in wf["status"]["nodes"].values() if n["displayName"] == display_name]
    return found


def add_attempt(
    wf: dict, task: str, phase: str, exit_code: str | None = None, message: str | None = None
) -> None:
    retry = node(wf, task)
    pod = {
        **copy.deepcopy(node(wf, f"{task}(0)")),
        "phase": phase,
        "displayName": f"{task}({len(retry['children'])})",
    }
    pod["id"] = f"{retry['id']}-{len(retry['children'])}"
    pod.pop("message", None)
    pod["outputs"] = {"exitCode": exit_code} if exit_code else {}
    if message:
        pod["message"] = message
    wf["status"]["nodes"][pod["id"]] = pod
    retry["children"].append(pod["id"])


def finished(running: dict) -> dict:
    """The recorded workflow later: train-003 and train-004 succeeded, the report rendered; Failed (train-002)."""
    wf = copy.deepcopy(running)
    node(wf, "train-003(3)")["phase"] = "Succeeded"
    add_attempt(wf, "train-004", "Failed", "143", "Error (exit code 143)")
    add_attempt(wf, "train-004", "Succeeded", "0")
    for task in ("train-003", "train-004"):
        node(wf, task)["phase"] = "Succeeded"
        node(wf, task).pop("message", None)
    aggregate = {"id": f"{NAME}-9", "name": f"{NAME}.aggregate", "displayName": "aggregate", "type": "Retry",
                 "templateName": "aggregate", "phase": "Succeeded", "children": []}  # fmt: skip
    wf["status"]["nodes"][aggregate["id"]] = aggregate
    wf["status"].update(phase="Failed", message="child 'rethink-fig1a-x7k2p-1713459470' failed")
    return wf


def test_the_recorded_workflow_mid_run(running):
    p = watch.progress(running)
    assert (p.name, p.phase, p.finished) == (NAME, "Running", False)
    assert [t.name for t in p.tasks] == [f"train-{i:03d}" for i in range(5)]
    assert [t.state for t in p.tasks] == ["succeeded", "succeeded", "failed", "running", "running"]
    assert [len(t.attempts) for t in p.tasks] == [3, 1, 3, 4, 1]
    # preempted: train-000 twice (143, node shutdown), train-003 three times (137, pod deleted, 143), train-004
    # once; other: train-002's exit 1, its OOMKilled 137 and its last exit 1
    assert (p.preemptions, p.other_failures) == (6, 3)
    assert [t.name for t in p.tasks if t.waiting_to_retry] == ["train-004"]
    assert p.on_demand_after == 3 and p.on_demand == 1  # train-003's 4th attempt
    run_ids = [s.run_id for s in expand("fig1a", Options())]
    (failed,) = p.failed
    assert (failed.name, failed.what, failed.message) == (
        "train-002",
        f"run {run_ids[2]}",
        "Error (exit code 1)",
    )
    assert watch.status_lines(p) == [
        f"{NAME} Running: 5 runs: 0 pending, 2 running (1 on on-demand nodes, 1 waiting to retry), 2 succeeded, "
        "1 failed; failed attempts: 6 preempted, 3 other",
        f"  failed train-002 (run {run_ids[2]}) after 3 attempts: Error (exit code 1)",
        "report: s3://rethink/runs/reports/fig1a/report.html once aggregation ran",
    ]


def test_the_recorded_workflow_finished(running):
    p = watch.progress(finished(running))
    assert p.finished and p.phase == "Failed"
    assert (p.count("succeeded"), p.count("failed"), p.preemptions, p.other_failures) == (4, 1, 7, 3)
    lines = watch.status_lines(p)
    assert lines[-1] == "report: s3://rethink/runs/reports/fig1a/report.html"
    assert "  workflow: child 'rethink-fig1a-x7k2p-1713459470' failed" in lines


def test_before_anything_ran_every_run_is_pending(running):
    wf = {k: v for k, v in running.items() if k != "status"}
    p = watch.progress(wf)
    assert p.phase == "Pending" and p.count("pending") == 5 and p.failed == []
    wf["status"] = {"phase": "Failed", "message": "Stopped with strategy 'Stop'"}
    p = watch.progress(wf)
    assert p.count("not run") == 5
    assert watch.ending(p)[-1] == "no report: aggregation did not run (no training task succeeded)"


def test_packs_show_the_pack_and_its_runs(running):
    for task in running["spec"]["templates"][0]["dag"]["tasks"]:
        if task["template"] == "train":
            j = task["name"][-1]
            task["name"] = f"pack-00{j}"
            task["arguments"]["parameters"] = [{"name": "pack-index", "value": j}, {"name": "pack", "value": j},
                                               {"name": "pack-runs", "value": "3"}]  # fmt: skip
    for n in running["status"]["nodes"].values():
        n["displayName"] = n["displayName"].replace("train-", "pack-")
        n.pop("inputs", None)  # read from the spec's arguments instead
    p = watch.progress(running)
    assert p.packs and watch.summary(p).startswith(f"{NAME} Running: 5 packs (15 runs): 0 pending")
    assert watch.failure(p.failed[0]).startswith("  failed pack-002 (pack 2 (3 runs)) after 3 attempts")


def test_compressed_and_offloaded_node_status(running):
    compressed = copy.deepcopy(running)
    nodes = compressed["status"].pop("nodes")
    compressed["status"]["compressedNodes"] = base64.b64encode(
        gzip.compress(json.dumps(nodes).encode())
    ).decode()
    assert watch.progress(compressed) == watch.progress(running)
    offloaded = copy.deepcopy(running)
    del offloaded["status"]["nodes"]
    offloaded["status"]["offloadNodeStatusVersion"] = "fnv:123"
    assert "offloaded to Argo's database: pass --argo-server" in watch.summary(watch.progress(offloaded))


@pytest.mark.parametrize("exit_code, message, preempted", [
    ("143", "Error (exit code 143)", True),  # our checkpoint-and-exit on SIGTERM
    ("137", "Error (exit code 137)", True),  # killed after the grace period
    ("137", "OOMKilled (exit code 137)", False),  # out of memory: a real failure
    (None, "Pod was terminated in response to imminent node shutdown.", True),
    (None, "pod deleted", True),
    ("1", "Error (exit code 1)", False),
    (None, None, False),
])  # fmt: skip
def test_is_preemption_agrees_with_the_retry_expression(exit_code, message, preempted):
    assert rw.is_preemption(exit_code, message) is preempted
    # the retry expression's two preemption terms, read as Python: the same answer
    expr = rw.TRAIN_RETRY_EXPRESSION
    codes = [int(c) for c in re.search(r"in \[(\d+), (\d+)\]", expr).groups()]
    by_code = exit_code is not None and int(exit_code) in codes and "OOMKilled" not in (message or "")
    by_message = re.search(rw.PREEMPTION_MESSAGE, message or "") is not None
    assert (by_code or by_message) is preempted


def test_status_prints_once_through_the_kubernetes_api(kube, kubeconfig, running, capsys):
    kube.workflows[(NAMESPACE, NAME)] = [running]
    assert submit.main(["status", NAME]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{NAME} Running: 5 runs") and out[1].startswith("  failed train-002")
    assert kube.paths() == [f"/apis/argoproj.io/v1alpha1/namespaces/{NAMESPACE}/workflows/{NAME}"]


def test_watch_prints_a_line_when_something_changes_and_ends_with_the_report(
    kube, kubeconfig, running, capsys
):
    pending = {k: v for k, v in running.items() if k != "status"}
    kube.workflows[(NAMESPACE, NAME)] = [pending, pending, running, running, finished(running)]
    assert submit.main(["status", NAME, "--watch", "--interval", "0.01"]) == 1  # the workflow failed
    lines = capsys.readouterr().out.splitlines()
    stamped = [re.sub(r"^\d\d:\d\d:\d\d ", "", x) for x in lines if re.match(r"^\d\d:\d\d:\d\d ", x)]
    assert [x.split(":")[0] for x in stamped] == [f"{NAME} Pending", f"{NAME} Running", f"{NAME} Failed"]
    assert stamped[-1].endswith("4 succeeded, 1 failed; failed attempts: 7 preempted, 3 other")
    assert sum(x.startswith("  failed train-002") for x in lines) == 1  # each failure once
    assert lines[-1] == "report: s3://rethink/runs/reports/fig1a/report.html"
    assert len(kube.paths()) == 5


def test_submit_watch_follows_what_it_submitted(kube, kubeconfig, capsys):
    kube.then = lambda wf: [{**wf, "status": {"phase": "Running"}}, {**wf, "status": {"phase": "Succeeded"}}]
    args = ["--suite", "fig2b", "--profile", "local", "--synthetic", "--watch", "--interval", "0.01"]
    assert submit.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d\d:\d\d:\d\d rethink-fig2b-k8s7q Running: 2 runs: 2 pending", out)
    assert out.rstrip().endswith("no report: aggregation did not run (no training task succeeded)")


def test_watch_rides_out_a_lost_connection(running):
    from workflows.cluster import ClusterError

    answers = [running, ClusterError("cannot reach the Kubernetes API"), finished(running)]

    def get():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    out = []

    class Out:
        def write(self, text):
            out.append(text)

        def flush(self):
            pass

    assert watch.watch(get, interval=0, out=Out(), sleep=lambda s: None) == 1
    text = "".join(out)
    assert "lost contact (cannot reach the Kubernetes API); trying again every 0 s" in text
    assert text.rstrip().endswith("report: s3://rethink/runs/reports/fig1a/report.html")
