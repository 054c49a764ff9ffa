"""How a run is executed (not what: that is the spec): the device, precision and speed options, each default
decided once (`ExecOptions.resolve`), and the environment every result records.

Torch is imported when the options are resolved, not when they are built: `rethink train` builds them before it
starts reading the data set, and imports torch while the data is read (cli.commands._data_and)."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import rethink
from rethink.errors import UserError
from rethink.revision import git_revision
from rethink.training.defaults import CHECKPOINT_MINUTES, COMPILE_MODES, LEASE_SECONDS

if TYPE_CHECKING:
    import torch

KEEP_CHECKPOINTS = ("all", "last", "none")


def _seconds_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise UserError(f"{name} must be positive, got {raw}")
    return value


@dataclass
class ExecOptions:
    """How to execute runs. None means the device's default (resolved by `resolve`)."""

    device: str = "auto"
    channels_last: bool | None = None  # default: on for convolutional models (faster on CUDA and on the CPU)
    fast_layers: bool | None = None  # exact fast forms of layers (training/fast.py); default: on for the CPU
    compile: bool = False
    compile_mode: str | None = None  # torch.compile's mode, with compile (reduce-overhead: CUDA graphs); None: torch's
    onednn: bool | None = None  # fully connected layers through oneDNN; default: on for the CPU unless compiled
    checkpoint_minutes: float = CHECKPOINT_MINUTES  # also checkpoint mid-epoch when an epoch runs longer than this
    progress: bool | None = None  # a progress bar; default: when stderr is a terminal
    eval_batch: int | None = None  # default: 4096 on CUDA; on the CPU 1000 for MLPs, 200 for convolutional models
    deadline: float | None = None  # clock() value at which to checkpoint and stop (rethink run --time-budget)
    lease_seconds: float = field(default_factory=lambda: _seconds_from_env("RETHINK_LEASE_SECONDS", LEASE_SECONDS))
    lease_wait: float | None = None  # wait this long for another trainer's lease; default: lease_seconds + 30
    keep_checkpoints: str = "last"  # of a finished run: all (both), last (checkpoint.pt), none
    clock: object = field(default=time.monotonic)  # the deadline's clock (monotonic: one per machine)
    log: object = field(default=print)

    def __post_init__(self):
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise UserError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_mode is not None and not self.compile:
            raise UserError("--compile-mode needs --compile")
        if self.keep_checkpoints not in KEEP_CHECKPOINTS:
            raise UserError(f"keep_checkpoints must be one of {', '.join(KEEP_CHECKPOINTS)}, got {self.keep_checkpoints!r}")

    def resolve(self, model: str | None = None, amp: bool = False) -> Execution:
        """These options on their device for `model` (None: any), every default decided; `amp` is the runs'
        own (RunSpec.precision: what a run computes in is part of the run, not of how it is executed)."""
        import sys

        from rethink.training import cpu

        device = resolve_device(self.device)
        cuda = device.type == "cuda"
        conv = model is not None and not model.startswith("mlp")
        # The CPU's convolutions (oneDNN) like small evaluation batches that stay in cache: 200 per pass evaluates
        # Small AlexNet ~1.5x faster than 1000 (docs/performance.md); a fully connected layer likes large ones.
        cpu_eval = 200 if conv else 1000
        return Execution(
            device=device,
            amp=bool(amp),
            channels_last=conv and (self.channels_last if self.channels_last is not None else True),
            fast_layers=conv and (self.fast_layers if self.fast_layers is not None else not cuda),
            # Not under torch.compile: inductor does its own fusions and cannot lower the oneDNN linear's weight.
            onednn=device.type == "cpu" and (self.onednn if self.onednn is not None else not self.compile)
            and cpu.available(),
            compile=self.compile,
            compile_mode=self.compile_mode if self.compile else None,
            eval_batch=self.eval_batch or (4096 if cuda else cpu_eval),
            progress=self.progress if self.progress is not None else sys.stderr.isatty(),
        )


@dataclass(frozen=True)
class Execution:
    """ExecOptions resolved on a device."""

    device: torch.device
    amp: bool
    channels_last: bool  # convolutional models only
    fast_layers: bool  # convolutional models only (training/fast.py)
    onednn: bool
    compile: bool
    eval_batch: int
    progress: bool
    compile_mode: str | None = None  # with compile; None: torch's default mode

    @property
    def precision(self) -> str:
        """What training computed in; evaluation is float32 (TF32 on CUDA) whatever this says."""
        if self.amp:
            return "bf16 autocast (training steps), float32 evaluation"
        return "float32 (TF32 matrix units allowed)" if self.device.type == "cuda" else "float32"

    def environment(self) -> dict:
        """What a result records of where and how it was computed."""
        return {**environment(self.device), "amp": self.amp, "precision": self.precision,
                "channels_last": self.channels_last, "fast_layers": self.fast_layers, "compile": self.compile,
                "onednn_linear": self.onednn,
                **({"compile_mode": self.compile_mode} if self.compile_mode else {})}  # fmt: skip


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"bad device {name!r}: use cpu, cuda, cuda:N or auto")
    return torch.device(name)


def cpu_name() -> str:
    """The CPU's model name and logical CPU count, e.g. 'AMD EPYC (2 CPUs)'."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "cpu"
    return f"{name} ({os.cpu_count()} CPUs)"


def environment(device: torch.device) -> dict:
    """The machine and software: device, torch, Python, package version, code revision, threads."""
    import torch

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rethink": rethink.__version__,
        "git": git_revision(),
        "threads": torch.get_num_threads(),
        # the vector instructions torch's CPU kernels run on (AVX512, AVX2...): the same model on the same device
        # name can differ in speed and in the last digits between two VMs that expose different ones
        **({"cpu_capability": cpu_capability()} if device.type == "cpu" else {}),
    }


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels dispatch to on this machine, e.g. 'AVX512' or 'AVX2'."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def prepare_device(device: torch.device) -> None:
    """Process-wide settings for computing on `device`: TF32 on CUDA, a warm heap on the CPU."""
    import torch

    from rethink.training import cpu

    if device.type == "cuda":
        # TF32 keeps float32's range with a 10-bit mantissa in matrix units: the "float32" of this project's
        # GPU runs (docs/protocol.md). bf16 autocast is an explicit option on top.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        cpu.keep_freed_memory()
