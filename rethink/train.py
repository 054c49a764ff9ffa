"""One run from spec to result: SGD with momentum and a decaying learning rate, resumable at any step.

The data set lives on the device; a step indexes it, so there is no host synchronisation inside an epoch (one
`.tolist()` per epoch collects the epoch's numbers). Randomness is derived from (seed, epoch): an epoch's data
order and crops can be recomputed on resume; the global RNG (dropout) is saved in every checkpoint.
"""

from __future__ import annotations

import functools
import io
import json
import math
import platform
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import rethink
from rethink.corruptions import apply_pixels, corrupt_labels
from rethink.cpu_linear import use_onednn_linears
from rethink.data import Cifar10, preprocess, preprocess_all, random_offsets
from rethink.errors import UserError
from rethink.models import build_model, decayed_parameter_names
from rethink.spec import RunSpec
from rethink.store import Store, run_key

CHECKPOINT_FORMAT = "rethink-checkpoint-2"  # 2: the optimizer has two groups (decayed weights, the rest)
# Every result records the first step at which the epoch-end training accuracy reached each of these
# (Figure 1b's time to overfit reads one of them; 99% by default, see suites.OVERFIT_THRESHOLD).
ACC_THRESHOLDS = (0.9, 0.95, 0.99, 1.0)
TIMING_FIELDS = ("epoch_seconds", "train_seconds", "eval_seconds", "images_per_second")


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written (when it fitted) and the process should exit 143."""

    exit_code = 143


class OutOfTime(Exception):
    """The time budget (ExecOptions.deadline) ended; the run's checkpoint is current, a later call resumes it."""


@dataclass
class ExecOptions:
    """How to execute a run (not what: that is the spec). None means the device's default."""

    device: str = "auto"
    amp: bool = False  # bf16 autocast of training steps (explicit: float32, TF32 on CUDA, until bf16 is validated)
    channels_last: bool | None = None  # default on for CUDA
    compile: bool = False
    onednn: bool | None = None  # fully connected layers through oneDNN; default on for the CPU (cpu_linear.py)
    checkpoint_minutes: float = 10.0  # also checkpoint mid-epoch when an epoch runs longer than this
    progress: bool | None = None  # a progress bar; default when stderr is a terminal
    eval_batch: int | None = None
    deadline: float | None = None  # clock() value at which to checkpoint and stop (rethink run --time-budget)
    clock: object = field(default=time.monotonic)  # the deadline's clock (monotonic: one per machine)
    log: object = field(default=print)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"bad device {name!r}: use cpu, cuda, cuda:N or auto")
    return torch.device(name)


def environment(device: torch.device, opts: ExecOptions | None = None) -> dict:
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rethink": rethink.__version__,
        "git": git_revision(),
        "threads": torch.get_num_threads(),
    }
    if opts is not None:
        amp = _amp(opts, device)
        env.update(amp=amp, precision=precision(amp, device), channels_last=_channels_last(opts, device),
                   compile=opts.compile, onednn_linear=_onednn(opts, device))  # fmt: skip
    return env


@functools.cache
def git_revision() -> str:
    """The code's revision: the commit of the checkout the package runs from ('+dirty' with local changes),
    else $RETHINK_GIT_REVISION (set when an image is built), else 'unknown'."""
    import os
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)  # fmt: skip
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=5)  # fmt: skip
        if rev.returncode == 0 and top.returncode == 0 and here.parent == Path(top.stdout.strip()).resolve():
            dirty = subprocess.run(["git", "-C", str(here.parent), "status", "--porcelain", "--untracked-files=no",
                                    "--", "rethink"], capture_output=True, text=True, timeout=5)  # fmt: skip
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("RETHINK_GIT_REVISION", "unknown")


def _amp(opts: ExecOptions, device: torch.device) -> bool:
    return bool(opts.amp)


def precision(amp: bool, device: torch.device) -> str:
    """What training computed in; evaluation is float32 (TF32 on CUDA) whatever this says."""
    if amp:
        return "bf16 autocast (training steps), float32 evaluation"
    return "float32 (TF32 matrix units allowed)" if device.type == "cuda" else "float32"


