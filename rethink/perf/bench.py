"""`rethink bench`: training and evaluation throughput, seconds per epoch, FLOPs and utilization of one model.

What is timed is the engine's own work: its step and evaluation objects, `trainer.SingleStep` (K = 1) or
`packed.PackStep` (K > 1), on the same resident data and preprocessing, on synthetic images of CIFAR's shape held in
memory (or the files under --data-dir). Rates are steady state: `warmup` steps (and one evaluation pass)
run first, so compilation and allocator warm-up are not counted; CUDA events time the GPU, perf_counter
the CPU. `--epochs E` also runs the real trainer end to end for 1 + E epochs and reports its own clocks.
`--baseline` measures the typical pipeline of rethink/perf/baseline.py on the same device and data.

FLOPs are counted by torch.utils.flop_counter (matmuls and convolutions, forward and backward; elementwise
work is not counted), so utilization is a lower bound of the work the device does. Peaks are the vendors'
data-sheet dense figures; the CPU figure is a rough estimate and says how it was made.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rethink.data.cifar import Cifar10
from rethink.errors import UserError
from rethink.models import MODELS, build_model
from rethink.perf.peaks import cpu_name, device_peak
from rethink.spec import RunSpec
from rethink.training.options import cpu_capability

EPOCH_TRAIN, EPOCH_EVAL = 50_000, 60_000  # a CIFAR-10 epoch: train on 50k, then evaluate 50k train + 10k test

# Fields of `rethink bench --json` (documented in docs/performance.md).
FIELDS = (
    "model", "pack", "device", "device_name", "torch", "python", "rethink", "threads", "date",
    "precision", "channels_last", "compile", "compile_mode", "batch_size", "warmup", "steps",
    "train_images", "test_images", "data",
    "train_images_per_s", "eval_images_per_s", "epoch_seconds", "run_epochs_per_s",
    "flops_per_train_image", "flops_per_eval_image", "train_tflops", "peak_tflops", "peak", "mfu",
    "measured", "baseline", "speedup", "measured_speedup", "fast_layers", "eval_batch", "reference",
    "reference_ratio",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- pieces


def flops_per_image(name: str, batch: int = 2) -> tuple[float, float]:
    """(training fwd+bwd, evaluation fwd) FLOPs per image, counted by FlopCounterMode on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(name)
    x = torch.randn(batch, 3, 28, 28)
    y = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    train = fc.get_total_flops() / batch
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return train, fc.get_total_flops() / batch


def random_images(n_train: int, n_test: int, seed: int = 0) -> Cifar10:
    """Uniformly random CIFAR-shaped images and labels in memory (throughput does not depend on content)."""
    rng = np.random.default_rng(seed)
    return Cifar10(
        train_x=rng.integers(0, 256, size=(n_train, 3, 32, 32), dtype=np.uint8),
        train_y=rng.integers(0, 10, size=n_train).astype(np.int64),
        test_x=rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8),
        test_y=rng.integers(0, 10, size=n_test).astype(np.int64),
        synthetic=True,
        identity=f"bench-random-n{n_train}-m{n_test}-s{seed}",
        path="(random images in memory)",
    )


class Timer:
    """Seconds between start() and stop(): CUDA events on a GPU (no sync inside), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.begin.elapsed_time(end) / 1e3
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------- measurements


def measure_trainer(spec: RunSpec, data: Cifar10, ex, compile_mode: str | None, warmup: int, steps: int) -> dict:
    """Steady-state rates of the engine's own step and evaluation for one run (trainer.SingleStep), on the model
    train_run builds for the resolved execution `ex`."""
    from rethink.data.device import prepare_data
    from rethink.training.options import prepare_device
    from rethink.training.trainer import SingleStep, build_run_model, fresh_run

    prepare_device(ex.device)  # as train_run does
    dd = prepare_data(spec, data, ex.device)
    run = fresh_run(spec, lambda s: build_run_model(s, ex), ex.device)
    return _measure(SingleStep(run, dd, ex, compile_mode), spec, 1, warmup, steps)


def measure_pack(specs: list[RunSpec], data: Cifar10, ex, compile_mode: str | None, warmup: int, steps: int) -> dict:
    """Steady-state rates of the engine's own step and evaluation for a pack (packed.PackStep)."""
    from rethink.training.options import prepare_device
    from rethink.training.packed import PackStep, member_model, prepare_pack_data
    from rethink.training.trainer import fresh_run

    prepare_device(ex.device)  # as train_pack does
    pd = prepare_pack_data(specs, data, ex.device)
    runs = [fresh_run(s, member_model, ex.device) for s in specs]
    return _measure(PackStep(runs, pd, ex, compile_mode), specs[0], len(specs), warmup, steps)


