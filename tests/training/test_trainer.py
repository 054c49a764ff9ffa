"""The resumable trainer: killed or stopped mid-epoch and started again, a run ends with the metrics of an uninterrupted one.

Runs are tiny (MLP 1x512 on 600 synthetic images, CPU). Comparisons cover every metric except the timing fields.
Signals come from a hook right after the n-th checkpoint write, so they land at the same position on any machine;
each test asserts that position (and the resume from it) before it compares metrics.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rethink.training.trainer as train
from rethink.cli import main
from rethink.data.cifar import load_cifar10
from rethink.models import build_model
from rethink.spec import RunSpec
from rethink.store import LocalStore
from rethink.store.runs import DamagedRecord, read_metrics, read_result, run_key, run_state
from rethink.training.loop import Preempted
from rethink.training.options import ExecOptions
from rethink.training.trainer import train_run

BASE = ["--model", "mlp-1x512", "--batch-size", "32", "--epochs", "3", "--device", "cpu"]
REGULARIZED = ["--model", "mlp-1x512", "--batch-size", "48", "--epochs", "3", "--device", "cpu",
               "--dropout", "0.3", "--random-crop", "--labels", "partial:0.4"]  # fmt: skip
EVERY_BATCH = ["--checkpoint-minutes", "0"]  # a checkpoint after every batch: n-th checkpoint, fixed position


def _train_cmd(rethink_cmd, data_dir, store, args) -> list[str]:
    return [*rethink_cmd, "train", *args, "--data-dir", str(data_dir), "--store", str(store)]


def _run(cmd, env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _run_dir(store: Path) -> Path:
    (run,) = (store / "runs").iterdir()
    return run


def _metrics(store: Path) -> list[dict]:
    return [json.loads(line) for line in (_run_dir(store) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_data_dir, one_thread):
    """Uninterrupted runs (no mid-epoch checkpoints), keyed by their argument lists.

    They run in this process: a resumed run continues in another process anyway, so identical numbers
    across processes are part of what the tests check.
    """
    done: dict[tuple, Path] = {}

    def get(args: list[str]) -> Path:
        if tuple(args) not in done:
            store = tmp_path_factory.mktemp("reference")
            assert main(["train", *args, "--data-dir", str(train_data_dir), "--store", str(store)]) == 0
            done[tuple(args)] = store
        return done[tuple(args)]

    return get


# `rethink train ARGV` that sends itself SIG right after its AFTER-th checkpoint write (as tests/training/test_packed.py does):
# the signal lands at a position fixed by the arguments, not by the speed of the machine.
_SIGNAL_AFTER = """
import os, signal, sys
import rethink.training.trainer as train
from rethink.cli import main

