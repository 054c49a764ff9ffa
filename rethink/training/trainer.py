"""The training engine: K runs of one architecture and schedule from their specs to their results, resumable at
any step; a single run is the case K = 1.

One epoch loop (`train_members`), one per-run state (`RunProgress`), one restore from a checkpoint
(`restore_run`), one schedule (`learning_rate`) and one end of epoch (evaluate, record, checkpoint, stop). What
differs between one run and a pack is the step: a plain module and its optimizer (`SingleStep`, here) or the
K models stacked and vmapped (`packed.PackStep`); both offer the small interface `Step` describes.

The data set lives on the device; a step indexes it, so there is no host synchronisation inside an epoch (one
`.tolist()` per epoch collects the epoch's numbers). Randomness is derived from (seed, epoch): an epoch's data
order and crops are recomputed on resume; the global RNG (dropout) is saved in every checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from rethink.data.cifar import Cifar10
from rethink.data.device import DeviceData, batch_inputs, epoch_order, prepare_data
from rethink.models import build_model
from rethink.spec import RunSpec
from rethink.store import Store
from rethink.store.lease import Lease
from rethink.store.runs import run_dir, run_key, run_state, write_metrics, write_spec
from rethink.summary import epoch_record, stop_reason
from rethink.training.checkpoint import (
    checkpoint,
    checkpoint_environments,
    checkpoint_position,
    join_environment,
    load_checkpoint,
    save_checkpoint,
)
from rethink.training.cpu import use_onednn_linears
from rethink.training.fast import use_fast_layers
from rethink.training.loop import (
    EpochSteps,
    OutOfTime,
    SigtermFlag,
    evaluate,
    finish_run,
    scale_invariant_weights,
    seed_dropout,
    sgd_step,
)
from rethink.training.optim import MomentumSGD, make_sgd
from rethink.training.options import ExecOptions, Execution, environment, prepare_device


def learning_rate(spec: RunSpec, epoch: int) -> float:
    """The rate of epoch `epoch` (0-based): the initial rate times lr_decay per finished epoch (x0.95 in the paper)."""
    return spec.lr * spec.lr_decay**epoch


# ---------------------------------------------------------------------------------------------- one run's state


@dataclass
class RunProgress:
    """One run between two steps: where it is, what it has gathered, and its model and optimizer (a checkpoint
    holds all of it). Not the store's view of a run (store.runs.RunStatus: finished, partial, failed...)."""

    spec: RunSpec
    model: torch.nn.Module  # K = 1: the module that trains; in a pack: the source of the member's stacked state
    optimizer: MomentumSGD
    epoch: int  # epochs completed
    batch: int  # batches done in the current epoch
    step: int
    metrics: list[dict]
    loss_sum: torch.Tensor  # the current epoch's sum of batch losses, float64 on the device
    grad_sq_sum: torch.Tensor  # ... and of the tracked weights' squared gradient norms
    elapsed: float = 0.0  # seconds spent in the current epoch before this process took over
    rng: dict | None = field(default=None, repr=False)  # the dropout RNG to resume mid-epoch with
    rotate: bool = False  # whether the next checkpoint may keep checkpoint.pt as checkpoint.prev.pt
    environments: list[dict] = field(default_factory=list)  # where it trained so far (checkpoint.join_environment)

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.batch)


def fresh_run(spec: RunSpec, build: Callable[[RunSpec], torch.nn.Module], device: torch.device) -> RunProgress:
    """The run at its start: `build`'s fresh model, a fresh optimizer, nothing gathered."""
    model = build(spec)
    zero = torch.zeros((), device=device, dtype=torch.float64)
    return RunProgress(spec, model, make_sgd(model, spec), 0, 0, 0, [], zero, zero.clone())