def _measure(step, spec: RunSpec, k: int, warmup: int, steps: int) -> dict:
    """Time `steps` steps of the engine's `step` (trainer.Step) after `warmup` steps, then one evaluation pass
    after a warm-up pass; the timed steps start a new epoch (a new order, training mode), as the engine does."""
    from rethink.training.trainer import learning_rate

    n_batches = math.ceil(step.n_train / spec.batch_size)
    loss_sum = torch.zeros(k, device=step.device, dtype=torch.float64)
    at = {"epoch": -1, "batch": n_batches}

    def new_epoch() -> None:
        at["epoch"] += 1
        at["batch"] = 0
        step.begin_epoch(at["epoch"])

    def run(count: int) -> None:
        nonlocal loss_sum
        for _ in range(count):
            if at["batch"] >= n_batches:
                new_epoch()
            loss_sum += step.train(at["batch"], learning_rate(spec, at["epoch"]))[0].double()
            at["batch"] += 1

    timer = Timer(step.device)
    run(warmup)
    step.evaluate()  # warm-up pass (compiles the evaluation graphs too)
    new_epoch()
    timer.start()
    run(steps)
    t_train = timer.stop()
    timer.start()
    test_loss = step.evaluate()[2]
    t_eval = timer.stop()
    if not bool(torch.isfinite(test_loss).all()):
        raise UserError("the benchmark's evaluation loss is not finite: the measured step is broken")
    return {"train_images_per_s": steps * spec.batch_size * k / t_train,
            "eval_images_per_s": (step.n_train + step.n_test) * k / t_eval}  # fmt: skip


def measure_epochs(specs: list[RunSpec], data: Cifar10, device_name: str, compile: bool, compile_mode: str | None,
                   epochs: int) -> dict:  # fmt: skip
    """1 + `epochs` epochs of the real trainer (K = 1) or pack (K > 1) in a temporary store, in the specs' own
    precision; its own clocks."""
    import tempfile

    from rethink.store import LocalStore
    from rethink.store.runs import read_metrics
    from rethink.training.options import ExecOptions
    from rethink.training.packed import train_pack
    from rethink.training.trainer import train_run

    specs = [s.replace(epochs=1 + epochs) for s in specs]
    opts = ExecOptions(device=device_name, compile=compile, progress=False, log=lambda m: None)
    with tempfile.TemporaryDirectory(prefix="rethink-bench-") as tmp:
        store = LocalStore(tmp)
        if len(specs) == 1:
            train_run(specs[0], store, data, opts)
        else:
            train_pack(specs, store, data, opts, compile_mode=compile_mode)
        metrics = read_metrics(store, specs[0].run_id)[1:]  # the first epoch is the warm-up
    epoch = sum(m["epoch_seconds"] for m in metrics) / len(metrics)
    train = sum(m["train_seconds"] for m in metrics) / len(metrics)
    return {"epochs": len(metrics), "epoch_seconds": epoch, "train_seconds": train, "eval_seconds": epoch - train,
            "run_epochs_per_s": len(specs) / epoch}  # fmt: skip


def baseline_data(data: Cifar10, data_dir: str | None, n_train: int, n_test: int):
    """The arrays the baseline's Dataset holds: read from the files again when there are files."""
    from rethink.perf.baseline import Cifar10Images

    if data_dir is None:
        return data.train_x[:n_train], data.train_y[:n_train], data.test_x[:n_test], data.test_y[:n_test]
    train = Cifar10Images.from_dir(data_dir, train=True, limit=n_train)
    test = Cifar10Images.from_dir(data_dir, train=False, limit=n_test)
    return (train.data.transpose(0, 3, 1, 2), np.asarray(train.targets), test.data.transpose(0, 3, 1, 2),
            np.asarray(test.targets))  # fmt: skip


# The reference a fast path is measured against: the models as written in models.py, in contiguous memory, evaluated
# 1000 images at a time (the CPU defaults before the fast path).
REFERENCE = {"fast_layers": False, "channels_last": False, "eval_batch": 1000}


def layout_name(fast_layers: bool, channels_last: bool, eval_batch: int) -> str:
    return (f"{'fast layers' if fast_layers else 'reference layers'}, "
            f"{'channels_last' if channels_last else 'contiguous'}, evaluation batch {eval_batch}")  # fmt: skip