def prepare_device(device: torch.device) -> None:
    """Process-wide settings for computing on `device`: TF32 on CUDA, a warm heap on the CPU."""
    if device.type == "cuda":
        # TF32 keeps float32's range with a 10-bit mantissa in matrix units: the "float32" of this project's
        # GPU runs (docs/protocol.md). bf16 autocast is an explicit option on top.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()


def _onednn(opts: ExecOptions, device: torch.device) -> bool:
    from rethink.cpu_linear import available

    return device.type == "cpu" and (opts.onednn if opts.onednn is not None else True) and available()


def _channels_last(opts: ExecOptions, device: torch.device) -> bool:
    return opts.channels_last if opts.channels_last is not None else device.type == "cuda"


# ---------------------------------------------------------------------------------------------- data


@dataclass
class DeviceData:
    """A run's (corrupted) data set, resident on the training device."""

    train_pre: torch.Tensor  # central crop, standardized: [N, 3, 28, 28] float32
    train_raw: torch.Tensor | None  # raw 32x32 images for random crops (uint8, or float32 for gaussian)
    train_y: torch.Tensor
    test_pre: torch.Tensor
    test_y: torch.Tensor

    @property
    def n_train(self) -> int:
        return self.train_y.shape[0]


def prepare_data(spec: RunSpec, data: Cifar10, device: torch.device) -> DeviceData:
    """Subset, corrupt (pure functions of the spec's data seed), move to the device and preprocess there."""
    if data.identity != spec.dataset:
        raise UserError(
            f"the spec wants data set {spec.dataset!r} but {data.path} holds {data.identity!r}; "
            "point --data-dir at the right data (or pass --synthetic for synthetic specs)"
        )
    train_x, train_y = data.train_x[: spec.train_subset], data.train_y[: spec.train_subset]
    test_x, test_y = data.test_x[: spec.test_subset], data.test_y[: spec.test_subset]
    train_y = corrupt_labels(train_y, spec.label_noise, spec.data_seed)
    train_x, test_x = apply_pixels(spec.pixels, train_x, test_x, spec.data_seed)
    train_raw = torch.from_numpy(np.ascontiguousarray(train_x)).to(device)
    return DeviceData(
        train_pre=preprocess_all(train_raw),
        train_raw=train_raw if spec.random_crop else None,
        train_y=torch.from_numpy(train_y).to(device),
        test_pre=preprocess_all(torch.from_numpy(np.ascontiguousarray(test_x)).to(device)),
        test_y=torch.from_numpy(np.asarray(test_y, dtype=np.int64)).to(device),
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s data order and crops: recomputable on resume, distinct across epochs."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63)


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, channels_last: bool):
    """(summed loss, correct count) as device tensors: no host sync here.

    Always float32 logits, whatever precision training uses: these accuracies decide the thresholds and fill
    Table 1, so bf16 rounding must not move them.
    """
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, enabled=False):
            out = model(xb)
        loss += F.cross_entropy(out.float(), y[i : i + batch], reduction="sum").double()
        correct += (out.argmax(dim=1) == y[i : i + batch]).sum()
    return loss, correct


def scale_invariant_weights(model: nn.Module) -> list[nn.Parameter]:
    """Conv weights followed by BatchNorm: the network's output does not change when they are rescaled."""
    weights = []
    for module in model.modules():
        children = list(module.children())
        for a, b in zip(children, children[1:]):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                weights.append(a.weight)
    return weights


# ---------------------------------------------------------------------------------------------- checkpoints


def _load_checkpoint(store: Store, run_id: str, restore, log) -> tuple[dict | None, bool]:
    """The newest checkpoint of this run that `restore` accepts, falling back to the previous one.

    `restore(ckpt)` applies a checkpoint to the run's state and raises if it does not fit. Returns the
    checkpoint (None: start over) and whether checkpoint.pt itself was usable: only then may the next save
    rotate it into checkpoint.prev.pt, so a damaged file never replaces the good one before it.
    """
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        blob = store.read_bytes(run_key(run_id, name))
        if blob is None:
            continue
        try:
            ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not a rethink checkpoint")
            if ckpt.get("run_id") != run_id:
                raise ValueError(f"it belongs to run {ckpt.get('run_id')}")
            restore(ckpt)
            return ckpt, name == "checkpoint.pt"
        except Exception as e:
            log(f"warning: ignoring unusable {store.where(run_key(run_id, name))}: {type(e).__name__}: {e}")
    return None, False