def restore_run(spec: RunSpec, store: Store, build: Callable[[RunSpec], torch.nn.Module], device: torch.device,
                n_batches: int, log) -> RunProgress:  # fmt: skip
    """The run's model, optimizer and position from its newest usable checkpoint, else fresh (`build` makes the
    fresh model: seeded by the spec, in the layers and memory format the step will use)."""
    built: dict = {}

    def fresh() -> None:
        built["run"] = fresh_run(spec, build, device)

    def restore(ckpt: dict) -> None:
        """Take over a checkpoint's state, or raise (leaving a fresh model) when it does not fit this run."""
        epoch, batch, step, metrics = checkpoint_position(ckpt, spec, n_batches)
        sums = [ckpt[k].to(device=device, dtype=torch.float64).reshape(()) for k in ("loss_sum", "grad_sq_sum")]
        run = built["run"]
        try:
            run.model.load_state_dict(ckpt["model"])
            run.optimizer.load_state_dict(ckpt["optimizer"])
            if spec.momentum != 0 and step > 0 and run.optimizer.buffers is None:
                raise ValueError("no momentum buffers after a step")
        except Exception:
            fresh()  # the failed load may have changed some weights already
            raise
        built["run"] = RunProgress(spec, run.model, run.optimizer, epoch, batch, step, metrics, *sums,
                                   float(ckpt["elapsed_in_epoch"]), ckpt["rng"],
                                   environments=checkpoint_environments(ckpt))  # fmt: skip

    fresh()
    ckpt, rotate = load_checkpoint(store, spec.run_id, restore, log)
    run = built["run"]
    run.rotate = rotate
    if ckpt is not None:
        log(f"run {spec.run_id}: resuming at epoch {run.epoch + 1}, batch {run.batch} (step {run.step})")
        last, now = run.environments[-1] if run.environments else {}, environment(device)
        # what the kernels (and their sums) depend on; a checkpoint from before cpu_capability lacks it
        keys = [k for k in ("device", "threads", "cpu_capability") if k in last and k in now]
        if any(last[k] != now[k] for k in keys):
            log(f"warning: run {spec.run_id} was checkpointed on {', '.join(f'{k}={last[k]}' for k in keys)} and "
                f"resumes on {', '.join(f'{k}={now[k]}' for k in keys)}: later epochs may differ from an "
                "uninterrupted run in the last digits (its result lists both)")  # fmt: skip
    return run


# ---------------------------------------------------------------------------------------------- the step


