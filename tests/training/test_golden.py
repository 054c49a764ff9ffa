"""Golden per-epoch metrics of a few tiny synthetic runs, from the engine as it stands: a change to the engine
must reproduce them exactly (single runs bit for bit on the CPU, one thread). A golden is re-made only in a
commit that says why:

    RETHINK_REGENERATE_GOLDEN=1 python -m pytest -q tests/training/test_golden.py
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from rethink.data.cifar import load_cifar10
from rethink.spec import RunSpec
from rethink.store import LocalStore
from rethink.store.runs import read_metrics
from rethink.training.loop import Preempted
from rethink.training.options import ExecOptions

GOLDEN = Path(__file__).with_name("golden_metrics.json")
REGENERATE = os.environ.get("RETHINK_REGENERATE_GOLDEN") == "1"
TIMING = {"epoch_seconds", "train_seconds", "eval_seconds", "images_per_second"}


def _spec(data, model: str, **kw) -> RunSpec:
    base = dict(dataset=data.identity, epochs=2, batch_size=32, train_subset=128, test_subset=64)
    return RunSpec(model=model, **{**base, **kw})


CASES = {
    "mlp": dict(model="mlp-1x512"),
    "alexnet": dict(model="alexnet", weight_decay=5e-4),
    "inception-bn": dict(model="inception", train_subset=64, test_subset=32),
    "mlp-dropout-crop-partial": dict(model="mlp-3x512", dropout=0.5, random_crop=True, labels="partial:0.4"),
}


def _quiet(**kw) -> ExecOptions:
    return ExecOptions(device="cpu", progress=False, log=lambda m: None, **kw)


def _numbers(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


@pytest.fixture(scope="module")
def data(train_data_dir):
    return load_cifar10(train_data_dir, download=False)


@pytest.fixture(scope="module")
def golden():
    if REGENERATE:
        found: dict = {}
        yield found
        GOLDEN.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        return
    yield json.loads(GOLDEN.read_text())


def _check(golden: dict, name: str, got) -> None:
    if REGENERATE:
        golden[name] = got
        return
    assert got == golden[name], f"{name}: the engine no longer reproduces its golden metrics"


@pytest.mark.parametrize("name", list(CASES))
def test_single_runs_reproduce_their_golden_metrics(name, data, golden, tmp_path, one_thread):
    from rethink.training.trainer import train_run

    spec = _spec(data, **CASES[name])
    store = LocalStore(tmp_path)
    train_run(spec, store, data, _quiet())
    _check(golden, name, _numbers(read_metrics(store, spec.run_id)))


def test_a_run_resumed_after_sigterm_mid_epoch_reproduces_the_uninterrupted_golden(data, golden, tmp_path,
                                                                                   monkeypatch, one_thread):  # fmt: skip
    import rethink.training.trainer as trainer

    spec = _spec(data, **CASES["mlp-dropout-crop-partial"])
    store = LocalStore(tmp_path)
    save, calls = trainer.save_checkpoint, []

    def save_then_sigterm(*a, **k):
        save(*a, **k)
        calls.append(1)
        if len(calls) == 6:  # 4 batches an epoch, a checkpoint after each: epoch 2, batch 2
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_sigterm)
    with pytest.raises(Preempted, match="batch 3"):
        trainer.train_run(spec, store, data, _quiet(checkpoint_minutes=1e-9))
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    trainer.train_run(spec, store, data, _quiet())
    got = _numbers(read_metrics(store, spec.run_id))
    if not REGENERATE:
        assert got == golden["mlp-dropout-crop-partial"]  # the same numbers as the run never interrupted


def test_a_pack_of_three_reproduces_its_golden_metrics(data, golden, tmp_path, one_thread):
    from rethink.training.packed import train_pack

    specs = [_spec(data, "mlp-1x512", seed=s) for s in range(3)]
    store = LocalStore(tmp_path)
    train_pack(specs, store, data, _quiet())
    _check(golden, "pack-of-3", [_numbers(read_metrics(store, s.run_id)) for s in specs])