def _save_checkpoint(store: Store, run_id: str, state: dict, rotate: bool = True) -> None:
    """Write checkpoint.pt, first keeping the current one (when `rotate`) as checkpoint.prev.pt."""
    buf = io.BytesIO()
    torch.save(state, buf)
    key = run_key(run_id, "checkpoint.pt")
    if rotate and store.exists(key):
        store.copy(key, run_key(run_id, "checkpoint.prev.pt"))
    store.write_bytes(key, buf.getvalue())


def _write_metrics(store: Store, run_id: str, metrics: list[dict]) -> None:
    store.write_text(run_key(run_id, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))


def read_result(store: Store, run_id: str, log=None) -> dict | None:
    """The run's result record; None while it has not finished, or when result.json is damaged (logged)."""
    key = run_key(run_id, "result.json")
    try:
        text = store.read_text(key)
        result = None if text is None else json.loads(text)
        if result is not None and not isinstance(result, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # only damage from outside can do this (writes are atomic): finish the run again
        if log is not None:
            log(f"warning: ignoring unreadable {store.where(key)} ({e}); the run will be finished again")
        return None
    return result


def read_metrics(store: Store, run_id: str) -> list[dict]:
    text = store.read_text(run_key(run_id, "metrics.jsonl")) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- the run


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks at each step boundary (main thread only)."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def epoch_record(epoch: int, step: int, lr: float, vals: list[float], n_train: int, n_test: int,
                 seconds: float, train_seconds: float) -> dict:  # fmt: skip
    """One line of metrics.jsonl from an epoch's host-side numbers.

    vals: [mean train loss, summed train eval loss, train correct, summed test loss, test correct] and, with
    tracked norms, [squared weight norm, mean squared gradient norm].
    """
    rec = {
        "epoch": epoch,
        "step": step,
        "lr": lr,
        "train_loss": vals[0],
        "train_acc": vals[2] / n_train,
        "train_eval_loss": vals[1] / n_train,
        "test_loss": vals[3] / n_test,
        "test_acc": vals[4] / n_test,
        "epoch_seconds": seconds,
        "train_seconds": train_seconds,
        "eval_seconds": seconds - train_seconds,
        "images_per_second": n_train / max(train_seconds, 1e-9),
    }
    if len(vals) > 5:
        rec["weight_norm"] = math.sqrt(vals[5])
        rec["effective_lr"] = lr / vals[5] if vals[5] > 0 else float("inf")
        rec["grad_norm"] = math.sqrt(vals[6])
    return rec


def stop_reason(spec: RunSpec, rec: dict) -> str:
    """'diverged' (non-finite loss), 'target' (training accuracy reached the spec's target), else 'cap'."""
    if not math.isfinite(rec["train_loss"]):
        return "diverged"
    if spec.target_train_acc is not None and rec["train_acc"] >= spec.target_train_acc:
        return "target"
    return "cap"


def first_reached(metrics: list[dict], threshold: float) -> dict | None:
    """The first epoch record whose (epoch-end, whole training set) accuracy is >= threshold, else None."""
    return next((m for m in metrics if m["train_acc"] >= threshold), None)


