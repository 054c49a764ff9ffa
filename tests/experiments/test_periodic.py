"""Periodic behaviour (Lobacheva et al.): the suites, the norm bookkeeping against a hand computation, spike
detection on a synthetic curve, and the report section from fabricated runs."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rethink.data.cifar import load_cifar10, synthetic_identity
from rethink.data.device import prepare_data
from rethink.experiments import periodic
from rethink.models import ConvModule, build_model
from rethink.report.aggregate import aggregate
from rethink.spec import RunSpec
from rethink.store import LocalStore
from rethink.store.runs import read_metrics, run_key
from rethink.suites import Options, expand
from rethink.summary import summarize
from rethink.training.options import ExecOptions
from rethink.training.trainer import train_run

# ---------------------------------------------------------------------------------------------- the suites


def test_periodic_suite_is_lobachevas_setup():
    (spec,) = expand("periodic", Options())
    assert (spec.model, spec.lr, spec.weight_decay, spec.momentum, spec.lr_decay) == (
        "inception",
        0.01,
        1e-3,
        0.0,
        1.0,
    )
    assert spec.track_norms and spec.target_train_acc is None  # no early stop: the periods come after the fit
    assert spec.epochs == periodic.EPOCHS and spec.train_subset is None
    assert expand("periodic", Options(epochs=7))[0].epochs == 7
    assert len(expand("periodic", Options(seeds=3))) == 3


def test_periodic_smoke_is_small_with_a_large_lr_wd_product():
    (spec,) = expand("periodic-smoke", Options())
    assert (spec.train_subset, spec.test_subset) == periodic.SMOKE_SUBSETS
    assert spec.lr * spec.weight_decay >= 100 * 0.01 * 1e-3
    assert (spec.momentum, spec.lr_decay, spec.track_norms, spec.target_train_acc) == (0.0, 1.0, True, None)
    assert spec.epochs == periodic.SMOKE_EPOCHS


# ---------------------------------------------------------------------------------------------- bookkeeping


def _conv_weight_names(model: nn.Module) -> list[str]:
    """Names of the conv weights directly followed by BatchNorm, found from the model's structure."""
    return [
        f"{name}.0.weight"
        for name, m in model.named_modules()
        if isinstance(m, ConvModule) and isinstance(m[1], nn.BatchNorm2d)
    ]


