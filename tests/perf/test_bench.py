"""The fast path computes the textbook function, and `rethink bench` reports what it documents.

The trainer (data resident on the device, a whole-set preprocessing pass, randperm orders from epoch_seed,
foreach SGD) must give, on the CPU in float32, exactly the per-step losses of a plain PyTorch loop over the
same data order; the typical DataLoader pipeline of rethink/perf/baseline.py, fed that order, must agree to
float rounding. Timings are never asserted.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import rethink.training.loop as loop
from rethink.cli import main
from rethink.data.cifar import load_cifar10
from rethink.data.device import epoch_seed
from rethink.data.preprocess import preprocess
from rethink.data.synthetic import write_synthetic
from rethink.models import build_model
from rethink.perf import baseline
from rethink.perf.bench import FIELDS, collect, read_records, summarize_records
from rethink.spec import RunSpec
from rethink.store import LocalStore
from rethink.store.runs import read_metrics
from rethink.training.options import ExecOptions
from rethink.training.trainer import train_run

# Tiny batches: one thread beats two here, and by far on a shared, busy CPU (conftest's `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    write_synthetic(root, 300, 60, seed=0)
    return load_cifar10(root)


class _LossRecorder:
    """Stands in for torch.nn.functional inside rethink.training.loop: records each training step's mean loss."""

    def __init__(self):
        self.losses: list[float] = []

    def __getattr__(self, name):
        return getattr(F, name)

    def cross_entropy(self, out, y, reduction="mean"):
        loss = F.cross_entropy(out, y, reduction=reduction)
        if reduction == "mean":  # the training step (evaluation sums)
            self.losses.append(loss.item())
        return loss


def _trainer_losses(spec: RunSpec, data, tmp_path, monkeypatch, onednn: bool | None = None) -> list[float]:
    recorder = _LossRecorder()
    monkeypatch.setattr(loop, "F", recorder)
    opts = ExecOptions(device="cpu", onednn=onednn, log=lambda m: None)
    train_run(spec, LocalStore(tmp_path / f"store-{onednn}"), data, opts)
    monkeypatch.undo()
    return recorder.losses


def _textbook_losses(spec: RunSpec, data) -> list[float]:
    """A plain loop: model, SGD, the epoch_seed data order and crops, the paper's preprocessing per batch."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.model)
    kernels = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    others = [p for p in model.parameters() if all(p is not k for k in kernels)]
    assert kernels and others  # the MLP has biases: weight decay must leave them alone
    opt = torch.optim.SGD([{"params": kernels, "weight_decay": spec.weight_decay}, {"params": others}], lr=spec.lr,
                          momentum=spec.momentum)  # fmt: skip
    images, labels = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    n, bs = len(labels), spec.batch_size
    losses = []
    for epoch in range(spec.epochs):
        for group in opt.param_groups:
            group["lr"] = spec.lr * spec.lr_decay**epoch
        g = torch.Generator()
        g.manual_seed(epoch_seed(spec.seed, epoch))
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 5, (n, 2), generator=g) if spec.random_crop else None
        model.train()
        for b in range(math.ceil(n / bs)):
            idx = order[b * bs : (b + 1) * bs]
            x = preprocess(images[idx], None if offsets is None else offsets[idx])
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("random_crop", [False, True], ids=["central", "random-crop"])
def test_trainer_takes_exactly_the_textbook_steps(data, tmp_path, monkeypatch, random_crop):
    spec = RunSpec(model="mlp-1x512", dataset=data.identity, epochs=2, batch_size=64, weight_decay=5e-4,
                   random_crop=random_crop, seed=3)  # fmt: skip
    fast = _trainer_losses(spec, data, tmp_path, monkeypatch, onednn=False)
    plain = _textbook_losses(spec, data)
    assert len(fast) == 2 * math.ceil(300 / 64)
    assert fast == plain  # bitwise: the same function, computed the same way
    # The CPU default routes fully connected layers through oneDNN: the same function up to rounding.
    onednn = _trainer_losses(spec, data, tmp_path, monkeypatch)
    assert onednn == pytest.approx(plain, rel=1e-5)


def test_typical_pipeline_fed_the_same_order_agrees(data, tmp_path, monkeypatch):
    spec = RunSpec(model="mlp-1x512", dataset=data.identity, epochs=1, batch_size=64, seed=5)
    fast = _trainer_losses(spec, data, tmp_path, monkeypatch)
    g = torch.Generator()
    g.manual_seed(epoch_seed(spec.seed, 0))
    order = torch.randperm(300, generator=g).tolist()
    device = torch.device("cpu")
    model, opt = baseline.model_and_optimizer(spec.model, device, seed=spec.seed)
    loader, _, _ = baseline.loaders(data.train_x, data.train_y, data.test_x, data.test_y, device, spec.batch_size,
                                    workers=0, sampler=order)  # fmt: skip
    typical: list[float] = []
    baseline.train_epoch(model, opt, loader, device, losses=typical)
    assert typical == pytest.approx(fast, rel=1e-5)


def test_per_image_standardization_matches_the_trainers():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ours = preprocess(x)
    theirs = torch.stack([baseline.transforms(False)(baseline.Cifar10Images(x.numpy(), [0] * 4)[i][0]) for i in range(4)])
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.fixture(scope="module")
def bench_records(tmp_path_factory):
    """`rethink bench --json` for an unpacked run with the baseline and whole epochs, and for a pack of 2."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench-out")
    records = {}
    for name, extra in {
        "single": ["--baseline", "--workers", "1", "--epochs", "1", "--train-images", "256", "--test-images", "64"],
        "pack": ["--pack", "2"],
    }.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["bench", "--model", "mlp-1x512", "--device", "cpu", "--steps", "2", "--warmup", "1",
                         "--batch-size", "32", "--json", *extra])  # fmt: skip
        assert code == 0
        records[name] = json.loads(buf.getvalue())
        (out / f"{name}.json").write_text(buf.getvalue())
    return records, out