def summarize(spec: RunSpec, metrics: list[dict], stopped: str, env: dict, data: dict | str) -> dict:
    """The result record: final and best accuracies, time to each accuracy and loss threshold, provenance."""
    last = metrics[-1]
    best = max(metrics, key=lambda m: m["test_acc"])
    target_step = target_epoch = None
    if spec.target_train_acc is not None:
        hit = first_reached(metrics, spec.target_train_acc)
        if hit:
            target_step, target_epoch = hit["step"], hit["epoch"]
    acc_steps, acc_epochs = {}, {}
    for t in ACC_THRESHOLDS:
        hit = first_reached(metrics, t)
        acc_steps[f"{t:g}"] = hit["step"] if hit else None
        acc_epochs[f"{t:g}"] = hit["epoch"] if hit else None
    thresholds = {}
    for t in spec.loss_thresholds:
        hit = next((m for m in metrics if m["train_loss"] < t), None)
        thresholds[f"{t:g}"] = hit["step"] if hit else None
    return {
        "run_id": spec.run_id,
        "spec": spec.to_dict(),
        "status": "finished",
        "stopped": stopped,  # "target", "cap" or "diverged"
        "epochs": last["epoch"],
        "steps": last["step"],
        "final_train_acc": last["train_acc"],
        "final_train_loss": last["train_loss"],
        "final_test_acc": last["test_acc"],
        "best_test_acc": best["test_acc"],
        "best_test_epoch": best["epoch"],
        "target_train_acc": spec.target_train_acc,
        "target_step": target_step,
        "target_epoch": target_epoch,
        "train_acc_steps": acc_steps,  # threshold -> first step with epoch-end train accuracy >= it
        "train_acc_epochs": acc_epochs,
        "loss_threshold_steps": thresholds,
        "train_seconds": sum(m["train_seconds"] for m in metrics),
        "total_seconds": sum(m["epoch_seconds"] for m in metrics),
        "synthetic": spec.synthetic,
        "data": data,
        "environment": env,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class EpochSteps:
    """An epoch's step boundaries: the progress bar, SIGTERM (checkpoint, then Preempted) and timed checkpoints.

    `save(batch, seconds)` writes the checkpoint(s) after `batch` batches, `seconds` into the epoch.
    """

    def __init__(self, sigterm, save, n_batches: int, start: int, minutes: float, progress: bool, desc: str,
                 what: str, deadline: float | None = None, clock=time.monotonic):  # fmt: skip
        self.sigterm, self.save, self.n_batches, self.minutes, self.what = sigterm, save, n_batches, minutes, what
        self.deadline, self.clock = deadline, clock
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=n_batches, initial=start, desc=desc, leave=False, file=sys.stderr)

    def after(self, b: int) -> None:
        """Batch `b` is done: checkpoint and raise Preempted on SIGTERM, or checkpoint when one is due."""
        if self.bar is not None:
            self.bar.update(1)
        now = time.perf_counter()
        if self.sigterm.set:
            self.close()
            self.save(b + 1, now - self.t0)
            raise Preempted(f"{self.what}: SIGTERM; checkpoint written after batch {b + 1}, exiting 143")
        if self.deadline is not None and b + 1 < self.n_batches and self.clock() >= self.deadline:
            self.close()
            self.save(b + 1, now - self.t0)
            raise OutOfTime(f"{self.what}: time budget spent; checkpoint written after batch {b + 1}")
        if b + 1 < self.n_batches and now - self.last > 60 * self.minutes:
            self.save(b + 1, now - self.t0)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def seed_dropout(seed: int, epoch: int, saved: dict | None, device: torch.device) -> None:
    """Set the global RNG (dropout) for an epoch: from (seed, epoch) at its start, from `saved` mid-epoch."""
    if saved is None:
        torch.manual_seed(epoch_seed(seed, epoch) + 1)
        return
    torch.set_rng_state(saved["torch"].cpu())
    if "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"].cpu(), device)


def checkpoint_position(ckpt: dict, spec: RunSpec, n_batches: int) -> tuple[int, int, int, list[dict]]:
    """(epoch, batch, step, metrics) of a checkpoint of `spec`, or ValueError when they do not fit together."""
    if ckpt["spec"] != spec.canonical_json():
        raise ValueError("it was written for a different spec")
    epoch, batch, step = int(ckpt["epoch"]), int(ckpt["batch"]), int(ckpt["step"])
    metrics = json.loads(ckpt["metrics"])
    if not (0 <= epoch < spec.epochs and 0 <= batch <= n_batches and len(metrics) == epoch
            and step == epoch * n_batches + batch):  # fmt: skip
        raise ValueError(f"inconsistent position (epoch {epoch}, batch {batch}, step {step})")
    rng = ckpt["rng"]
    if rng["torch"].dtype != torch.uint8 or rng["torch"].numel() != torch.get_rng_state().numel():
        raise ValueError("bad random number generator state")
    return epoch, batch, step, metrics


