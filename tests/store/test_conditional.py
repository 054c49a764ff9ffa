"""One writer per run without a server: the S3 store's conditional PUTs as botocore sends them (Stubber), and the
lease's semantics on an in-process store with the same compare-and-write rule (two trainers race, one wins; an
expired lease is taken over exactly once)."""

from __future__ import annotations

import json

import pytest

from rethink.store.base import Store
from rethink.store.lease import Lease, LeaseLost
from rethink.store.runs import run_key

pytest.importorskip("botocore")


@pytest.fixture
def s3(monkeypatch):
    """An S3Store whose client never leaves the process: every call must be one the Stubber expects."""
    from botocore.stub import Stubber

    from rethink.store.s3 import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-only")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-only")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never reached: the Stubber answers
    store = S3Store("s3://bucket/pre", retry_seconds=0, log=lambda m: None, sleep=lambda s: None)
    with Stubber(store.client) as stub:
        yield store, stub
        stub.assert_no_pending_responses()


def test_creating_an_object_is_a_put_if_none_match(s3):
    store, stub = s3
    stub.add_response("put_object", {"ETag": '"v1"'},
                      {"Bucket": "bucket", "Key": "pre/runs/r/lease.json", "Body": b"a", "IfNoneMatch": "*"})  # fmt: skip
    assert store.write_if("runs/r/lease.json", b"a", None) == '"v1"'


def test_replacing_an_object_is_a_put_if_match_its_version(s3):
    store, stub = s3
    stub.add_response("put_object", {"ETag": '"v2"'},
                      {"Bucket": "bucket", "Key": "pre/runs/r/lease.json", "Body": b"b", "IfMatch": '"v1"'})  # fmt: skip
    assert store.write_if("runs/r/lease.json", b"b", '"v1"') == '"v2"'


@pytest.mark.parametrize("version, condition", [(None, {"IfNoneMatch": "*"}), ('"v1"', {"IfMatch": '"v1"'})])
def test_a_412_is_a_lost_race_not_an_error(s3, version, condition):
    store, stub = s3
    stub.add_client_error("put_object", service_error_code="PreconditionFailed", http_status_code=412,
                          expected_params={"Bucket": "bucket", "Key": "pre/k", "Body": b"c", **condition})  # fmt: skip
    assert store.write_if("k", b"c", version) is None


class MemoryStore(Store):
    """Objects in a dict, each with a generation number; write_if compares and writes in one step (as a
    conditional PUT does). `before_write` runs just before each conditional write: a test's way to let another
    trainer in between a read and a write."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.generation = 0
        self.before_write = None
        self.url = "memory://"

    def read_bytes(self, key):
        return self.objects.get(key, (None, 0))[0]

    def write_bytes(self, key, data):
        self.generation += 1
        self.objects[key] = (bytes(data), self.generation)

    def exists(self, key):
        return key in self.objects

    def list(self, prefix):
        return sorted(k for k in self.objects if k.startswith(prefix))

    def delete(self, key):
        self.objects.pop(key, None)

    def read_versioned(self, key):
        if key not in self.objects:
            return None, None
        data, gen = self.objects[key]
        return data, str(gen)

    def write_if(self, key, data, version):
        hook, self.before_write = self.before_write, None
        if hook is not None:
            hook()
        current = str(self.objects[key][1]) if key in self.objects else None
        if current != version:
            return None
        self.write_bytes(key, data)
        return str(self.generation)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _remote(store, holder: str, clock, ttl=60.0) -> Lease:
    """A lease whose records say another host: only its expiry frees it (no local process check)."""
    lease = Lease(store, "run", ttl=ttl, holder=holder, clock=clock)
    real = lease._record

    def record(expires):
        d = json.loads(real(expires))
        d["host"] = "elsewhere"
        return json.dumps(d).encode()

    lease._record = record
    return lease


def test_of_two_trainers_racing_for_a_free_lease_exactly_one_holds_it():
    store, clock = MemoryStore(), Clock()
    a, b = _remote(store, "a", clock), _remote(store, "b", clock)
    outcome = {}
    # a reads the (absent) lease; before its write lands, b takes the lease from start to end
    store.before_write = lambda: outcome.setdefault("b", b.try_acquire())
    outcome["a"] = a.try_acquire()
    assert outcome["b"] is None  # b holds it
    assert outcome["a"] is not None and outcome["a"]["holder"] == "b"  # a was told who does
    assert json.loads(store.read_bytes(run_key("run", "lease.json")))["holder"] == "b"
    assert a.version is None and b.version is not None
    b.renew(force=True)  # the holder keeps it
    assert a.try_acquire()["holder"] == "b"  # still held: a cannot take it while b renews


def test_an_expired_lease_is_taken_over_once():
    store, clock = MemoryStore(), Clock()
    old = _remote(store, "old", clock)
    assert old.try_acquire() is None
    clock.t += 61  # the holder stopped renewing 61 s ago, its ttl is 60 s
    a, b = _remote(store, "a", clock), _remote(store, "b", clock)
    got = {}
    store.before_write = lambda: got.setdefault("b", b.try_acquire())
    got["a"] = a.try_acquire()
    assert got["b"] is None and got["a"]["holder"] == "b"  # one successor, not two
    with pytest.raises(LeaseLost, match="taken over by b"):
        old.renew(force=True)  # the old holder comes back: it must stop before it writes
    assert a.version is None  # the loser of the race never held it
    b.release()
    assert _remote(store, "c", clock).try_acquire() is None  # given back: free at once


def test_an_unexpired_lease_of_another_host_is_not_taken():
    store, clock = MemoryStore(), Clock()
    old = _remote(store, "old", clock)
    assert old.try_acquire() is None
    clock.t += 59
    assert _remote(store, "new", clock).try_acquire()["holder"] == "old"
    old.renew(force=True)
