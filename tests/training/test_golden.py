"""Golden per-epoch metrics of a few tiny synthetic runs, from the engine as it stands: a change to the engine
must reproduce them exactly (single runs bit for bit on the CPU, one thread). A golden is re-made only in a
commit that says why:

    RETHINK_REGENERATE_GOLDEN=1 python -m pytest -q tests/training/test_golden.py

Bit for bit holds for one instruction set: torch's CPU kernels (and oneDNN's) round differently on AVX2 and
AVX-512, so the goldens are kept per `cpu_capability()` (regenerating writes this machine's and keeps the
others). On a CPU with no golden of its own the runs are compared with another set (the first by name) at a
tolerance (losses to 1e-3 relative, accuracies to two examples of the tiny test set), and resuming is checked
bit for bit against an uninterrupted run trained here.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

from rethink.data.cifar import load_cifar10
from rethink.spec import RunSpec
from rethink.store import LocalStore
from rethink.store.runs import read_metrics
from rethink.training.loop import Preempted
from rethink.training.options import ExecOptions, cpu_capability

GOLDEN = Path(__file__).with_name("golden_metrics.json")
REGENERATE = os.environ.get("RETHINK_REGENERATE_GOLDEN") == "1"
TIMING = {"epoch_seconds", "train_seconds", "eval_seconds", "images_per_second"}
ISA = cpu_capability()
ACC_TOLERANCE = 2 / 64  # two examples of the 64-image test set (train accuracies are over 128)


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
def goldens() -> dict:
    """{instruction set: {case: metrics}} as committed."""
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def golden(goldens):
    """This machine's goldens ({} when it has none); with RETHINK_REGENERATE_GOLDEN=1 they are written back."""
    if REGENERATE:
        found: dict = {}
        yield found
        GOLDEN.write_text(json.dumps({**goldens, ISA: found}, indent=1, sort_keys=True) + "\n")
        return
    yield goldens.get(ISA, {})


def _close(got, want, where: str = "") -> list[str]:
    """Where `got` differs from `want` beyond the tolerance of another instruction set (empty: close enough)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{where}: keys {sorted(got) if isinstance(got, dict) else got} != {sorted(want)}"]
        return [d for k in want for d in _close(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: {len(got) if isinstance(got, list) else got} entries != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _close(g, w, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)):
        ok = abs(got - want) <= ACC_TOLERANCE if where.endswith("_acc") else math.isclose(got, want, rel_tol=1e-3)
        return [] if ok else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def _check(golden: dict, goldens: dict, name: str, got) -> None:
    if REGENERATE:
        golden[name] = got
        return
    if name in golden:
        assert got == golden[name], f"{name}: the engine no longer reproduces its golden metrics ({ISA})"
        return
    isa = sorted(goldens)[0]  # no golden for this instruction set: another set, at a tolerance
    diffs = _close(got, goldens[isa][name], name)
    assert not diffs, f"{name}: far from the {isa} golden (this CPU: {ISA}): " + "; ".join(diffs[:5])


@pytest.mark.parametrize("name", list(CASES))
def test_single_runs_reproduce_their_golden_metrics(name, data, golden, goldens, tmp_path, one_thread):
    from rethink.training.trainer import train_run

    spec = _spec(data, **CASES[name])
    store = LocalStore(tmp_path)
    train_run(spec, store, data, _quiet())
    _check(golden, goldens, name, _numbers(read_metrics(store, spec.run_id)))


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
    if REGENERATE:
        return
    want = golden.get("mlp-dropout-crop-partial")
    if want is None:  # no golden for this instruction set: the uninterrupted run, here
        trainer.train_run(spec, LocalStore(tmp_path / "uninterrupted"), data, _quiet())
        want = _numbers(read_metrics(LocalStore(tmp_path / "uninterrupted"), spec.run_id))
    assert got == want  # the same numbers as the run never interrupted


def test_a_pack_of_three_reproduces_its_golden_metrics(data, golden, goldens, tmp_path, one_thread):
    from rethink.training.packed import train_pack

    specs = [_spec(data, "mlp-1x512", seed=s) for s in range(3)]
    store = LocalStore(tmp_path)
    train_pack(specs, store, data, _quiet())
    _check(golden, goldens, "pack-of-3", [_numbers(read_metrics(store, s.run_id)) for s in specs])


def test_the_instruction_sets_goldens_agree_within_the_fallbacks_tolerance(goldens):
    """What a CPU without goldens of its own relies on: the sets of two instruction sets differ only in rounding,
    within the tolerance it is held to (the same runs, the same numbers but for the last bits)."""
    assert all(set(g) == set(CASES) | {"pack-of-3"} for g in goldens.values())
    if len(goldens) < 2:
        pytest.skip("the goldens of one instruction set only")
    first, *others = sorted(goldens)
    for isa in others:
        for name in goldens[first]:
            diffs = _close(goldens[isa][name], goldens[first][name], name)
            assert not diffs, (f"{name}: the {isa} and {first} goldens disagree beyond rounding: a change regenerated "
                               "one set only; delete the stale one (its CPU makes it again): " + "; ".join(diffs[:3]))  # fmt: skip