def batch_inputs(dd: DeviceData, idx: torch.Tensor, offsets: torch.Tensor | None, channels_last: bool):
    """The preprocessed inputs and labels of the training images `idx` (random crops when offsets are given)."""
    x = preprocess(dd.train_raw[idx], offsets[idx]) if offsets is not None else dd.train_pre[idx]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, dd.train_y[idx]


class MomentumSGD:
    """SGD with momentum and coupled weight decay on some parameters: torch.optim.SGD's update, op for op.

    d = g + wd * w (decayed parameters only), buf = momentum * buf + d (buf = d at the first step),
    w -= lr * buf; dampening 0, no Nesterov: the same foreach kernels in the same order as torch.optim.SGD
    with foreach=True, so the numbers are bit-identical to it (a test compares them). Written out because
    torch.optim imports torch._dynamo on first use (about a second per process, a third of a short run's
    overhead), and so that packs (pack.PackedModel) and single runs share one definition of a step.
    """

    def __init__(self, named_params: list[tuple[str, torch.Tensor]], decayed: set[str], lr: float,
                 momentum: float, weight_decay: float):  # fmt: skip
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decayed = [i for i, n in enumerate(self.names) if n in decayed]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor] | None = None  # created at the first step (never with momentum 0)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.weight_decay != 0 and self.decayed:
            decayed = torch._foreach_add([grads[i] for i in self.decayed], [self.params[i] for i in self.decayed],
                                         alpha=self.weight_decay)  # fmt: skip
            for i, g in zip(self.decayed, decayed):
                grads[i] = g
        if self.momentum != 0:
            if self.buffers is None:
                self.buffers = [torch.clone(g).detach() for g in grads]
            else:
                torch._foreach_mul_(self.buffers, self.momentum)
                torch._foreach_add_(self.buffers, grads, alpha=1)
            grads = self.buffers
        torch._foreach_add_(self.params, grads, alpha=-self.lr)

    def state_dict(self) -> dict:
        """The checkpoint's optimizer entry: momentum buffers by parameter name (none before the first step)."""
        return {"momentum_buffers": {} if self.buffers is None else dict(zip(self.names, self.buffers))}

    def load_state_dict(self, state: dict) -> None:
        """Take over a checkpoint's buffers; ValueError when they do not fit these parameters."""
        bufs = state["momentum_buffers"]
        if not bufs:
            self.buffers = None
            return
        if list(bufs) != self.names or any(b.shape != p.shape for b, p in zip(bufs.values(), self.params)):
            raise ValueError("momentum buffers that do not fit the model")
        self.buffers = [b.to(device=p.device, dtype=p.dtype).clone() for b, p in zip(bufs.values(), self.params)]


def make_sgd(model: nn.Module, spec: RunSpec, device: torch.device | None = None) -> MomentumSGD:
    """The run's optimizer: SGD with momentum; weight decay (coupled) on the kernels only.

    The decayed parameters are models.decayed_parameter_names: kernels of convolutional and linear layers,
    not biases or BatchNorm offsets.
    """
    return MomentumSGD(list(model.named_parameters()), set(decayed_parameter_names(model)), spec.lr, spec.momentum,
                       spec.weight_decay)  # fmt: skip


def sgd_step(model, optimizer, x, y, amp: bool, tracked: list | None = None):
    """One SGD step; returns the batch loss and (with `tracked` weights) their squared gradient norm, on device."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    loss = F.cross_entropy(out.float(), y)
    optimizer.zero_grad()
    loss.backward()
    grad_sq = sum(w.grad.double().pow(2).sum() for w in tracked) if tracked else None
    optimizer.step()
    return loss.detach(), grad_sq


def keep_freed_memory() -> None:
    """On glibc, keep freed blocks up to 32 MB in the heap instead of returning them to the OS.

    Every CPU step allocates and frees the same activation and gradient buffers (megabytes each); by default
    glibc maps and unmaps them each time, and the page faults cost ~10% of an MLP step on the CPU.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: the largest glibc allows
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def train_run(spec: RunSpec, store: Store, data: Cifar10, opts: ExecOptions | None = None) -> dict:
    """Train `spec` to its end in `store`, resuming from its checkpoint; returns the result record."""
    # SIGTERM is caught from the start: one arriving while the data loads still stops the run cleanly
    # (at its first step boundary) instead of killing it.
    with _SigtermFlag() as sigterm:
        return _train(spec, store, data, opts or ExecOptions(), sigterm)


