"""The S3 backend against a real S3 server on 127.0.0.1 (SeaweedFS `weed mini`, started by conftest).

Credentials, retries through a transient outage, a clear error after a lasting one (with a good checkpoint left
behind), all-or-nothing PUTs, and the trainer keeping a whole run in s3://bucket/prefix. Each fault test first
asserts that its fault happened where intended (a refused request, a retry warning, the checkpoint's position);
retries are counted through the store's injected clock and sleep, never timed.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import pytest
import torch

from rethink.cli import main
from rethink.spec import RunSpec
from rethink.store import S3Store, StoreError, open_store
from rethink.store.runs import read_metrics, run_key

ARGS = ["--model", "mlp-1x512", "--batch-size", "32", "--epochs", "3", "--device", "cpu"]


class Waits:
    """An S3Store's clock and sleep for a test: time passes only by the waits the store asks for, recorded, not slept.

    Retries are then counted, not timed: the store's whole retry budget passes in no time, and how often it
    waited (and for how long, by its own clock) is exact.
    """

    def __init__(self):
        self.slept: list[float] = []

    def clock(self) -> float:
        return sum(self.slept)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def store(self, url: str, retry_seconds: float | None = None, log=None) -> S3Store:
        # One botocore attempt per call: what is counted is the store's own deadline layer on top of botocore.
        return S3Store(url, retry_seconds=retry_seconds, log=log, clock=self.clock, sleep=self.sleep, attempts=1)


def _requests(store: S3Store) -> list[str]:
    """The HTTP requests `store` sends from now on (one per attempt: botocore itself never retries here)."""
    sent: list[str] = []
    store.client.meta.events.register("before-send", lambda request, **kw: sent.append(request.method))
    return sent


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("rethink: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_fail_fast_and_say_so(variable, s3_env, s3_url, monkeypatch):
    monkeypatch.setenv(variable, "wrong")
    waits, logged = Waits(), []
    store = waits.store(s3_url, retry_seconds=60, log=logged.append)
    sent = _requests(store)
    with pytest.raises(StoreError, match="credentials") as e:
        store.write_text("runs/x/spec.json", "{}")
    assert "AWS_SECRET_ACCESS_KEY" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StoreError, match="credentials"):
        store.read_bytes("runs/x/spec.json")
    # The server did refuse (one request each), and a refusal is final: no wait, no second attempt, no warning.
    assert sent == ["PUT", "GET"] and waits.slept == [] and logged == []


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
    waits, logged = Waits(), []
    store = waits.store("s3://rethink-test/x", retry_seconds=30, log=logged.append)
    sent = _requests(store)
    with pytest.raises(StoreError, match="unreachable") as e:
        store.write_bytes("runs/a/checkpoint.pt", b"x")
    assert "rerun to resume" in str(e.value) and f":{port}" in str(e.value)
    assert "gave up after 30s" in str(e.value)
    # Every attempt failed, each wait was followed by another attempt, and the last one came at the deadline.
    assert len(sent) == len(waits.slept) + 1 and set(sent) == {"PUT"}
    assert sum(waits.slept) == pytest.approx(30)
    # Exponential backoff with jitter: 0.2 s doubling up to 10 s, each drawn from half to one and a half times.
    for i, wait in enumerate(waits.slept[:-1]):
        assert 0.5 * min(0.2 * 2**i, 10) <= wait <= 1.5 * min(0.2 * 2**i, 10), (i, waits.slept)
    assert len(sent) >= 6
    assert len(logged) == 1 and "retrying for up to 30s" in logged[0]  # one warning, however many retries


# ---------------------------------------------------------------------------------------------- outages


def test_a_transient_outage_is_ridden_out(s3_env, s3_url):
    logged: list[str] = []

    def log(msg: str) -> None:  # the first retry's warning: the outage has been seen, so it ends now
        logged.append(msg)
        s3_env.resume()

    waits = Waits()
    # retry_seconds 6: each attempt times out after 1 s (a frozen server accepts connections, then is silent).
    store = waits.store(s3_url, retry_seconds=6, log=log)
    store.write_bytes("runs/a/metrics.jsonl", b"before\n")
    sent = _requests(store)
    s3_env.pause()
    try:
        store.write_bytes("runs/a/metrics.jsonl", b"after\n")  # waits (and retries) through the outage
    finally:
        s3_env.resume()
    assert len(logged) == 1 and "retrying" in logged[0] and "PUT runs/a/metrics.jsonl" in logged[0]
    assert len(sent) == len(waits.slept) + 1 >= 2  # the first attempt failed; a retry got through
    assert store.read_bytes("runs/a/metrics.jsonl") == b"after\n"


def _raw_put(url: str, body: bytes, declared: int, wait: float) -> bytes:
    """PUT `body` to a presigned URL, promising `declared` bytes; what the server answered within `wait` seconds,
    then hang up."""
    u = urlparse(url)
    head = (
        f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {declared}\r\n\r\n"
    )  # no Content-Type: the URL was signed without one, and the signature covers that header
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        s.sendall(head.encode() + body)
        s.settimeout(wait)
        try:
            return s.recv(4096)
        except TimeoutError:
            return b""


def test_a_put_is_all_or_nothing(s3_env, s3_url):
    store = open_store(s3_url)
    old, new = b"o" * 200_000, b"n" * 200_000
    store.write_bytes("runs/a/checkpoint.pt", old)
    client = s3_env.client()

    def presigned(key: str) -> str:
        return client.generate_presigned_url(
            "put_object", Params={"Bucket": store.bucket, "Key": store._key(key)}, ExpiresIn=60
        )

    # The same request, whole, is accepted: what follows fails only because its body is cut.
    assert _raw_put(presigned("runs/a/whole.pt"), new, len(new), wait=5).startswith(b"HTTP/1.1 200")
    assert store.read_bytes("runs/a/whole.pt") == new
    for key, before in (("runs/a/checkpoint.pt", old), ("runs/a/fresh.pt", None)):
        # Half the body, then the connection drops: the server was still waiting for the rest (no answer yet).
        assert _raw_put(presigned(key), new[: len(new) // 2], len(new), wait=0.5) == b""
        time.sleep(0.3)  # let the server notice the dropped connection (and get the chance to do it wrong)
        assert store.read_bytes(key) == before
    assert store.list("runs/a") == ["runs/a/checkpoint.pt", "runs/a/whole.pt"]


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


# A `rethink train` that freezes the S3 server (SIGSTOP to its pid) right after writing epoch 1's checkpoint.
_FREEZE_AFTER_EPOCH_1 = """
import os, signal, sys
import rethink.training.trainer as train
from rethink.cli import main