def test_norms_and_effective_lr_match_a_hand_computation(tmp_path, train_data_dir):
    data = load_cifar10(train_data_dir, verify=False)
    # One step per epoch (the whole 8-image subset is one batch), no momentum: the step can be redone by hand.
    spec = RunSpec(model="inception", lr=0.05, weight_decay=1e-2, momentum=0.0, lr_decay=0.5, batch_size=8,
                   epochs=2, train_subset=8, test_subset=4, track_norms=True,
                   dataset=synthetic_identity(600, 200, 0))  # fmt: skip
    store = LocalStore(tmp_path / "store")
    # Contiguous memory, as the hand computation below: channels_last convolutions round differently.
    train_run(spec, store, data, ExecOptions(device="cpu", channels_last=False, log=lambda m: None, progress=False))
    metrics = read_metrics(store, spec.run_id)
    assert len(metrics) == 2

    # The step by hand from the same initialization (train.py seeds with spec.seed before building).
    torch.manual_seed(spec.seed)
    model = build_model("inception")
    names = _conv_weight_names(model)
    assert len(names) == sum(isinstance(m, nn.Conv2d) for m in model.modules())  # with BN: every conv
    params = dict(model.named_parameters())
    dd = prepare_data(spec, data, torch.device("cpu"))
    model.train()
    loss = F.cross_entropy(model(dd.train_pre), dd.train_y)  # BatchNorm and the mean: order does not matter
    loss.backward()
    grad_norm = math.sqrt(sum(params[n].grad.double().pow(2).sum().item() for n in names))
    assert metrics[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)

    # The checkpoint written after epoch 1 holds the weights the epoch-1 norm was measured on.
    ckpt = torch.load(io.BytesIO(store.read_bytes(run_key(spec.run_id, "checkpoint.pt"))), weights_only=True)
    assert ckpt["epoch"] == 1
    state = ckpt["model"]
    norm = math.sqrt(sum(state[n].double().pow(2).sum().item() for n in names))
    assert metrics[0]["weight_norm"] == pytest.approx(norm, rel=1e-9)
    assert metrics[0]["effective_lr"] == pytest.approx(spec.lr / norm**2, rel=1e-9)
    assert metrics[1]["effective_lr"] == pytest.approx(
        spec.lr * spec.lr_decay / metrics[1]["weight_norm"] ** 2
    )
    # ... and those weights are one plain SGD step with coupled weight decay: w - lr (g + wd w).
    for n in names:
        w = params[n].detach()
        expected = w - spec.lr * (params[n].grad + spec.weight_decay * w)
        torch.testing.assert_close(state[n], expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- detection


def _curve(spike_epochs: list[int], n: int = 120, steps_per_epoch: int = 4) -> list[dict]:
    """A synthetic run: the loss decays to ~0.02 with jitter, jumps to ~2 at each spike and decays again;
    the norm shrinks by 2% per epoch and jumps 30% at each spike."""
    out, loss, norm, since = [], 2.3, 10.0, 0
    gen = torch.Generator().manual_seed(0)
    for e in range(1, n + 1):
        if e in spike_epochs:
            loss, norm, since = 2.2, norm * 1.3, 0
        else:
            since += 1
            loss = max(0.02, loss * 0.6) * (1 + 0.3 * torch.rand((), generator=gen).item())
            norm *= 0.98
        acc = 0.1 if since < 2 else min(1.0, 0.5 + 0.1 * since)
        out.append({"epoch": e, "step": e * steps_per_epoch, "train_loss": loss, "train_acc": acc,
                    "weight_norm": norm, "effective_lr": 0.1 / norm**2, "lr": 0.1})  # fmt: skip
    return out


def test_detects_the_known_spikes_and_their_period():
    metrics = _curve([30, 55, 80, 105])
    spikes = periodic.detect_spikes(metrics)
    assert spikes.epochs == (30, 55, 80, 105)
    assert spikes.steps == (120, 220, 320, 420)
    assert spikes.period_epochs == 25 and spikes.period_steps == 100
    assert spikes.norm_jumps == (True,) * 4
    assert "4 spikes" in spikes.describe() and "25.0 epochs" in spikes.describe()
    for ph in periodic.phases(metrics, spikes):
        assert ph["elr_growth"] > 1 and ph["norm_after"] > ph["norm_before"] and ph["recovered"]


def test_no_spike_in_a_smooth_curve_or_in_jitter_near_zero():
    assert periodic.detect_spikes(_curve([])).epochs == ()
    tiny = [
        {"epoch": e, "step": e, "train_loss": 1e-4 * (1 + 9 * (e % 2)), "train_acc": 1.0}
        for e in range(1, 50)
    ]
    assert periodic.detect_spikes(tiny).epochs == ()  # 10x jumps, but by less than min_jump nats


def test_noisy_accuracy_under_a_flat_loss_is_no_spike():
    # As in the CPU setting: eval-mode accuracy wanders between 10% and 90% while the loss sits at 0.04.
    gen = torch.Generator().manual_seed(1)
    noisy = [{"epoch": e, "step": e, "train_loss": 0.04, "train_acc": 0.1 + 0.8 * torch.rand((), generator=gen).item()}
             for e in range(1, 200)]  # fmt: skip
    assert periodic.detect_spikes(noisy).epochs == ()


def test_an_accuracy_collapse_or_a_nan_loss_counts_as_a_spike():
    metrics = _curve([])
    metrics[60]["train_acc"] = 0.1
    metrics[90]["train_loss"] = float("nan")
    assert periodic.detect_spikes(metrics).epochs == (61, 91)


def test_a_long_spike_is_one_spike():
    metrics = _curve([40])
    for m in metrics[40:46]:
        m["train_loss"] = 2.0
    spikes = periodic.detect_spikes(metrics)
    assert spikes.epochs == (40,) and spikes.period_epochs is None
    assert spikes.describe() == "1 spike (epoch 40)"


# ---------------------------------------------------------------------------------------------- the report


def test_report_section_renders_from_fabricated_runs(tmp_path):
    store = LocalStore(tmp_path / "store")
    o = Options(dataset="synthetic-n100-m20-s0", seeds=2, epochs=120)
    specs = expand("periodic-smoke", o)
    for s, spikes in zip(specs, ([30, 55, 80, 105], [40, 75])):
        metrics = [
            {**m, "lr": s.lr, "train_eval_loss": m["train_loss"], "test_loss": 2.0, "test_acc": 0.3,
             "grad_norm": 1.0, "epoch_seconds": 1.0, "train_seconds": 0.8, "eval_seconds": 0.2,
             "images_per_second": 100.0}
            for m in _curve(spikes)
        ]  # fmt: skip
        store.write_text(run_key(s.run_id, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))
        if s.seed == 0:  # the other run is still partial: its curve is drawn all the same
            result = summarize(s, metrics, "cap", {"device": "cpu"}, "fabricated")
            store.write_text(run_key(s.run_id, "result.json"), json.dumps(result))
    aggregate(store, "periodic-smoke", o, log=lambda m: None)
    out = tmp_path / "store" / "reports" / "synthetic" / "periodic-smoke"
    for name in ("periodic.png", "periodic.svg", "periodic.csv", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "4 spikes (epochs 30, 55, 80, 105); mean period 25.0 epochs = 100 steps" in md
    assert "2 spikes (epochs 40, 75)" in md and "partial, 120 of 120 epochs" in md
    assert "grew before 6 of 6 spikes" in md and "**consistent**" in md
    csv = (out / "periodic.csv").read_text().splitlines()
    assert len(csv) == 1 + 2 * 120 and csv[0].startswith("run_id,seed,epoch,step")