def _train(spec: RunSpec, store: Store, data: Cifar10, opts: ExecOptions, sigterm: _SigtermFlag) -> dict:
    log = opts.log
    run_id = spec.run_id
    done = read_result(store, run_id, log)
    if done is not None:
        log(f"run {run_id} ({spec.label()}) is already finished: {store.where(run_key(run_id, 'result.json'))}")
        return done
    device = resolve_device(opts.device)
    amp, channels_last = _amp(opts, device), _channels_last(opts, device)
    env = environment(device, opts)
    prepare_device(device)

    spec_key = run_key(run_id, "spec.json")
    if not store.exists(spec_key):
        store.write_text(spec_key, json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")

    dd = prepare_data(spec, data, device)
    is_conv = not spec.model.startswith("mlp")
    use_cl = channels_last and is_conv

    def fresh():
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, dropout=spec.dropout).to(device)
        if _onednn(opts, device):
            use_onednn_linears(model)
        if use_cl:
            model = model.to(memory_format=torch.channels_last)
        return model, make_sgd(model, spec, device)

    n = dd.n_train
    bs = spec.batch_size
    n_batches = math.ceil(n / bs)
    model, optimizer = fresh()
    metrics: list[dict] = []
    epoch, batch_start, step = 0, 0, 0
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    grad_sq_sum = torch.zeros((), device=device, dtype=torch.float64)
    elapsed_in_epoch = 0.0
    rng_state = None

    def restore(ckpt: dict) -> None:
        """Take over a checkpoint's state, or raise (leaving a fresh model) when it does not fit this run."""
        nonlocal model, optimizer, metrics, epoch, batch_start, step, loss_sum, grad_sq_sum
        nonlocal elapsed_in_epoch, rng_state
        c_epoch, c_batch, c_step, c_metrics = checkpoint_position(ckpt, spec, n_batches)
        rng = ckpt["rng"]
        c_loss_sum = ckpt["loss_sum"].to(device=device, dtype=torch.float64).reshape(())
        c_grad_sq_sum = ckpt["grad_sq_sum"].to(device=device, dtype=torch.float64).reshape(())
        c_elapsed = float(ckpt["elapsed_in_epoch"])
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except Exception:
            model, optimizer = fresh()  # the failed load may have changed some weights already
            raise
        metrics, epoch, batch_start, step = c_metrics, c_epoch, c_batch, c_step
        loss_sum, grad_sq_sum, elapsed_in_epoch, rng_state = c_loss_sum, c_grad_sq_sum, c_elapsed, rng

    ckpt, rotate = _load_checkpoint(store, run_id, restore, log)
    if ckpt is not None:
        log(f"run {run_id}: resuming at epoch {epoch + 1}, batch {batch_start} (step {step})")
        was = (ckpt.get("device"), ckpt.get("threads"))
        now = (str(device), torch.get_num_threads())
        if was[0] is not None and was != now:  # kernels (and their sums) differ with either
            log(f"warning: run {run_id} was checkpointed on {was[0]} (threads={was[1]}) and resumes on {now[0]} "
                f"(threads={now[1]}): later epochs may differ from an uninterrupted run in the last digits")  # fmt: skip
    elif store.exists(run_key(run_id, "checkpoint.pt")) or store.exists(run_key(run_id, "checkpoint.prev.pt")):
        log(f"run {run_id}: no usable checkpoint; starting over")
    _write_metrics(store, run_id, metrics)  # drop any line written after the checkpoint we resume from
    tracked = scale_invariant_weights(model) if spec.track_norms else []
    compiled = torch.compile(model) if opts.compile else model

    eval_batch = opts.eval_batch or (4096 if device.type == "cuda" else 1000)
    stopped = "cap"
    progress = opts.progress if opts.progress is not None else sys.stderr.isatty()
    log(f"run {run_id} ({spec.label()}): {n} train / {dd.test_y.shape[0]} test images on {device}; "
        f"results in {store.where(f'runs/{run_id}')}")  # fmt: skip

    def state(batch: int, t_epoch: float) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "run_id": run_id,
            "spec": spec.canonical_json(),
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            },
            "loss_sum": loss_sum,
            "grad_sq_sum": grad_sq_sum,
            "elapsed_in_epoch": t_epoch,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "metrics": json.dumps(metrics),
        }

    def save(batch: int, t_epoch: float) -> None:
        nonlocal rotate
        _save_checkpoint(store, run_id, state(batch, t_epoch), rotate)
        rotate = True  # what we just wrote is good

    while epoch < spec.epochs:
        lr = spec.lr * spec.lr_decay**epoch
        optimizer.lr = lr
        g = torch.Generator(device=device)
        g.manual_seed(epoch_seed(spec.seed, epoch))
        perm = torch.randperm(n, generator=g, device=device)
        offsets = random_offsets(n, g, device) if spec.random_crop else None
        seed_dropout(spec.seed, epoch, rng_state if batch_start > 0 else None, device)
        rng_state = None
        compiled.train()
        steps = EpochSteps(
            sigterm, lambda batch, t, before=elapsed_in_epoch: save(batch, before + t), n_batches, batch_start,
            opts.checkpoint_minutes, progress, f"epoch {epoch + 1}/{spec.epochs}", f"run {run_id}",
            opts.deadline, opts.clock,
        )  # fmt: skip
        t0 = steps.t0
        for b in range(batch_start, n_batches):
            x, y = batch_inputs(dd, perm[b * bs : (b + 1) * bs], offsets, use_cl)
            loss, grad_sq = sgd_step(compiled, optimizer, x, y, amp, tracked)
            if grad_sq is not None:
                grad_sq_sum += grad_sq
            loss_sum += loss.double()
            step += 1
            steps.after(b)
        steps.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_train = time.perf_counter() - t0 + elapsed_in_epoch
        batches_run = n_batches
        tl, tc = evaluate(compiled, dd.train_pre, dd.train_y, eval_batch, use_cl)
        vl, vc = evaluate(compiled, dd.test_pre, dd.test_y, eval_batch, use_cl)
        extra = []
        if tracked:
            wsq = sum(w.detach().double().pow(2).sum() for w in tracked)
            extra = [wsq, grad_sq_sum / batches_run]
        vals = torch.stack([loss_sum / batches_run, tl, tc.double(), vl, vc.double(), *extra]).tolist()
        t_epoch = time.perf_counter() - t0 + elapsed_in_epoch
        epoch += 1
        m = epoch_record(epoch, step, lr, vals, n, dd.test_y.shape[0], t_epoch, t_train)
        metrics.append(m)
        batch_start, elapsed_in_epoch = 0, 0.0
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        grad_sq_sum = torch.zeros((), device=device, dtype=torch.float64)
        log(f"run {run_id} epoch {epoch}/{spec.epochs}: loss {m['train_loss']:.4f} train acc "
            f"{m['train_acc']:.4f} test acc {m['test_acc']:.4f} ({m['images_per_second']:.0f} img/s)")  # fmt: skip
        _write_metrics(store, run_id, metrics)
        stopped = stop_reason(spec, m)
        if stopped != "cap" or epoch == spec.epochs:
            break
        save(0, 0.0)
        if opts.deadline is not None and opts.clock() >= opts.deadline:
            raise OutOfTime(f"run {run_id}: time budget spent after epoch {epoch}; checkpoint written")

    result = summarize(spec, metrics, stopped, env, data.provenance())
    store.write_text(run_key(run_id, "result.json"), json.dumps(result, indent=2) + "\n")
    store.delete(run_key(run_id, "error.json"))
    log(f"run {run_id} finished ({stopped}): train acc {result['final_train_acc']:.4f}, "
        f"test acc {result['final_test_acc']:.4f}; {store.where(run_key(run_id, 'result.json'))}")  # fmt: skip
    return result