sig, after, argv = getattr(signal, sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
save, calls = train.save_checkpoint, []

def save_then_signal(store, run_id, state, rotate=True):
    save(store, run_id, state, rotate)
    calls.append(1)
    if len(calls) == after:
        print(f"test: {sys.argv[1]} after checkpoint {after} (epoch {state['epoch']}, batch {state['batch']})",
              flush=True)
        os.kill(os.getpid(), sig)

train.save_checkpoint = save_then_signal
sys.exit(main(argv))
"""


def _signalled(sig: str, after: int, args: list[str], env) -> subprocess.CompletedProcess:
    """`rethink train ARGS`, signalled with `sig` right after its `after`-th checkpoint."""
    return _run([sys.executable, "-c", _SIGNAL_AFTER, sig, str(after), "train", *args], env)


def _position(store: Path) -> tuple[int, int]:
    """(epoch, batch) of the run's checkpoint.pt."""
    ckpt = torch.load(next(store.glob("runs/*/checkpoint.pt")), weights_only=True)
    return int(ckpt["epoch"]), int(ckpt["batch"])


@pytest.mark.parametrize(
    "args, kills",
    # 600 images: 19 batches of 32 (19 checkpoints an epoch), 13 of 48. The second kill of the regularized run
    # counts from its resume at (0, 5): 7 more in epoch 1, its end, then 9 into epoch 2.
    [(BASE, [(7, (0, 7))]), (REGULARIZED, [(5, (0, 5)), (17, (1, 9))])],
    ids=["plain", "dropout-crop-labels"],
)
def test_sigkill_mid_epoch_then_resume_gives_identical_metrics(
    args, kills, reference, rethink_cmd, one_thread_env, train_data_dir, tmp_path, without_timing
):
    store = tmp_path / "store"
    where = ["--data-dir", str(train_data_dir), "--store", str(store)]
    for after, (epoch, batch) in kills:
        killed = _signalled("SIGKILL", after, [*args, *where, *EVERY_BATCH], one_thread_env)
        # The kill happened, right after the intended checkpoint: mid-epoch, with the run unfinished.
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert f"SIGKILL after checkpoint {after} (epoch {epoch}, batch {batch})" in killed.stdout, killed.stdout
        assert _position(store) == (epoch, batch) and batch > 0
        assert not (_run_dir(store) / "result.json").exists()
    out = _run(_train_cmd(rethink_cmd, train_data_dir, store, args), one_thread_env)
    assert out.returncode == 0, out.stderr
    assert f"resuming at epoch {epoch + 1}, batch {batch} (step " in out.stdout, out.stdout
    assert without_timing(_metrics(store)) == without_timing(_metrics(reference(args)))
    result = json.loads((_run_dir(store) / "result.json").read_text())
    expected = json.loads((_run_dir(reference(args)) / "result.json").read_text())
    for field in ("run_id", "spec", "epochs", "steps", "final_train_acc", "final_test_acc", "best_test_acc"):
        assert result[field] == expected[field], field
    assert "Traceback" not in out.stderr


def test_sigterm_checkpoints_and_exits_143_then_the_run_completes_identically(
    reference, rethink_cmd, one_thread_env, train_data_dir, tmp_path, without_timing
):
    store = tmp_path / "store"
    args = [*REGULARIZED, "--data-dir", str(train_data_dir), "--store", str(store)]
    # Default checkpoint interval: checkpoint 1 is epoch 1's end, and the only mid-epoch one is SIGTERM's.
    proc = _signalled("SIGTERM", 1, args, one_thread_env)
    assert "SIGTERM after checkpoint 1 (epoch 1, batch 0)" in proc.stdout, proc.stdout
    assert proc.returncode == 143, proc.stderr
    assert "SIGTERM" in proc.stderr and "checkpoint written after batch 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (_run_dir(store) / "result.json").exists()
    # It stopped at the first step boundary after the signal: one batch into epoch 2.
    assert _position(store) == (1, 1)
    resumed = _run([*rethink_cmd, "train", *args], one_thread_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 2, batch 1 (step " in resumed.stdout
    assert without_timing(_metrics(store)) == without_timing(_metrics(reference(REGULARIZED)))


def test_a_finished_run_is_not_trained_again(reference, train_data_dir, capsys):
    store = reference(BASE)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", *BASE, "--data-dir", str(train_data_dir), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "epoch 1/" not in out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file()} == files


def test_store_layout_and_file_modes(reference):
    run = _run_dir(reference(BASE))
    names = {p.name for p in run.iterdir()}
    assert {"spec.json", "metrics.jsonl", "checkpoint.pt", "result.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    spec = RunSpec.from_json((run / "spec.json").read_text())
    assert spec.run_id == run.name
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["stopped"] == "cap" and result["epochs"] == 3
    assert result["spec"] == spec.to_dict()
    # The run's records: spec.json first, result.json last (the lease, a coordination file, comes before and is
    # given back after them).
    written = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if "lease" not in p.name}
    assert written["spec.json"] == min(written.values())  # spec.json first ...
    assert written["result.json"] == max(written.values())  # ... result.json last
    lease = json.loads((run / "lease.json").read_text())
    assert lease["expires"] == 0.0  # given back
    umask = os.umask(0)
    os.umask(umask)
    for p in run.iterdir():  # written through temp files, yet readable like any file this user creates
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


# ---------------------------------------------------------------------------------------------- in-process runs


class Crash(Exception):
    pass


def _crash_at(epoch: int, lines: list[str]):
    """A log that records lines and crashes the run when epoch `epoch` ends, before it is checkpointed."""

    def log(msg: str) -> None:
        lines.append(msg)
        if f" epoch {epoch}/" in msg:
            raise Crash(msg)

    return log


SPEC_ARGS = dict(model="mlp-1x512", batch_size=32, epochs=4, dropout=0.3)


@pytest.fixture(scope="module")
def data(train_data_dir):
    return load_cifar10(train_data_dir, download=False)


@pytest.fixture(scope="module")
def spec(data):
    return RunSpec(**SPEC_ARGS, dataset=data.identity)


@pytest.fixture(scope="module")
def uninterrupted(spec, data, tmp_path_factory, one_thread):
    store = LocalStore(tmp_path_factory.mktemp("uninterrupted"))
    train_run(spec, store, data, ExecOptions(device="cpu", log=lambda m: None))
    return read_metrics(store, spec.run_id)


def _crash(root: Path, spec, data) -> LocalStore:
    """`spec` in a store at `root`, crashed at the end of epoch 3: checkpoint.pt is epoch 2, prev is epoch 1."""
    store = LocalStore(root)
    with pytest.raises(Crash):
        train_run(spec, store, data, ExecOptions(device="cpu", log=_crash_at(3, [])))
    return store


@pytest.fixture(scope="module")
def crashed(spec, data, tmp_path_factory, one_thread) -> Path:
    return _crash(tmp_path_factory.mktemp("crashed") / "store", spec, data).root


@pytest.fixture
def crashed_store(crashed, tmp_path) -> LocalStore:
    """A private copy of the crashed store."""
    shutil.copytree(crashed, tmp_path / "store")
    return LocalStore(tmp_path / "store")


def _finish(store, spec, data) -> list[str]:
    lines: list[str] = []
    train_run(spec, store, data, ExecOptions(device="cpu", log=lines.append))
    return lines


def _checkpoint_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_learning_on_synthetic_data(uninterrupted):
    accs = [m["train_acc"] for m in uninterrupted]
    assert accs[-1] > 0.5 and accs[-1] > accs[0]  # chance is 0.1
    assert uninterrupted[-1]["train_loss"] < uninterrupted[0]["train_loss"]


def test_each_epoch_draws_a_new_order_and_new_crops(spec, data, tmp_path, monkeypatch, one_thread):
    """SGD sees every image once an epoch, in a new order each epoch (and per seed), with new random crops."""
    seen: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
    batch_inputs = train.batch_inputs

    def record(dd, idx, offsets, channels_last):
        seen.append((len(seen), idx.clone(), None if offsets is None else offsets.clone()))
        return batch_inputs(dd, idx, offsets, channels_last)

    monkeypatch.setattr(train, "batch_inputs", record)
    orders, crops = {}, {}
    for seed in (0, 1):
        s = spec.replace(epochs=2, seed=seed, random_crop=True, dropout=0.0)
        seen.clear()
        train_run(s, LocalStore(tmp_path / f"seed{seed}"), data, ExecOptions(device="cpu", log=lambda m: None))
        n_batches = len(seen) // 2
        for epoch in (0, 1):
            batches = seen[epoch * n_batches : (epoch + 1) * n_batches]
            orders[seed, epoch] = torch.cat([idx for _, idx, _ in batches])
            crops[seed, epoch] = batches[0][2]
            assert sorted(orders[seed, epoch].tolist()) == list(range(len(data.train_y)))  # each image once
    n = len(data.train_y)
    for a, b in [((0, 0), (0, 1)), ((0, 0), (1, 0)), ((1, 0), (1, 1))]:
        assert (orders[a] != orders[b]).float().mean() > 0.9, (a, b)
        assert (crops[a] != crops[b]).any(dim=1).float().mean() > 0.5, (a, b)
    for c in crops.values():  # every one of the 5 x 5 windows of a 32x32 image is drawn
        assert c.shape == (n, 2) and set(c[:, 0].tolist()) == set(c[:, 1].tolist()) == set(range(5))


def test_metrics_are_the_models_accuracy_in_evaluation_mode(spec, data, tmp_path, one_thread):
    """An epoch's accuracies are those of its weights on the whole (corrupted) training set and the test set,
    evaluated without dropout: recomputed here from the checkpoint written at that epoch's end."""
    s = spec.replace(epochs=2, labels="partial:0.5")  # dropout 0.3: training mode would give other numbers
    store = LocalStore(tmp_path)
    train_run(s, store, data, ExecOptions(device="cpu", onednn=False, log=lambda m: None))
    first = read_metrics(store, s.run_id)[0]
    ckpt = torch.load(io.BytesIO(store.read_bytes(run_key(s.run_id, "checkpoint.pt"))), weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 0)  # epoch 1's end: the weights `first` was measured on
    model = build_model(s.model, dropout=s.dropout)
    model.load_state_dict(ckpt["model"])
    model.eval()
    dd = train.prepare_data(s, data, torch.device("cpu"))
    assert (dd.train_y.numpy() != data.train_y).mean() > 0.3  # the corrupted labels are the ones measured
    with torch.no_grad():
        for x, y, acc, loss in ((dd.train_pre, dd.train_y, "train_acc", "train_eval_loss"),
                                (dd.test_pre, dd.test_y, "test_acc", "test_loss")):  # fmt: skip
            out = model(x)
            assert first[acc] == pytest.approx((out.argmax(1) == y).double().mean().item(), abs=1.01 / len(y)), acc
            assert first[loss] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-4), loss


def test_in_process_resume_matches(spec, data, uninterrupted, crashed_store, without_timing):
    store = crashed_store
    lines = _finish(store, spec, data)
    assert any("resuming at epoch 3, batch 0" in line for line in lines), lines
    assert without_timing(read_metrics(store, spec.run_id)) == without_timing(uninterrupted)


def test_a_run_resumed_where_it_trained_records_one_environment(spec, data, crashed_store):
    _finish(crashed_store, spec, data)
    result = read_result(crashed_store, spec.run_id)
    assert "environments" not in result  # one environment: nothing more to say than `environment`
    assert result["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_run_resumed_elsewhere_records_both_environments_and_warns(spec, data, uninterrupted, crashed_store):
    """A resume under another thread count (or CPU, or commit) is named in the log and kept in the result:
    its later epochs come from another environment than its first ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        lines = _finish(crashed_store, spec, data)
    finally:
        torch.set_num_threads(before)
    warning = next(line for line in lines if line.startswith("warning:") and "resumes on" in line)
    assert f"threads={before}" in warning and f"threads={before + 1}" in warning, warning
    result = read_result(crashed_store, spec.run_id)
    first, second = result["environments"]
    assert (first["from_step"], first["threads"]) == (0, before)
    assert (second["from_step"], second["threads"]) == (uninterrupted[1]["step"], before + 1)  # resumed at epoch 3
    assert {k: v for k, v in second.items() if k != "from_step"} == result["environment"]
    assert [m["epoch"] for m in read_metrics(crashed_store, spec.run_id)] == [1, 2, 3, 4]


def test_a_checkpoint_from_before_environments_were_recorded_still_resumes(spec, data, crashed_store):
    key = run_key(spec.run_id, "checkpoint.pt")
    old = torch.load(io.BytesIO(crashed_store.read_bytes(key)), weights_only=True)
    del old["environments"]
    crashed_store.write_bytes(key, _checkpoint_bytes(old))
    lines = _finish(crashed_store, spec, data)
    assert any("resuming at epoch 3, batch 0" in line for line in lines), lines
    first, second = read_result(crashed_store, spec.run_id)["environments"]
    assert first == {"from_step": 0, "device": "cpu", "threads": torch.get_num_threads()}  # all it recorded
    assert second["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


BAD_CHECKPOINTS = {
    "truncated": lambda blob, other: blob[: len(blob) // 2],
    "garbage": lambda blob, other: os.urandom(4096),
    "empty": lambda blob, other: b"",
    "another run's": lambda blob, other: other,
    "not a checkpoint": lambda blob, other: _checkpoint_bytes({"model": {}, "epoch": 2}),
    "inconsistent": lambda blob, other: _checkpoint_bytes(
        {**torch.load(io.BytesIO(blob), weights_only=True), "epoch": 9}
    ),
}


@pytest.fixture(scope="module")
def other_checkpoint(data, tmp_path_factory) -> bytes:
    other = RunSpec(**{**SPEC_ARGS, "seed": 1}, dataset=data.identity)
    return _crash(tmp_path_factory.mktemp("other"), other, data).read_bytes(
        run_key(other.run_id, "checkpoint.pt")
    )


@pytest.mark.parametrize("damage", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_falls_back_to_the_previous_one(
    damage, spec, data, uninterrupted, other_checkpoint, crashed_store, without_timing
):
    store = crashed_store
    key = run_key(spec.run_id, "checkpoint.pt")
    store.write_bytes(key, BAD_CHECKPOINTS[damage](store.read_bytes(key), other_checkpoint))
    lines = _finish(store, spec, data)
    assert any("ignoring unusable" in line and line.count("checkpoint.pt") == 1 for line in lines), lines
    assert any("resuming at epoch 2, batch 0" in line for line in lines), lines
    assert without_timing(read_metrics(store, spec.run_id)) == without_timing(uninterrupted)


def test_both_checkpoints_bad_starts_over(
    spec, data, uninterrupted, other_checkpoint, crashed_store, without_timing
):
    store = crashed_store
    store.write_bytes(run_key(spec.run_id, "checkpoint.pt"), b"\x80\x02garbage")
    store.write_bytes(run_key(spec.run_id, "checkpoint.prev.pt"), other_checkpoint)
    lines = _finish(store, spec, data)
    assert sum("ignoring unusable" in line for line in lines) == 2, lines
    assert any("starting over" in line for line in lines), lines
    assert without_timing(read_metrics(store, spec.run_id)) == without_timing(uninterrupted)


def test_a_bad_checkpoint_never_replaces_the_good_previous_one(spec, data, crashed_store):
    store = crashed_store
    store.write_bytes(run_key(spec.run_id, "checkpoint.pt"), b"garbage")
    # Resume from prev (epoch 1), write epoch 2's checkpoint, crash again when epoch 3 ends.
    with pytest.raises(Crash):
        train_run(spec, store, data, ExecOptions(device="cpu", log=_crash_at(3, [])))
    for name, epoch in (("checkpoint.pt", 2), ("checkpoint.prev.pt", 1)):
        ckpt = torch.load(io.BytesIO(store.read_bytes(run_key(spec.run_id, name))), weights_only=True)
        assert (ckpt["epoch"], ckpt["batch"]) == (epoch, 0), name


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_code_is_refused_without_running_it(spec, data, crashed_store, tmp_path):
    store = crashed_store
    marker = tmp_path / "pwned"
    store.write_bytes(run_key(spec.run_id, "checkpoint.pt"), pickle.dumps({"format": _Evil(marker)}))
    lines = _finish(store, spec, data)
    assert any("ignoring unusable" in line for line in lines)
    assert not marker.exists()


def test_damaged_result_is_finished_again(spec, data, uninterrupted, tmp_path, without_timing, one_thread):
    store = LocalStore(tmp_path / "store")
    train_run(spec, store, data, ExecOptions(device="cpu", log=lambda m: None))
    store.write_text(run_key(spec.run_id, "result.json"), '{"status": "fini')
    assert run_state(store, spec).state == "damaged"
    with pytest.raises(DamagedRecord, match="result.json is damaged"):
        read_result(store, spec.run_id)
    lines = _finish(store, spec, data)
    assert any("result.json is damaged" in line for line in lines), lines
    assert read_result(store, spec.run_id)["status"] == "finished"
    assert without_timing(read_metrics(store, spec.run_id)) == without_timing(uninterrupted)


def test_sigterm_during_setup_stops_at_the_first_step(
    spec, data, uninterrupted, crashed_store, without_timing
):
    def log(msg: str) -> None:
        if "resuming at" in msg:  # still setting up: the loop has not started
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        train_run(spec, crashed_store, data, ExecOptions(device="cpu", log=log))
    ckpt = torch.load(
        io.BytesIO(crashed_store.read_bytes(run_key(spec.run_id, "checkpoint.pt"))), weights_only=True
    )
    assert (ckpt["epoch"], ckpt["batch"]) == (2, 1)
    lines = _finish(crashed_store, spec, data)
    assert any("resuming at epoch 3, batch 1" in line for line in lines), lines
    assert without_timing(read_metrics(crashed_store, spec.run_id)) == without_timing(uninterrupted)
