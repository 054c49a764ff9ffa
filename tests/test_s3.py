"""The S3 backend against a real S3 server on 127.0.0.1 (SeaweedFS `weed mini`, started by conftest).

Credentials, retries through a transient outage, a clear error after a lasting one (with a good checkpoint left
behind), all-or-nothing PUTs, and the trainer keeping a whole run in s3://bucket/prefix.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import threading
import time
from urllib.parse import urlparse

import pytest
import torch

from rethink.cli import main
from rethink.spec import RunSpec
from rethink.store import S3Store, StoreError, open_store, run_key
from rethink.train import read_metrics

ARGS = ["--model", "mlp-1x512", "--batch-size", "32", "--epochs", "3", "--device", "cpu"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("rethink: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_fail_fast_and_say_so(variable, s3_env, s3_url, monkeypatch):
    monkeypatch.setenv(variable, "wrong")
    store = open_store(s3_url)
    start = time.monotonic()
    with pytest.raises(StoreError, match="credentials") as e:
        store.write_text("runs/x/spec.json", "{}")
    assert time.monotonic() - start < 5  # refused, not retried for minutes
    assert "AWS_SECRET_ACCESS_KEY" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StoreError, match="credentials"):
        store.read_bytes("runs/x/spec.json")


def test_cli_with_wrong_credentials_is_one_line_and_exit_3(
    s3_env, s3_url, train_data_dir, monkeypatch, capsys
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    code = main(["train", *ARGS, "--data-dir", str(train_data_dir), "--store", s3_url])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 3 and "credentials" in line


def test_missing_bucket_is_a_clear_error(s3_env):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        open_store("s3://no-such-bucket/x").read_bytes("runs/a/result.json")


def test_unreachable_endpoint_is_retried_then_reported(s3_env, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    logged: list[str] = []
    store = S3Store("s3://rethink-test/x", retry_seconds=1.5, log=logged.append)
    start = time.monotonic()
    with pytest.raises(StoreError, match="unreachable") as e:
        store.write_bytes("runs/a/checkpoint.pt", b"x")
    assert 1.0 <= time.monotonic() - start < 15
    assert "rerun to resume" in str(e.value) and f":{port}" in str(e.value)
    assert len(logged) == 1 and "retrying" in logged[0]


# ---------------------------------------------------------------------------------------------- outages


def test_a_transient_outage_is_ridden_out(s3_env, s3_url):
    logged: list[str] = []
    store = S3Store(s3_url, retry_seconds=60, log=logged.append)
    store.write_bytes("runs/a/metrics.jsonl", b"before\n")
    s3_env.pause()
    start = time.monotonic()
    resumer = threading.Timer(3.0, s3_env.resume)
    try:
        resumer.start()
        store.write_bytes("runs/a/metrics.jsonl", b"after\n")  # waits (and retries) through the outage
    finally:
        resumer.join()
        s3_env.resume()
    assert time.monotonic() - start >= 2.9
    assert store.read_bytes("runs/a/metrics.jsonl") == b"after\n"
    assert len(logged) <= 1  # at most one warning per operation, however many retries


def _interrupted_put(url: str, declared: int, sent: bytes) -> None:
    """Send a PUT that promises `declared` bytes, deliver only `sent`, and drop the connection."""
    u = urlparse(url)
    head = (
        f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {declared}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        s.sendall(head.encode() + sent)
        time.sleep(0.3)


def test_a_put_is_all_or_nothing(s3_env, s3_url):
    store = open_store(s3_url)
    old, new = b"o" * 200_000, b"n" * 200_000
    store.write_bytes("runs/a/checkpoint.pt", old)
    client = s3_env.client()
    for key, before in (("runs/a/checkpoint.pt", old), ("runs/a/fresh.pt", None)):
        url = client.generate_presigned_url(
            "put_object", Params={"Bucket": store.bucket, "Key": store._key(key)}, ExpiresIn=60
        )
        _interrupted_put(url, len(new), new[: len(new) // 2])
        time.sleep(0.3)
        assert store.read_bytes(key) == before
    assert store.list("runs/a") == ["runs/a/checkpoint.pt"]


# ---------------------------------------------------------------------------------------------- the trainer on S3


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, train_data_dir, one_thread):
    """The metrics of an uninterrupted run of ARGS in a local store."""
    store = tmp_path_factory.mktemp("reference")
    assert main(["train", *ARGS, "--data-dir", str(train_data_dir), "--store", str(store)]) == 0
    (run,) = (store / "runs").iterdir()
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _objects(server, url: str) -> dict[str, tuple]:
    u = urlparse(url)
    resp = server.client().list_objects_v2(Bucket=u.netloc, Prefix=u.path.strip("/") + "/")
    return {o["Key"]: (o["ETag"], o["LastModified"], o["Size"]) for o in resp.get("Contents", [])}


def test_trainer_keeps_the_run_in_s3_and_does_not_train_it_twice(
    s3_env, s3_url, rethink_cmd, one_thread_env, train_data_dir, local_reference, without_timing
):
    s3_server = s3_env
    env = {**one_thread_env, **s3_server.env}
    cmd = [*rethink_cmd, "train", *ARGS, "--data-dir", str(train_data_dir), "--store", s3_url]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    objects = _objects(s3_server, s3_url)
    spec_key = next(k for k in objects if k.endswith("/spec.json"))
    run_dir = spec_key.rsplit("/", 1)[0]
    names = {k.rsplit("/", 1)[1] for k in objects}
    assert {"spec.json", "metrics.jsonl", "checkpoint.pt", "result.json"} <= names
    assert run_dir.endswith(RunSpec.from_json(_get(s3_server, spec_key)).run_id)
    metrics = [json.loads(line) for line in _get(s3_server, f"{run_dir}/metrics.jsonl").splitlines()]
    assert without_timing(metrics) == without_timing(local_reference)
    assert json.loads(_get(s3_server, f"{run_dir}/result.json"))["status"] == "finished"

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "already finished" in second.stdout and "epoch 1/" not in second.stdout
    assert _objects(s3_server, s3_url) == objects


def _get(server, key: str) -> str:
    return server.client().get_object(Bucket=server.bucket, Key=key)["Body"].read().decode()


def test_lasting_outage_mid_run_is_a_clear_error_and_leaves_a_good_checkpoint(
    s3_env, s3_url, rethink_cmd, one_thread_env, train_data_dir, local_reference, without_timing
):
    s3_server = s3_env
    env = {**one_thread_env, **s3_server.env, "RETHINK_S3_RETRY_SECONDS": "3"}
    cmd = [*rethink_cmd, "train", *ARGS, "--data-dir", str(train_data_dir), "--store", s3_url,
           "--checkpoint-minutes", "0.003"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            # Epoch 1's checkpoint is in S3; epoch 2's metrics and checkpoint are being written right now.
            if " epoch 2/" in line:
                break
        s3_server.pause()
        start = time.monotonic()
        out, err = proc.communicate(timeout=120)
        gave_up = time.monotonic() - start
    finally:
        s3_server.resume()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    line = _one_error_line(err)
    assert "unreachable" in line and "rerun to resume" in line and s3_server.endpoint in line
    assert "retrying" in err, err  # it did retry before giving up
    assert gave_up < 60

    # What the outage left behind is a whole, loadable checkpoint of this run.
    store = S3Store(s3_url, retry_seconds=30)
    spec = RunSpec.from_json(next(store.read_text(k) for k in store.list("runs") if k.endswith("spec.json")))
    blob = store.read_bytes(run_key(spec.run_id, "checkpoint.pt"))
    ckpt = torch.load(io.BytesIO(blob), weights_only=True)
    assert ckpt["run_id"] == spec.run_id and ckpt["epoch"] >= 1

    env["RETHINK_S3_RETRY_SECONDS"] = "60"  # the server may need a moment after its pause
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming at epoch" in rerun.stdout and "ignoring unusable" not in rerun.stdout
    assert without_timing(read_metrics(store, spec.run_id)) == without_timing(local_reference)
