"""One run from spec to result: SGD with momentum and a decaying learning rate, resumable at any step.

The data set lives on the device; a step indexes it, so there is no host synchronisation inside an epoch (one
`.tolist()` per epoch collects the epoch's numbers). Randomness is derived from (seed, epoch): an epoch's data
order and crops are recomputed on resume; the global RNG (dropout) is saved in every checkpoint. A pack of runs
(training/packed.py) uses the same pieces (training/loop.py: step boundaries, evaluation, the result) in an epoch
loop of its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from rethink.data.cifar import Cifar10
from rethink.data.device import batch_inputs, epoch_order, prepare_data
from rethink.models import build_model
from rethink.spec import RunSpec
from rethink.store import Store
from rethink.store.lease import Lease
from rethink.store.runs import run_dir, run_key, run_state, write_metrics, write_spec
from rethink.summary import epoch_record, stop_reason
from rethink.training.checkpoint import checkpoint, checkpoint_position, load_checkpoint, save_checkpoint
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
from rethink.training.optim import make_sgd
from rethink.training.options import ExecOptions, Execution, prepare_device


@dataclass
class RunState:
    """A run between two steps: where it is and what it has gathered (a checkpoint is this, the model and the
    optimizer)."""

    epoch: int  # epochs completed
    batch: int  # batches done in the current epoch
    step: int
    metrics: list[dict]
    loss_sum: torch.Tensor  # the current epoch's sum of batch losses, on the device
    grad_sq_sum: torch.Tensor  # ... and of the tracked weights' squared gradient norms
    elapsed: float = 0.0  # seconds spent in the current epoch before this process took over
    rng: dict | None = field(default=None, repr=False)  # the dropout RNG to resume mid-epoch with

    @classmethod
    def start(cls, device: torch.device, epoch: int = 0, step: int = 0, metrics: list | None = None) -> RunState:
        zero = torch.zeros((), device=device, dtype=torch.float64)
        return cls(epoch, 0, step, metrics or [], zero, zero.clone())


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
    """The run, its lease held: one screen from the data to the result."""
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
    n, n_test, bs = dd.n_train, dd.test_y.shape[0], spec.batch_size
    n_batches = math.ceil(n / bs)
    use_cl = ex.channels_last
    model, opt, state, rotate = _start(spec, store, ex, n_batches, log)
    write_metrics(store, rid, state.metrics)  # drop any line written after the checkpoint we resume from
    tracked = scale_invariant_weights(model) if spec.track_norms else []
    net = torch.compile(model) if ex.compile else model
    log(f"run {rid} ({spec.label()}): {n} train / {n_test} test images on {ex.device}; "
        f"results in {store.where(run_dir(rid))}")  # fmt: skip

    def save(batch: int, seconds: float) -> None:
        nonlocal rotate
        lease.renew(force=True)  # a trainer that lost its lease stops before it writes
        momentum = opt.state_dict()["momentum_buffers"] or None
        save_checkpoint(store, rid, checkpoint(
            spec, ex.device, epoch=state.epoch, batch=batch, step=state.step, model=model.state_dict(),
            momentum=momentum, loss_sum=state.loss_sum, grad_sq_sum=state.grad_sq_sum, elapsed=seconds,
            metrics=state.metrics), rotate)  # fmt: skip
        rotate = True  # what we just wrote is good

    stopped = "cap"
    while state.epoch < spec.epochs:
        lr = opt.lr = spec.lr * spec.lr_decay**state.epoch
        perm, offsets = epoch_order(spec.seed, state.epoch, n, spec.random_crop, ex.device)
        seed_dropout(spec.seed, state.epoch, state.rng if state.batch > 0 else None, ex.device)
        net.train()
        steps = EpochSteps(sigterm, save, n_batches, state.batch, opts.checkpoint_minutes, ex.progress,
                           f"epoch {state.epoch + 1}/{spec.epochs}", f"run {rid}", opts.deadline, opts.clock,
                           before=state.elapsed, on_step=lease.renew)  # fmt: skip
        for b in range(state.batch, n_batches):
            x, y = batch_inputs(dd, perm[b * bs : (b + 1) * bs], offsets, use_cl)
            loss, grad_sq = sgd_step(net, opt, x, y, ex.amp, tracked)
            if grad_sq is not None:
                state.grad_sq_sum += grad_sq
            state.loss_sum += loss.double()
            state.step += 1
            steps.after(b)
        steps.close()
        rec = _end_of_epoch(net, dd, ex, state, lr, n_batches, tracked, use_cl, steps.t0)
        state = RunState.start(ex.device, state.epoch + 1, state.step, [*state.metrics, rec])
        log(f"run {rid} epoch {state.epoch}/{spec.epochs}: loss {rec['train_loss']:.4f} train acc "
            f"{rec['train_acc']:.4f} test acc {rec['test_acc']:.4f} ({rec['images_per_second']:.0f} img/s)")  # fmt: skip
        lease.renew(force=True)
        write_metrics(store, rid, state.metrics)
        stopped = stop_reason(spec, rec)
        if stopped != "cap" or state.epoch == spec.epochs:
            break
        save(0, 0.0)
        if opts.deadline is not None and opts.clock() >= opts.deadline:
            raise OutOfTime(f"run {rid}: time budget spent after epoch {state.epoch}; checkpoint written")
    return finish_run(store, spec, state.metrics, stopped, ex.environment(), data.provenance(), log,
                      keep_checkpoints=opts.keep_checkpoints)


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


def _start(spec: RunSpec, store: Store, ex: Execution, n_batches: int, log):
    """The run's model, optimizer and state from its newest usable checkpoint, else fresh; and whether the
    next checkpoint may rotate checkpoint.pt into checkpoint.prev.pt."""
    built: dict = {}

    def fresh() -> None:
        model = build_run_model(spec, ex)
        built.update(model=model, opt=make_sgd(model, spec), state=RunState.start(ex.device))

    def restore(ckpt: dict) -> None:
        """Take over a checkpoint's state, or raise (leaving a fresh model) when it does not fit this run."""
        epoch, batch, step, metrics = checkpoint_position(ckpt, spec, n_batches)
        sums = [ckpt[k].to(device=ex.device, dtype=torch.float64).reshape(()) for k in ("loss_sum", "grad_sq_sum")]
        elapsed = float(ckpt["elapsed_in_epoch"])
        try:
            built["model"].load_state_dict(ckpt["model"])
            built["opt"].load_state_dict(ckpt["optimizer"])
        except Exception:
            fresh()  # the failed load may have changed some weights already
            raise
        built["state"] = RunState(epoch, batch, step, metrics, *sums, elapsed, ckpt["rng"])

    fresh()
    ckpt, rotate = load_checkpoint(store, spec.run_id, restore, log)
    if ckpt is not None:
        state = built["state"]
        log(f"run {spec.run_id}: resuming at epoch {state.epoch + 1}, batch {state.batch} (step {state.step})")
        was, now = (ckpt.get("device"), ckpt.get("threads")), (str(ex.device), torch.get_num_threads())
        if was[0] is not None and was != now:  # kernels (and their sums) differ with either
            log(f"warning: run {spec.run_id} was checkpointed on {was[0]} (threads={was[1]}) and resumes on {now[0]} "
                f"(threads={now[1]}): later epochs may differ from an uninterrupted run in the last digits")  # fmt: skip
    return built["model"], built["opt"], built["state"], rotate


def _end_of_epoch(net, dd, ex: Execution, state: RunState, lr: float, n_batches: int, tracked, use_cl: bool,
                  t0: float) -> dict:  # fmt: skip
    """Evaluate on the whole training and test sets and make the epoch's record (its one host sync)."""
    if ex.device.type == "cuda":
        torch.cuda.synchronize(ex.device)
    t_train = time.perf_counter() - t0 + state.elapsed
    tl, tc = evaluate(net, dd.train_pre, dd.train_y, ex.eval_batch, use_cl)
    vl, vc = evaluate(net, dd.test_pre, dd.test_y, ex.eval_batch, use_cl)
    extra = []
    if tracked:
        wsq = sum(w.detach().double().pow(2).sum() for w in tracked)
        extra = [wsq, state.grad_sq_sum / n_batches]
    vals = torch.stack([state.loss_sum / n_batches, tl, tc.double(), vl, vc.double(), *extra]).tolist()
    t_epoch = time.perf_counter() - t0 + state.elapsed
    return epoch_record(state.epoch + 1, state.step, lr, vals, dd.n_train, dd.test_y.shape[0], t_epoch, t_train)