def epoch_seconds(train_ips: float, eval_ips: float, k: int = 1) -> float:
    """Seconds of one CIFAR-10 epoch of all k runs: 50k training images, then evaluation of 50k + 10k."""
    return k * (EPOCH_TRAIN / train_ips + EPOCH_EVAL / eval_ips)


# ---------------------------------------------------------------------------------------------- the command


def bench(model: str, device: str = "auto", pack: int = 1, compile: bool = False, compile_mode: str | None = None,
          amp: bool = False, batch_size: int = 128, steps: int = 50, warmup: int = 10,
          data_dir: str | None = None, baseline: bool = False, workers: int = 2, epochs: int = 0,
          train_images: int | None = None, test_images: int | None = None, reference: bool = False,
          log=print) -> dict:  # fmt: skip
    """Measure one configuration; the record `rethink bench --json` prints. With `reference`, also the reference
    model in the same run (REFERENCE: no fast layers, contiguous memory, the old evaluation batch) and the ratio."""
    import rethink
    from rethink.training.options import ExecOptions, resolve_device

    if model not in MODELS:
        raise UserError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    if pack < 1 or steps < 1 or warmup < 0 or batch_size < 1 or epochs < 0:
        raise UserError("--pack, --steps and --batch-size must be at least 1; --warmup and --epochs at least 0")
    dev = resolve_device(device)
    amp = bool(amp)
    ex = ExecOptions(device=str(dev), compile=compile).resolve(model if pack == 1 else None, amp=amp)
    if train_images is None:
        train_images = 50_000 if epochs else min(50_000, (warmup + steps) * batch_size)
    if test_images is None:
        test_images = 10_000 if epochs else max(batch_size, train_images // 5)
    if data_dir is not None:
        from rethink.data.cifar import load_cifar10

        data = load_cifar10(data_dir, download=False)
        train_images, test_images = min(train_images, len(data.train_y)), min(test_images, len(data.test_y))
    else:
        data = random_images(train_images, test_images)
    spec = RunSpec(model=model, dataset=data.identity, batch_size=batch_size, train_subset=train_images,
                   test_subset=test_images, epochs=1, precision="bf16" if amp else "float32")  # fmt: skip
    specs = [spec.replace(seed=k) for k in range(pack)]
    eval_batch = ex.eval_batch
    log(f"bench {model}: pack {pack}, {dev}, {'bf16' if amp else 'fp32'}{' + compile' if compile else ''}, "
        f"{warmup} warm-up + {steps} timed steps of {batch_size} on {train_images} / {test_images} images")  # fmt: skip
    b = None
    if baseline:  # first: the trainer's process-wide CPU allocator tuning must not help the baseline
        from rethink.perf import baseline as typical

        log(f"bench {model}: the typical pipeline ({workers} DataLoader workers, eager fp32)")
        arrays = baseline_data(data, data_dir, train_images, test_images)
        b = typical.measure(model, *arrays, dev, steps, max(warmup, 2), batch_size, workers)
        b["epoch_seconds"] = epoch_seconds(b["train_images_per_s"], b["eval_images_per_s"])
        b["run_epochs_per_s"] = 1 / b["epoch_seconds"]
        b["measured"] = None
        if epochs:
            runs = typical.run_epochs(model, *arrays, dev, 1 + epochs, batch_size, workers)[1:]
            b["measured"] = {"epochs": len(runs), "epoch_seconds": sum(r["epoch_seconds"] for r in runs) / len(runs),
                             "train_seconds": sum(r["train_seconds"] for r in runs) / len(runs)}  # fmt: skip
    if pack == 1:
        rates = measure_trainer(spec, data, ex, compile_mode, warmup, steps)
    else:
        rates = measure_pack(specs, data, ex, compile_mode, warmup, steps)
    train_flops, eval_flops = flops_per_image(model)
    peak, peak_name = device_peak(dev, amp)
    tflops = train_flops * rates["train_images_per_s"] / 1e12
    seconds = epoch_seconds(rates["train_images_per_s"], rates["eval_images_per_s"], pack)  # all K runs
    record = {
        "model": model,
        "pack": pack,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "cpu_capability": cpu_capability() if dev.type == "cpu" else None,  # the CPU kernels' vector instructions
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rethink": rethink.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "precision": "bf16 autocast" if amp else "fp32",
        "channels_last": ex.channels_last,
        "fast_layers": ex.fast_layers,
        "eval_batch": eval_batch,
        "compile": compile,
        "compile_mode": compile_mode if compile else None,
        "batch_size": batch_size,
        "warmup": warmup,
        "steps": steps,
        "train_images": train_images,
        "test_images": test_images,
        "data": data.description if data_dir else data.path,
        **rates,
        "epoch_seconds": seconds,
        "run_epochs_per_s": pack / seconds,
        "flops_per_train_image": train_flops,
        "flops_per_eval_image": eval_flops,
        "train_tflops": tflops,
        "peak_tflops": peak,
        "peak": peak_name,
        "mfu": tflops / peak if peak else None,
        "measured": None,
        "baseline": None,
        "speedup": None,
        "measured_speedup": None,
        "reference": None,
        "reference_ratio": None,
    }
    if reference:
        if pack != 1:
            raise UserError("--reference compares single runs: drop --pack")
        ref = ExecOptions(device=str(dev), compile=compile, **REFERENCE).resolve(model, amp=amp)
        log(f"bench {model}: the reference ({layout_name(ref.fast_layers, ref.channels_last, ref.eval_batch)}), "
            "same steps")
        r = measure_trainer(spec, data, ref, compile_mode, warmup, steps)
        r["epoch_seconds"] = epoch_seconds(r["train_images_per_s"], r["eval_images_per_s"])
        r.update(channels_last=ref.channels_last, fast_layers=ref.fast_layers, eval_batch=ref.eval_batch)
        record["reference"] = r
        record["reference_ratio"] = r["epoch_seconds"] / seconds
    if epochs:
        log(f"bench {model}: {1 + epochs} epochs of the real trainer (the first is warm-up)")
        record["measured"] = measure_epochs(specs, data, str(dev), compile, compile_mode, epochs)
    if b is not None:
        record["baseline"] = b
        record["speedup"] = record["run_epochs_per_s"] / b["run_epochs_per_s"]
        if epochs:
            record["measured_speedup"] = record["measured"]["run_epochs_per_s"] * b["measured"]["epoch_seconds"]
    return record


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.2f} "


