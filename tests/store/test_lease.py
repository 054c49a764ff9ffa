"""One writer per run: the lease in the store, against the local store and a real S3 server; two trainers of
one run, exactly one of which trains; a writer that lost its lease stops; and the store's housekeeping."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rethink.data.cifar import load_cifar10
from rethink.spec import RunSpec
from rethink.store import LocalStore, open_store
from rethink.store.lease import Lease, LeaseHeld, LeaseLost
from rethink.store.runs import read_metrics, run_key, run_state
from rethink.training.options import ExecOptions
from rethink.training.trainer import train_run

ARGS = ["--model", "mlp-1x512", "--batch-size", "50", "--epochs", "3", "--device", "cpu"]


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _elsewhere(store, run_id: str, clock, ttl: float = 60.0) -> Lease:
    """A lease held by 'another machine' (a holder this machine cannot check: only expiry frees it)."""
    other = Lease(store, run_id, ttl=ttl, holder="other-host:1:abc", clock=clock)
    assert other.try_acquire() is None
    record = json.loads(store.read_bytes(run_key(run_id, "lease.json")))
    record["host"] = "other-host"
    store.write_bytes(run_key(run_id, "lease.json"), json.dumps(record).encode())
    other.version = store.read_versioned(run_key(run_id, "lease.json"))[1]
    return other


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("s3_env")  # the server's credentials in this process
    return open_store(request.getfixturevalue("s3_url"))


def test_one_holder_at_a_time_until_expiry(store):
    clock = Clock()
    other = _elsewhere(store, "r1", clock)
    mine = Lease(store, "r1", ttl=60.0, clock=clock)
    held = mine.try_acquire()
    assert held is not None and held["holder"] == "other-host:1:abc"  # held: not ours
    clock.t += 61  # the other holder stopped renewing: its lease ran out
    assert mine.try_acquire() is None
    with pytest.raises(LeaseLost, match="taken over by"):  # the old holder comes back: it must stop
        other.renew(force=True)
    mine.renew(force=True)
    mine.release()
    assert json.loads(store.read_bytes(run_key("r1", "lease.json")))["expires"] == 0.0
    assert Lease(store, "r1", clock=clock).try_acquire() is None  # given back: free at once


def test_of_two_racing_for_a_free_lease_exactly_one_gets_it(store):
    clock = Clock()
    a, b = Lease(store, "r2", holder="a:1:x", clock=clock), Lease(store, "r2", holder="b:2:y", clock=clock)
    _, version = a.current()  # both saw the same (absent) lease ...
    assert store.write_if(a.key, a._record(clock() + 60), version) is not None
    assert store.write_if(b.key, b._record(clock() + 60), version) is None  # ... only the first write counts


def test_waiting_for_a_lease_ends_with_one_clear_line(tmp_path):
    store = LocalStore(tmp_path)
    _elsewhere(store, "r3", Clock(1e12))  # far in the future: never expires during the test
    with pytest.raises(LeaseHeld, match=r"run r3 is being trained by other-host:1:abc .*delete .*lease.json"):
        Lease(store, "r3").acquire(wait=0.2, poll=0.05, log=lambda m: None)


def test_a_dead_local_holder_frees_the_run_at_once(tmp_path):
    """A trainer of this machine killed outright: its successor does not wait for the lease to expire."""
    code = ("import sys; from rethink.store import LocalStore; from rethink.store.lease import Lease; "
            f"Lease(LocalStore({str(tmp_path)!r}), 'r4', ttl=3600).try_acquire()")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)  # takes the lease, exits without giving it back
    record = json.loads(LocalStore(tmp_path).read_bytes(run_key("r4", "lease.json")))
    assert record["expires"] > record["renewed"] + 3000  # still valid for an hour ...
    assert Lease(LocalStore(tmp_path), "r4").try_acquire() is None  # ... yet its holder is gone


# ---------------------------------------------------------------------------------------------- trainers


def _train_cmd(data_dir, store_url):
    return [sys.executable, "-m", "rethink", "train", *ARGS, "--data-dir", str(data_dir), "--store", store_url]


# The first trainer pauses after its first checkpoint until the test lets it go: the second one is started
# while it holds the run, whatever the machine's speed.
_PAUSE_AFTER_FIRST_CHECKPOINT = """
import pathlib, sys, time
import rethink.training.trainer as train
from rethink.cli import main

gate, argv = pathlib.Path(sys.argv[1]), sys.argv[2:]
save = train.save_checkpoint

def save_then_pause(*a, **k):
    save(*a, **k)
    if not (gate / "go").exists():
        (gate / "paused").touch()
        while not (gate / "go").exists():
            time.sleep(0.05)

