"""Checkpoints: what one holds (one function builds it, for single runs and pack members alike), how it is
validated against its run, and how it is written (the previous one kept) and read back (falling back to the
previous one when the newest is unusable). Loaded with weights_only=True: a checkpoint cannot run code.
"""

from __future__ import annotations

import io
import json

import torch

from rethink.spec import RunSpec
from rethink.store import Store
from rethink.store.runs import run_key

CHECKPOINT_FORMAT = "rethink-checkpoint-2"  # 2: the optimizer entry is train's MomentumSGD state by name


def rng_state(device: torch.device) -> dict:
    """The global random number generators (dropout) as they are now."""
    return {"torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}  # fmt: skip


def checkpoint(spec: RunSpec, device: torch.device, *, epoch: int, batch: int, step: int, model: dict,
               momentum: dict | None, loss_sum: torch.Tensor, grad_sq_sum: torch.Tensor, elapsed: float,
               metrics: list[dict], environments: list[dict] | None = None) -> dict:  # fmt: skip
    """The checkpoint of a run after `batch` batches of epoch `epoch` (0-based), `step` steps in all.

    model: the model's state dict; momentum: the optimizer's buffers by parameter name (None before a step);
    loss_sum, grad_sq_sum: the epoch's running sums; elapsed: seconds spent in the epoch so far;
    environments: where the run has trained so far (`join_environment`'s segments).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "run_id": spec.run_id,
        "spec": spec.canonical_json(),
        "epoch": epoch,
        "batch": batch,
        "step": step,
        "model": model,
        "optimizer": {"momentum_buffers": momentum or {}},
        "rng": rng_state(device),
        "loss_sum": loss_sum.detach().to("cpu", copy=True),
        "grad_sq_sum": grad_sq_sum.detach().to("cpu", copy=True),
        "elapsed_in_epoch": elapsed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "metrics": json.dumps(metrics),
        "environments": json.dumps(environments or []),
    }


def checkpoint_environments(ckpt: dict) -> list[dict]:
    """The environments a checkpointed run trained under, oldest first; for a checkpoint written before they
    were recorded, one segment from step 0 with what it did record (its device and threads)."""
    if "environments" in ckpt:
        return json.loads(ckpt["environments"])
    old = {k: ckpt[k] for k in ("device", "threads") if k in ckpt}
    return [{"from_step": 0, **old}] if old else []


def join_environment(segments: list[dict], env: dict, step: int) -> list[dict]:
    """`segments` (each an environment and the step it took over at) with `env` taking over at `step`: a new
    segment only when `env` differs from the last one (a resume on another machine, thread count or commit)."""
    if segments and {k: v for k, v in segments[-1].items() if k != "from_step"} == env:
        return segments
    return [*segments, {"from_step": step, **env}]


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


def load_checkpoint(store: Store, run_id: str, restore, log) -> tuple[dict | None, bool]:
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
    if store.exists(run_key(run_id, "checkpoint.pt")) or store.exists(run_key(run_id, "checkpoint.prev.pt")):
        log(f"run {run_id}: no usable checkpoint; starting over")
    return None, False


def save_checkpoint(store: Store, run_id: str, state: dict, rotate: bool = True) -> None:
    """Write checkpoint.pt, first keeping the current one (when `rotate`) as checkpoint.prev.pt."""
    buf = io.BytesIO()
    torch.save(state, buf)
    key = run_key(run_id, "checkpoint.pt")
    if rotate and store.exists(key):
        store.copy(key, run_key(run_id, "checkpoint.prev.pt"))
    store.write_bytes(key, buf.getvalue())