def format_record(r: dict) -> str:
    """A few human lines for one bench record."""
    how = (f"{r['precision']}{', channels_last' if r['channels_last'] else ''}"
           f"{', fast layers' if r.get('fast_layers') else ''}{', compile' if r['compile'] else ''}, "
           f"eval batch {r.get('eval_batch', '?')}")  # fmt: skip
    lines = [
        f"{r['model']}, pack {r['pack']}, {r['device']} ({r['device_name']}"
        f"{', ' + r['cpu_capability'] if r.get('cpu_capability') else ''}), torch {r['torch']}, {how}, "
        f"batch {r['batch_size']}",
        f"  train     {r['train_images_per_s']:>12,.0f} img/s  ({r['steps']} steps after {r['warmup']} warm-up)",
        f"  eval      {r['eval_images_per_s']:>12,.0f} img/s",
        f"  epoch     {r['epoch_seconds']:>12.3f} s per 50k-image epoch of {'each' if r['pack'] == 1 else 'all'} "
        f"{'run' if r['pack'] == 1 else str(r['pack']) + ' runs'} (train + evaluate 50k train + 10k test); "
        f"{r['run_epochs_per_s']:.2f} run-epochs/s",
        f"  FLOPs     {_si(r['flops_per_train_image'])}FLOP per training image (fwd+bwd), "
        f"{_si(r['flops_per_eval_image'])}FLOP per evaluated image",
        f"  achieved  {r['train_tflops']:.3f} TFLOP/s in training"
        + (f" = {100 * r['mfu']:.1f}% of {r['peak_tflops']:.1f} TFLOP/s ({r['peak']})" if r["mfu"] is not None
           else f"; peak {r['peak']}"),
    ]  # fmt: skip
    if r["measured"]:
        m = r["measured"]
        lines.append(f"  measured  {m['epoch_seconds']:.3f} s per epoch of the real trainer ({m['epochs']} epochs "
                     f"on {r['train_images']} / {r['test_images']} images), {m['run_epochs_per_s']:.2f} run-epochs/s")
    if r.get("reference"):
        f = r["reference"]
        lines.append(f"  reference {f['train_images_per_s']:,.0f} img/s train, {f['eval_images_per_s']:,.0f} img/s eval, "
                     f"{f['epoch_seconds']:.3f} s per epoch ({layout_name(f['fast_layers'], f['channels_last'], f['eval_batch'])}) -> this path is "
                     f"{r['reference_ratio']:.2f}x faster per epoch")  # fmt: skip
    if r["baseline"]:
        b = r["baseline"]
        lines.append(f"  baseline  {b['train_images_per_s']:,.0f} img/s train, {b['eval_images_per_s']:,.0f} img/s "
                     f"eval, {b['epoch_seconds']:.3f} s per epoch ({b['num_workers']} workers, eager fp32) -> this "
                     f"path is {r['speedup']:.1f}x faster per run-epoch")  # fmt: skip
        if b["measured"]:
            lines.append(f"  measured  baseline {b['measured']['epoch_seconds']:.3f} s per epoch -> "
                         f"{r['measured_speedup']:.1f}x")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- summaries