train.save_checkpoint = save_then_pause
sys.exit(main(argv))
"""


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    import time

    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_trainers_of_one_run_train_it_once(kind, train_data_dir, tmp_path, one_thread_env, request,
                                               without_timing):  # fmt: skip
    env = dict(one_thread_env)
    if kind == "local":
        url = str(tmp_path / "store")
    else:
        env.update(request.getfixturevalue("s3_env").env)
        url = request.getfixturevalue("s3_url")
    gate = tmp_path / "gate"
    gate.mkdir()
    cmd = _train_cmd(train_data_dir, url)
    first = subprocess.Popen([sys.executable, "-c", _PAUSE_AFTER_FIRST_CHECKPOINT, str(gate), *cmd[3:]], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for(lambda: (gate / "paused").exists() or first.poll() is not None, "the first trainer's checkpoint")
    second = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    waiting = second.stdout.readline() + second.stdout.readline()  # its run line, then (it must) its wait
    (gate / "go").touch()
    outs = [first.communicate(timeout=300)[0], waiting + second.communicate(timeout=300)[0]]
    assert [first.returncode, second.returncode] == [0, 0], outs
    assert "waiting for" in outs[1] and "which holds its lease" in outs[1], outs[1]
    assert "epoch 1/3" in outs[0] and "epoch 1/3" not in outs[1]  # exactly one trained ...
    assert "finished by another trainer" in outs[1]  # ... and the other found its result
    spec = RunSpec(model="mlp-1x512", batch_size=50, epochs=3, dataset=load_cifar10(train_data_dir).identity)
    lone = tmp_path / "lone"
    subprocess.run(cmd[:-1] + [str(lone)], env=one_thread_env, check=True, capture_output=True)
    assert without_timing(read_metrics(open_store(url) if kind == "s3" else LocalStore(url), spec.run_id)) == \
        without_timing(read_metrics(LocalStore(lone), spec.run_id))  # fmt: skip


def test_a_trainer_that_lost_its_lease_stops_before_it_writes(train_data_dir, tmp_path, monkeypatch, one_thread):
    import rethink.training.trainer as trainer

    store = LocalStore(tmp_path)
    data = load_cifar10(train_data_dir)
    spec = RunSpec(model="mlp-1x512", batch_size=50, epochs=3, dataset=data.identity)
    real = trainer.save_checkpoint
    writes = []

    def save_then_steal(*a, **k):
        real(*a, **k)
        writes.append(1)
        if len(writes) == 1:  # after the first checkpoint, another machine takes the run over
            lease = json.loads(store.read_bytes(run_key(spec.run_id, "lease.json")))
            lease.update(holder="thief:9:zz", host="thief")
            store.write_bytes(run_key(spec.run_id, "lease.json"), json.dumps(lease).encode())

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_steal)
    with pytest.raises(LeaseLost, match="taken over by thief:9:zz"):
        train_run(spec, store, data, ExecOptions(device="cpu", log=lambda m: None))
    assert len(writes) == 1  # nothing written after the theft was noticed
    assert len(read_metrics(store, spec.run_id)) == 1 and not run_state(store, spec).finished


def test_the_runner_skips_a_run_another_trainer_holds(train_data_dir, tmp_path, one_thread):
    from rethink.runner import DataSource, run_specs

    ds = load_cifar10(train_data_dir).identity
    specs = [RunSpec(model="mlp-1x512", batch_size=100, epochs=1, dataset=ds, seed=s) for s in (0, 1)]
    store = LocalStore(tmp_path)
    _elsewhere(store, specs[0].run_id, Clock(1e12))
    outcome = run_specs(specs, str(tmp_path), DataSource(str(train_data_dir)), ExecOptions(device="cpu", log=lambda m: None))
    assert outcome == {} and outcome.elsewhere == [specs[0].run_id] and outcome.trained == [specs[1].run_id]
    assert run_state(store, specs[0]).state == "not started"  # not failed: someone else's


# ---------------------------------------------------------------------------------------------- housekeeping


@pytest.mark.parametrize("keep, left", [("all", {"checkpoint.pt", "checkpoint.prev.pt"}), ("last", {"checkpoint.pt"}),
                                        ("none", set())])  # fmt: skip
def test_a_finished_run_keeps_the_checkpoints_asked_for(keep, left, train_data_dir, tmp_path, one_thread):
    store = LocalStore(tmp_path)
    data = load_cifar10(train_data_dir)
    spec = RunSpec(model="mlp-1x512", batch_size=100, epochs=3, dataset=data.identity)
    stale = tmp_path / "runs" / spec.run_id / ".metrics.jsonl.k1ll3d.tmp"  # what a killed write leaves
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    train_run(spec, store, data, ExecOptions(device="cpu", keep_checkpoints=keep, log=lambda m: None))
    names = {p.name for p in (tmp_path / "runs" / spec.run_id).iterdir()}
    assert {n for n in names if n.startswith("checkpoint")} == left
    assert not stale.exists()  # swept when the run started


def test_status_shows_the_stores_size(train_data_dir, tmp_path, capsys):
    from rethink.cli import main

    args = ["--store", str(tmp_path / "s"), "--data-dir", str(train_data_dir)]
    assert main(["train", *ARGS[:4], "--epochs", "1", "--device", "cpu", *args]) == 0
    capsys.readouterr()
    assert main(["status", "--suite", "fig2b", *args]) == 0
    objects, size = LocalStore(tmp_path / "s").usage()
    assert f"{objects} files, {size / 2**20:.1f} MiB" in capsys.readouterr().out
