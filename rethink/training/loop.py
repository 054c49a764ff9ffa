"""The pieces the engine's epoch loop (trainer.train_members) is built from: the step boundaries (progress bar,
SIGTERM, the time budget, timed checkpoints), evaluation in float32, one SGD step of a plain module, and the
end of a run (its result record: thresholds and provenance).
"""

from __future__ import annotations

import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from rethink.data.device import epoch_seed
from rethink.errors import Stopped
from rethink.spec import RunSpec
from rethink.store import Store
from rethink.store.runs import prune_checkpoints, run_key, write_result
from rethink.summary import summarize


class Preempted(Stopped):
    """SIGTERM arrived; a checkpoint was written (when it fitted) and the process should exit 143."""

    exit_code = 143


class OutOfTime(Stopped):
    """The time budget (ExecOptions.deadline) ended; the run's checkpoint is current, a later call resumes it."""

    exit_code = 0


class SigtermFlag:
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


class EpochSteps:
    """An epoch's step boundaries: the progress bar, SIGTERM (checkpoint, then Preempted) and timed checkpoints.

    `save(batch, seconds)` writes the checkpoint(s) after `batch` batches, `seconds` into the epoch (counting the
    `before` seconds the epoch had run before a resume).
    """

    def __init__(self, sigterm, save, n_batches: int, start: int, minutes: float, progress: bool, desc: str,
                 what: str, deadline: float | None = None, clock=time.monotonic, before: float = 0.0,
                 on_step=None):  # fmt: skip
        self.sigterm, self.save, self.n_batches, self.minutes, self.what = sigterm, save, n_batches, minutes, what
        self.before, self.on_step = before, on_step
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
        if self.on_step is not None:
            self.on_step()  # e.g. renew the run's lease (rate-limited by the callee)
        now = time.perf_counter()
        if self.sigterm.set:
            self.close()
            self.save(b + 1, self.before + now - self.t0)
            raise Preempted(f"{self.what}: SIGTERM; checkpoint written after batch {b + 1}, exiting 143")
        if self.deadline is not None and b + 1 < self.n_batches and self.clock() >= self.deadline:
            self.close()
            self.save(b + 1, self.before + now - self.t0)
            raise OutOfTime(f"{self.what}: time budget spent; checkpoint written after batch {b + 1}")
        if b + 1 < self.n_batches and now - self.last > 60 * self.minutes:
            self.save(b + 1, self.before + now - self.t0)
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


def finish_run(store: Store, spec: RunSpec, metrics: list[dict], stopped: str, env: dict, data: dict, log,
               where: str = "", keep_checkpoints: str = "last", environments: list[dict] | None = None) -> dict:  # fmt: skip
    """Write the run's result record (the run is finished from now on), prune its checkpoints, say so; returns
    the record. `environments`: where the run trained, segment by segment (recorded when there is more than one)."""
    result = summarize(spec, metrics, stopped, env, data, environments)
    write_result(store, spec.run_id, result)
    prune_checkpoints(store, spec.run_id, keep_checkpoints)
    log(f"run {spec.run_id} finished ({stopped}){where}: train acc {result['final_train_acc']:.4f}, "
        f"test acc {result['final_test_acc']:.4f}; {store.where(run_key(spec.run_id, 'result.json'))}")  # fmt: skip
    return result