def read_records(path: str | Path) -> list[dict]:
    """Bench records from a .jsonl file (one per line) or a directory of *.json files (named by file)."""
    path = Path(path)
    records = []
    if path.is_dir():
        for f in sorted(path.glob("*.json")):
            try:
                r = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(r, dict) and "train_images_per_s" in r:
                records.append({"name": f.stem, **r})
    elif path.exists():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def full_suite_hours(records: list[dict]) -> tuple[float, dict] | None:
    """Upper bound of the full suite's device time: every run to its cap at the best measured run-epochs/s."""
    from rethink.suites import expand

    best: dict[str, float] = {}
    for r in records:  # run_epochs_per_s is normalized to a 50k-image epoch
        best[r["model"]] = max(best.get(r["model"], 0.0), r["run_epochs_per_s"])
    specs = expand("full")
    if any(s.model not in best for s in specs):
        return None
    return sum(s.epochs / best[s.model] for s in specs) / 3600, best


def summarize_records(records: list[dict]) -> str:
    """One screen: a row per bench record, then the device and the full-suite estimate."""
    if not records:
        return "no bench records"
    head = (f"{'record':<24}{'model':<15}{'K':>3} {'how':<15}{'train img/s':>12}{'eval img/s':>12}{'s/epoch':>10}"
            f"{'measured':>10}{'run-ep/s':>10}{'MFU':>7}{'vs base':>8}")  # fmt: skip
    out = [head]
    for r in records:
        how = ("bf16" if r["precision"].startswith("bf16") else "fp32") + ("+cl" if r["channels_last"] else "")
        how += ("+" + (r.get("compile_mode") or "compile")) if r["compile"] else ""
        m = (r.get("measured") or {}).get("epoch_seconds")
        mfu, sp = r.get("mfu"), r.get("speedup")
        out.append(f"{r.get('name', '')[:23]:<24}{r['model']:<15}{r['pack']:>3} {how[:14]:<15}"
                   f"{r['train_images_per_s']:>12,.0f}{r['eval_images_per_s']:>12,.0f}{r['epoch_seconds']:>10.4g}"
                   f"{(f'{m:.4g}' if m else '-'):>10}{r['run_epochs_per_s']:>10.3g}"
                   f"{(f'{100 * mfu:.1f}%' if mfu else '-'):>7}{(f'{sp:.1f}x' if sp else '-'):>8}")  # fmt: skip
    first = records[0]
    out.append(f"device: {first['device_name']} ({first['device']}), torch {first['torch']}, {first['date']}")
    out.append("s/epoch: one 50k-image epoch of all K runs (train + full evaluation), from steady-state rates; "
               "measured: the real trainer's epoch at its image count")  # fmt: skip
    est = full_suite_hours(records)
    if est:
        out.append(f"full suite, every run to its cap at the best rate measured per model: <= {est[0]:.2f} device-hours")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- bf16 vs float32