class Step(Protocol):
    """What differs between one run and a pack of K: how a batch is drawn and stepped, how the models are
    evaluated, and how a member's state is read back. Every tensor it returns has a leading dimension K."""

    ex: Execution  # the resolved execution: device, precision, evaluation batch, progress bar
    device: torch.device
    n_train: int
    n_test: int

    def begin_epoch(self, epoch: int) -> None:
        """Draw the epoch's data order (and crops) for every member; training mode."""

    def train(self, b: int, lr: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SGD on batch b of the epoch: the losses [K] and the tracked weights' squared gradient norms [K]."""

    def evaluate(self) -> list[torch.Tensor]:
        """[summed train loss, train correct, summed test loss, test correct], each [K], on the device."""

    def weight_sq(self) -> torch.Tensor | None:
        """The tracked (scale-invariant) weights' squared norm [K], or None when norms are not tracked."""

    def member_state(self, k: int) -> tuple[dict, dict | None]:
        """Member k's model state dict and momentum buffers by name (None before a step), for its checkpoint."""

    def keep(self, idx: list[int]) -> None:
        """Only the members in `idx` train on (the others stopped)."""


def build_run_model(spec: RunSpec, ex: Execution) -> torch.nn.Module:
    """The run's fresh model on its device, seeded by the spec, in the execution's layers and memory format."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, dropout=spec.dropout)
    if ex.fast_layers:
        use_fast_layers(model)
    model = model.to(ex.device)
    if ex.onednn:
        use_onednn_linears(model)
    if ex.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class SingleStep:
    """The step of one run (K = 1): its module and optimizer on its device-resident data."""

    def __init__(self, run: RunProgress, dd: DeviceData, ex: Execution, compile_mode: str | None = None):
        self.spec, self.model, self.opt, self.dd, self.ex = run.spec, run.model, run.optimizer, dd, ex
        self.device, self.n_train, self.n_test = ex.device, dd.n_train, dd.test_y.shape[0]
        self.tracked = scale_invariant_weights(self.model) if run.spec.track_norms else []
        self.net = torch.compile(self.model, mode=compile_mode or ex.compile_mode) if ex.compile else self.model
        self.perm = self.offsets = None

    def begin_epoch(self, epoch: int) -> None:
        s = self.spec
        self.perm, self.offsets = epoch_order(s.seed, epoch, self.n_train, s.random_crop, self.device)
        self.net.train()

    def train(self, b: int, lr: float):
        bs = self.spec.batch_size
        x, y = batch_inputs(self.dd, self.perm[b * bs : (b + 1) * bs], self.offsets, self.ex.channels_last)
        self.opt.lr = lr
        loss, grad_sq = sgd_step(self.net, self.opt, x, y, self.ex.amp, self.tracked)
        return loss.reshape(1), None if grad_sq is None else grad_sq.reshape(1)

    def evaluate(self) -> list[torch.Tensor]:
        dd, cl, batch = self.dd, self.ex.channels_last, self.ex.eval_batch
        tl, tc = evaluate(self.net, dd.train_pre, dd.train_y, batch, cl)
        vl, vc = evaluate(self.net, dd.test_pre, dd.test_y, batch, cl)
        return [t.reshape(1) for t in (tl, tc, vl, vc)]

    def weight_sq(self) -> torch.Tensor | None:
        if not self.tracked:
            return None
        return sum(w.detach().double().pow(2).sum() for w in self.tracked).reshape(1)

    def member_state(self, k: int) -> tuple[dict, dict | None]:
        return self.model.state_dict(), self.opt.state_dict()["momentum_buffers"] or None

    def keep(self, idx: list[int]) -> None:
        if idx != [0]:
            raise ValueError("a single run has one member")


# ---------------------------------------------------------------------------------------------- the loop


def train_members(runs: list[RunProgress], step: Step, store: Store, data: Cifar10, opts: ExecOptions,
                  sigterm: SigtermFlag, leases: dict[str, Lease], env: dict) -> dict[str, dict]:  # fmt: skip
    """Train runs that stand at the same position, through `step`, each to its end (its cap, its target or a
    divergence); returns {run_id: result record}. The one epoch loop of the engine."""
    log, single = opts.log, len(runs) == 1
    spec0, device = runs[0].spec, step.device
    n, n_test = step.n_train, step.n_test
    n_batches = math.ceil(n / spec0.batch_size)
    epoch, batch_start, steps_done = runs[0].epoch, runs[0].batch, runs[0].step
    loss_sum = torch.stack([r.loss_sum for r in runs])
    grad_sq_sum = torch.stack([r.grad_sq_sum for r in runs])
    elapsed = [r.elapsed for r in runs]
    rng = runs[0].rng if batch_start > 0 else None
    results: dict[str, dict] = {}
    for r in runs:  # this process takes over here: a new segment when it differs from where the run trained before
        r.environments = join_environment(r.environments, env, r.step)

    def what() -> str:
        return f"run {spec0.run_id}" if single else f"pack of {len(runs)}"

    def renew(force: bool = False) -> None:
        for r in runs:
            leases[r.spec.run_id].renew(force)

    def save(batch: int, seconds: float) -> None:
        renew(force=True)  # a trainer that lost a lease stops before it writes
        for k, r in enumerate(runs):
            model, momentum = step.member_state(k)
            save_checkpoint(store, r.spec.run_id, checkpoint(
                r.spec, device, epoch=epoch, batch=batch, step=steps_done, model=model, momentum=momentum,
                loss_sum=loss_sum[k], grad_sq_sum=grad_sq_sum[k], elapsed=elapsed[k] + seconds,
                metrics=r.metrics, environments=r.environments), r.rotate)  # fmt: skip
            r.rotate = True  # what we just wrote is good

    while runs:
        lr = learning_rate(spec0, epoch)
        step.begin_epoch(epoch)
        seed_dropout(spec0.seed, epoch, rng, device)
        rng = None
        desc = f"epoch {epoch + 1}/{spec0.epochs}" if single else f"pack epoch {epoch + 1}/{spec0.epochs}"
        steps = EpochSteps(sigterm, save, n_batches, batch_start, opts.checkpoint_minutes, step.ex.progress, desc,
                           what(), opts.deadline, opts.clock, on_step=renew)  # fmt: skip
        for b in range(batch_start, n_batches):
            losses, grad_sq = step.train(b, lr)
            loss_sum += losses.double()
            if grad_sq is not None:
                grad_sq_sum += grad_sq
            steps_done += 1
            steps.after(b)
        steps.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_train = time.perf_counter() - steps.t0
        tl, tc, vl, vc = step.evaluate()
        rows = [loss_sum / n_batches, tl, tc.double(), vl, vc.double()]
        wsq = step.weight_sq()
        if wsq is not None:
            rows += [wsq, grad_sq_sum / n_batches]
        vals = torch.stack(rows).T.tolist()  # the epoch's one host sync
        t_epoch = time.perf_counter() - steps.t0
        epoch += 1
        records = [epoch_record(epoch, steps_done, lr, v, n, n_test, elapsed[k] + t_epoch, elapsed[k] + t_train)
                   for k, v in enumerate(vals)]  # fmt: skip
        if single:
            rec = records[0]
            log(f"run {spec0.run_id} epoch {epoch}/{spec0.epochs}: loss {rec['train_loss']:.4f} train acc "
                f"{rec['train_acc']:.4f} test acc {rec['test_acc']:.4f} ({rec['images_per_second']:.0f} img/s)")  # fmt: skip
        else:
            accs = [r["train_acc"] for r in records]
            log(f"pack epoch {epoch}/{spec0.epochs}: {len(runs)} runs, train loss "
                f"{min(v[0] for v in vals):.4f}..{max(v[0] for v in vals):.4f}, train acc {min(accs):.4f}.."
                f"{max(accs):.4f} ({len(runs) * n / max(t_train, 1e-9):.0f} img/s)")  # fmt: skip
        renew(force=True)
        keep: list[int] = []
        for k, (r, rec) in enumerate(zip(runs, records)):
            r.metrics = [*r.metrics, rec]
            write_metrics(store, r.spec.run_id, r.metrics)
            stopped = stop_reason(r.spec, rec)
            if stopped != "cap" or epoch == r.spec.epochs:
                results[r.spec.run_id] = finish_run(store, r.spec, r.metrics, stopped, env, data.provenance(), log,
                                                    "" if single else " in a pack", opts.keep_checkpoints,
                                                    r.environments)  # fmt: skip
            else:
                keep.append(k)
        batch_start = 0
        loss_sum = torch.zeros(len(runs), device=device, dtype=torch.float64)
        grad_sq_sum = torch.zeros(len(runs), device=device, dtype=torch.float64)
        elapsed = [0.0] * len(runs)
        if len(keep) < len(runs):
            runs = [runs[k] for k in keep]
            if not runs:
                break
            step.keep(keep)
            loss_sum, grad_sq_sum, elapsed = loss_sum[: len(keep)], grad_sq_sum[: len(keep)], elapsed[: len(keep)]
        save(0, 0.0)
        if opts.deadline is not None and opts.clock() >= opts.deadline:
            raise OutOfTime(f"{what()}: time budget spent after epoch {epoch}; "
                            f"{'checkpoint' if single else 'checkpoints'} written")  # fmt: skip
    return results


# ---------------------------------------------------------------------------------------------- one run


def train_run(spec: RunSpec, store: Store, data: Cifar10, opts: ExecOptions | None = None) -> dict:
    """Train `spec` to its end in `store`, resuming from its checkpoint; returns the result record."""
    opts = opts or ExecOptions()
    log, rid = opts.log, spec.run_id
    # SIGTERM is caught from the start: one arriving while the data loads still stops the run cleanly (at its
    # first step boundary) instead of killing it.
    with SigtermFlag() as sigterm:
        found = run_state(store, spec)
        if found.finished:
            log(f"run {rid} ({spec.label()}) is already finished: {store.where(run_key(rid, 'result.json'))}")
            return found.result
        lease = Lease(store, rid, ttl=opts.lease_seconds)
        wait = opts.lease_wait if opts.lease_wait is not None else opts.lease_seconds + 30
        if not lease.acquire(wait, finished=lambda: run_state(store, spec).finished, log=log):
            log(f"run {rid} was finished by another trainer meanwhile")
            return run_state(store, spec).result
        try:
            return _train(spec, store, data, opts, sigterm, lease)
        finally:
            lease.release()


def _train(spec: RunSpec, store: Store, data: Cifar10, opts: ExecOptions, sigterm: SigtermFlag, lease: Lease) -> dict:
    """The run, its lease held: the engine with K = 1."""
    log, rid = opts.log, spec.run_id
    found = run_state(store, spec)  # again: another trainer may have finished it before we took the lease
    if found.finished:
        log(f"run {rid} was finished by another trainer meanwhile")
        return found.result
    if found.state == "damaged":
        log(f"warning: {found.detail}")
    store.sweep_temporaries(run_dir(rid))  # what a killed write left: no one else writes here now
    ex = opts.resolve(spec.model, amp=spec.amp)
    prepare_device(ex.device)
    write_spec(store, spec)
    dd = prepare_data(spec, data, ex.device)
    n_batches = math.ceil(dd.n_train / spec.batch_size)
    run = restore_run(spec, store, lambda s: build_run_model(s, ex), ex.device, n_batches, log)
    write_metrics(store, rid, run.metrics)  # drop any line written after the checkpoint we resume from
    step = SingleStep(run, dd, ex)
    log(f"run {rid} ({spec.label()}): {dd.n_train} train / {step.n_test} test images on {ex.device}; "
        f"results in {store.where(run_dir(rid))}")  # fmt: skip
    return train_members([run], step, store, data, opts, sigterm, {rid: lease}, ex.environment())[rid]