server_pid, argv = int(sys.argv[1]), sys.argv[2:]
save = train.save_checkpoint

def save_then_freeze(store, run_id, state, rotate=True):
    save(store, run_id, state, rotate)
    if (state["epoch"], state["batch"]) == (1, 0):
        print("test: epoch 1's checkpoint is written; freezing S3", flush=True)
        os.kill(server_pid, signal.SIGSTOP)

train.save_checkpoint = save_then_freeze
sys.exit(main(argv))
"""


def test_lasting_outage_mid_run_is_a_clear_error_and_leaves_a_good_checkpoint(
    s3_env, s3_url, rethink_cmd, one_thread_env, train_data_dir, local_reference, without_timing
):
    s3_server = s3_env
    env = {**one_thread_env, **s3_server.env, "RETHINK_S3_RETRY_SECONDS": "3"}
    args = ["train", *ARGS, "--data-dir", str(train_data_dir), "--store", s3_url]
    cmd = [sys.executable, "-c", _FREEZE_AFTER_EPOCH_1, str(s3_server.proc.pid), *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    finally:
        s3_server.resume()
    # The outage began where intended (after epoch 1's checkpoint), and the run retried before giving up.
    assert "freezing S3" in out.stdout and " epoch 1/3" in out.stdout, out.stdout
    assert "retrying for up to 3s" in out.stderr, out.stderr
    assert out.returncode == 3, out.stderr
    line = _one_error_line(out.stderr)
    assert "unreachable" in line and "rerun to resume" in line and s3_server.endpoint in line

    # What the outage left behind is epoch 1's whole, loadable checkpoint of this run.
    store = S3Store(s3_url, retry_seconds=30)
    spec = RunSpec.from_json(next(store.read_text(k) for k in store.list("runs") if k.endswith("spec.json")))
    blob = store.read_bytes(run_key(spec.run_id, "checkpoint.pt"))
    ckpt = torch.load(io.BytesIO(blob), weights_only=True)
    assert (ckpt["run_id"], ckpt["epoch"], ckpt["batch"]) == (spec.run_id, 1, 0)

    env["RETHINK_S3_RETRY_SECONDS"] = "60"  # the server may need a moment after its pause
    rerun = subprocess.run([*rethink_cmd, *args], capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming at epoch 2, batch 0" in rerun.stdout and "ignoring unusable" not in rerun.stdout
    assert without_timing(read_metrics(store, spec.run_id)) == without_timing(local_reference)