def precision_agreement(data: Cifar10, specs: list[RunSpec], device: str, workdir: str | Path, log=print) -> dict:
    """Train each spec twice, float32 and its bf16 twin (another run), and compare what the report would show:
    final train and test accuracy (percentage points) and the epoch each accuracy threshold was first reached.

    The gate for making bf16 a default (docs/protocol.md): until this agrees on a GPU, runs train in float32.
    """
    from rethink.store import LocalStore
    from rethink.summary import ACC_THRESHOLDS
    from rethink.training.options import ExecOptions
    from rethink.training.trainer import train_run

    rows = []
    for spec in specs:
        got = {}
        for name, precision in (("fp32", "float32"), ("bf16", "bf16")):
            t0 = time.perf_counter()
            r = train_run(spec.replace(precision=precision), LocalStore(workdir), data,
                          ExecOptions(device=device, progress=False, log=lambda m: None))  # fmt: skip
            got[name] = (r, time.perf_counter() - t0)
        (a, ta), (b, tb) = got["fp32"], got["bf16"]
        row = {"run": spec.label(), "run_id": spec.run_id, "epochs": spec.epochs, "seconds_fp32": ta,
               "seconds_bf16": tb}  # fmt: skip
        for key in ("final_train_acc", "final_test_acc"):
            row[f"{key}_fp32"], row[f"{key}_bf16"] = 100 * a[key], 100 * b[key]
            row[f"{key}_diff_pp"] = 100 * (b[key] - a[key])
        for t in ACC_THRESHOLDS:
            k = f"{t:g}"
            ea, eb = a["train_acc_epochs"][k], b["train_acc_epochs"][k]
            row[f"epoch_{k}_fp32"], row[f"epoch_{k}_bf16"] = ea, eb
            row[f"epoch_{k}_diff"] = None if ea is None or eb is None else eb - ea
        rows.append(row)
        log(f"{spec.label()}: test acc fp32 {row['final_test_acc_fp32']:.2f}% bf16 {row['final_test_acc_bf16']:.2f}% "
            f"({row['final_test_acc_diff_pp']:+.2f} pp); train acc {row['final_train_acc_diff_pp']:+.2f} pp; "
            f"epoch to 99%: {row['epoch_0.99_fp32']} vs {row['epoch_0.99_bf16']}")  # fmt: skip

    def worst(key):
        vals = [abs(r[key]) for r in rows if r[key] is not None]
        return max(vals) if vals else None

    return {
        "device": str(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "data": data.identity,
        "rows": rows,
        "max_abs_test_acc_diff_pp": worst("final_test_acc_diff_pp"),
        "max_abs_train_acc_diff_pp": worst("final_train_acc_diff_pp"),
        "max_abs_epoch_diff": {f"{t:g}": worst(f"epoch_{t:g}_diff") for t in ACC_THRESHOLDS},
        "unreached_mismatch": [r["run"] for r in rows for t in ACC_THRESHOLDS
                               if (r[f"epoch_{t:g}_fp32"] is None) != (r[f"epoch_{t:g}_bf16"] is None)],
    }  # fmt: skip


def precision_specs(dataset: str, epochs: int, train_subset: int | None) -> list[RunSpec]:
    """The runs the bf16 check compares: every model on true labels, and MLP 1x512 on random labels."""
    common = dict(dataset=dataset, epochs=epochs, train_subset=train_subset)
    return [RunSpec(model=m, **common) for m in ("mlp-1x512", "alexnet", "inception", "inception-nobn")] + [
        RunSpec(model="mlp-1x512", labels="random", **common)
    ]


def collect(directory: str | Path, out: str | Path) -> int:
    """Append the records of a directory of *.json files to a .jsonl file, each with its file's name."""
    records = read_records(directory)
    with open(out, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return len(records)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "summarize":
        print(summarize_records(read_records(sys.argv[2])))
    elif len(sys.argv) == 4 and sys.argv[1] == "collect":
        print(f"{collect(sys.argv[2], sys.argv[3])} records appended to {sys.argv[3]}")
    elif len(sys.argv) == 7 and sys.argv[1] == "precision":
        # precision DATA_DIR DEVICE EPOCHS TRAIN_IMAGES OUT.json
        import tempfile

        from rethink.data.cifar import load_cifar10

        _, _, data_dir, device, epochs, n, out = sys.argv
        data = load_cifar10(data_dir, verify=False, download=False)
        specs = precision_specs(data.identity, int(epochs), int(n) or None)
        with tempfile.TemporaryDirectory() as work:
            report = precision_agreement(data, specs, device, work)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"max |test acc bf16 - fp32| {report['max_abs_test_acc_diff_pp']:.2f} pp, train "
              f"{report['max_abs_train_acc_diff_pp']:.2f} pp, epochs to 99% {report['max_abs_epoch_diff']['0.99']}; "
              f"{out}")  # fmt: skip
    else:
        print("usage: python -m rethink.perf.bench summarize DIR_OR_JSONL | collect DIR OUT.jsonl | precision DATA_DIR "
              "DEVICE EPOCHS TRAIN_IMAGES OUT.json", file=sys.stderr)  # fmt: skip
        sys.exit(2)