# MLP 1x512 on the 2352-value input: a forward pass is 2 * (2352 * 512 + 512 * 10) FLOPs of matmuls; training adds
# the weight gradients of both layers and the input gradient of the second (the images need none).
MLP_EVAL_FLOPS = 2 * (2352 * 512 + 512 * 10)
MLP_TRAIN_FLOPS = 2 * MLP_EVAL_FLOPS + 2 * 512 * 10


def test_bench_json_has_the_documented_fields(bench_records):
    """Every documented field; each derived number follows from the measured rates, whatever those are."""
    records, _ = bench_records
    for r in records.values():
        assert set(FIELDS) <= set(r)
        assert r["model"] == "mlp-1x512" and r["device"] == "cpu" and r["steps"] == 2 and r["warmup"] == 1
        assert r["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # which CPU the numbers are of
        assert (r["flops_per_eval_image"], r["flops_per_train_image"]) == (MLP_EVAL_FLOPS, MLP_TRAIN_FLOPS)
        ips, eps = r["train_images_per_s"], r["eval_images_per_s"]
        # A CIFAR-10 epoch of all K runs: 50k training images, then 50k + 10k evaluated.
        assert r["epoch_seconds"] == pytest.approx(r["pack"] * (50_000 / ips + 60_000 / eps))
        assert r["run_epochs_per_s"] == pytest.approx(r["pack"] / r["epoch_seconds"])
        assert r["train_tflops"] == pytest.approx(MLP_TRAIN_FLOPS * ips / 1e12)
        assert r["mfu"] == (pytest.approx(r["train_tflops"] / r["peak_tflops"]) if r["peak_tflops"] else None)
    single, pack = records["single"], records["pack"]
    assert pack["pack"] == 2 and single["pack"] == 1
    assert pack["measured"] is None and pack["baseline"] is None and pack["speedup"] is None
    b = single["baseline"]
    assert {"train_images_per_s", "eval_images_per_s", "epoch_seconds", "num_workers", "measured"} <= set(b)
    assert b["num_workers"] == 1
    assert b["epoch_seconds"] == pytest.approx(50_000 / b["train_images_per_s"] + 60_000 / b["eval_images_per_s"])
    assert single["speedup"] == pytest.approx(single["run_epochs_per_s"] / b["run_epochs_per_s"])
    # --epochs 1: one timed epoch of the real trainer (after its warm-up epoch), on its own clocks.
    m = single["measured"]
    assert m["epochs"] == 1 and m["run_epochs_per_s"] == pytest.approx(1 / m["epoch_seconds"])
    assert m["eval_seconds"] == pytest.approx(m["epoch_seconds"] - m["train_seconds"])
    assert single["measured_speedup"] == pytest.approx(m["run_epochs_per_s"] * b["measured"]["epoch_seconds"])


def test_summary_table_lists_every_record(bench_records, tmp_path):
    _, out = bench_records
    assert collect(out, tmp_path / "all.jsonl") == 2
    records = read_records(tmp_path / "all.jsonl")
    assert sorted(r["name"] for r in records) == ["pack", "single"]
    table = summarize_records(records)
    assert "single" in table and "pack" in table and "mlp-1x512" in table


def test_bench_rejects_bad_input(capsys):
    assert main(["bench", "--model", "mlp-1x512", "--device", "cpu", "--steps", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- GPU (pytest -m gpu)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model", ["mlp-1x512", "alexnet", "inception"])
def test_bf16_training_follows_fp32(data, tmp_path, model):
    """bf16 autocast + channels_last takes the same path as float32 to within a few percent of the loss."""
    spec = RunSpec(model=model, dataset=data.identity, epochs=3, batch_size=32)
    final = {}
    store = LocalStore(tmp_path)
    for precision in ("float32", "bf16"):
        twin = spec.replace(precision=precision)
        train_run(twin, store, data, ExecOptions(device="cuda", log=lambda m: None))
        final[precision] = read_metrics(store, twin.run_id)[-1]["train_loss"]
    assert final["bf16"] == pytest.approx(final["float32"], rel=0.05)


@pytest.mark.gpu
@needs_cuda
def test_compiled_step_matches_eager_on_cuda(data, tmp_path):
    spec = RunSpec(model="alexnet", dataset=data.identity, epochs=2, batch_size=32)
    final = {}
    for compile in (False, True):
        store = LocalStore(tmp_path / f"c{compile}")
        train_run(spec, store, data, ExecOptions(device="cuda", compile=compile, log=lambda m: None))
        final[compile] = read_metrics(store, spec.run_id)[-1]["train_loss"]
    assert final[True] == pytest.approx(final[False], rel=0.02)


def test_the_typical_pipeline_runs_as_a_whole_process(synth_dir):
    """`python -m rethink.perf.baseline`: the pipeline end-to-end comparisons time against `rethink train`."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rethink.perf.baseline", "--data-dir", str(synth_dir), "--epochs", "2",
                           "--workers", "0"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"] and "test acc" in lines[-1]
