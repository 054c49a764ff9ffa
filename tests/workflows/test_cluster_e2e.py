"""End to end without a cluster: run a rendered workflow's containers on this machine, in dependency order.

Each DAG task becomes a subprocess running the container's command line (`rethink ...` with Argo's
`{{inputs.parameters.*}}` filled in from the task's arguments), with the container's environment (its Secret
references replaced by the test S3 server's credentials) and a fresh directory for each pod's /data volume,
against a real S3 server. What this checks that the schema cannot: the pods' command lines work together
(the data step, every training run by its index, the aggregation finding every run) and the report lands in
the bucket. Sized to finish in well under a minute on a 2-core CPU: fig2b (2 runs), smoke sizing, 1 epoch.
"""

from __future__ import annotations

import pytest

from tests.workflows.pods import LocalPods, execution_order, rw
from tests.workflows.pods import dependencies as _dependencies
from tests.workflows.pods import depends_holds as _depends_holds


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
    assert "reports/synthetic/fig2b/report.html" in keys, sorted(keys)

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
    key = s3_url.removeprefix(f"s3://{s3_server.bucket}/") + "/reports/synthetic/smoke/report.html"
    s3_server.client().head_object(Bucket=s3_server.bucket, Key=key)
