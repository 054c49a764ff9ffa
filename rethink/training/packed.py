"""Packed training: K runs of one architecture and schedule trained in one process as one batched model. The
epoch loop, the per-run state and the restore are the engine's (trainer.train_members, RunProgress,
restore_run); this module adds the pack's data, its stacked model and its step (`PackStep`).

How. The K models' parameters and buffers are stacked along a new leading dimension and one functional
copy of the module runs under `torch.func.vmap` (`functional_call` on the stacked tensors, the pattern of
`torch.func.stack_module_state`). A step is then one batched forward and backward: linear layers become
batched matmuls, convolutions grouped convolutions, and BatchNorm updates each run's own slice of the
stacked running statistics (evaluation uses them). SGD with momentum is written out on the stacked tensors,
with each run's own weight decay added to the gradient of its kernels (wd_k * w_k, what the trainer's SGD
group of decayed weights does; biases and BatchNorm offsets are not decayed).

What stays per run, exactly as the unpacked trainer (`trainer.train_run`) draws it: initialization
(`torch.manual_seed(seed)` then `build_model`), data order and random crops (`epoch_seed(seed, epoch)`),
label and pixel corruption (`prepare_data`), weight decay, BatchNorm statistics, early stopping at the
target accuracy, and everything in the store: `runs/<id>/{spec.json, metrics.jsonl, checkpoint.pt,
result.json}` in the trainer's formats, so a pack resumes from checkpoints the trainer wrote and the other
way round, and a run finished in a pack is finished for everyone.

What differs: float rounding (batched kernels sum in another order; on the CPU in float32 the metrics agree
with the unpacked twin's to about 1e-5), and dropout: one random stream serves the whole pack (vmap with
randomness="different"), so with dropout a packed run draws other masks than its twin. The per-epoch timing
fields of a member are the pack's wall times (a member's images_per_second is its own progress, K times less
than the pack's throughput).

Scheduling. A pack trains the members at the same position (epoch, batch) together; members found at
different positions (a pack killed between two members' checkpoint writes, runs started alone) are split by
position and each group is trained on its own, a group of one by the unpacked trainer itself. K = 1 therefore
is the unpacked path. A member that stops (target accuracy, divergence) leaves the pack at that epoch's end:
its result is written and the remaining members are re-stacked without it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from rethink.data.cifar import Cifar10
from rethink.data.corruptions import corrupt_labels
from rethink.data.device import epoch_order as run_epoch_order
from rethink.data.device import prepare_data
from rethink.data.preprocess import preprocess
from rethink.models import build_model, decayed_parameter_names
from rethink.spec import RunSpec
from rethink.store import Store
from rethink.store.lease import Lease, LeaseHeld
from rethink.store.runs import run_state, write_metrics, write_spec
from rethink.training.grouping import check_packable
from rethink.training.loop import Preempted, SigtermFlag, scale_invariant_weights
from rethink.training.options import ExecOptions, Execution, prepare_device
from rethink.training.trainer import RunProgress, restore_run, train_members, train_run

# ---------------------------------------------------------------------------------------------- data


@dataclass
class PackData:
    """The members' data sets on the device: distinct image sets stored once, labels per member.

    Member k's training images are rows train_base[k] .. train_base[k] + n - 1 of train_pre (train_raw for
    random crops), so a batch of every member is one gather. Bases and crop flags are host lists (no sync).
    """

    train_pre: torch.Tensor  # [D*n, 3, 28, 28]
    train_raw: torch.Tensor | None  # [D*n, 3, 32, 32] when some member crops at random
    train_y: torch.Tensor  # [K, n]
    test_pre: torch.Tensor  # [D*m, 3, 28, 28]
    test_y: torch.Tensor  # [m] (test labels are always the true ones)
    train_base: list[int]
    test_base: list[int]
    crop: list[bool]

    def __post_init__(self):
        self.n, self.m = self.train_y.shape[1], self.test_y.shape[0]
        self._derive()

    def _derive(self) -> None:
        device = self.train_pre.device
        self.train_base_t = torch.tensor(self.train_base, device=device)
        self.crop_idx = torch.tensor([k for k, c in enumerate(self.crop) if c], device=device, dtype=torch.long)

    def keep(self, idx: list[int]) -> None:
        """Keep only the members in `idx` (members that stopped leave)."""
        self.train_y = self.train_y[torch.tensor(idx, device=self.train_y.device)]
        self.train_base = [self.train_base[k] for k in idx]
        self.test_base = [self.test_base[k] for k in idx]
        self.crop = [self.crop[k] for k in idx]
        self._derive()


def _image_key(s: RunSpec) -> tuple:
    return (s.pixels, s.data_seed if s.pixels != "none" else None)


def _label_key(s: RunSpec) -> tuple:
    return (s.labels, s.data_seed if s.labels != "true" else None)


def prepare_pack_data(specs: list[RunSpec], data: Cifar10, device: torch.device) -> PackData:
    """Each member's data exactly as `train.prepare_data` makes it, with identical image sets stored once."""
    image_sets: dict[tuple, int] = {}
    label_sets: dict[tuple, torch.Tensor] = {}
    pre, raw, tpre = [], [], []
    train_base, test_base, ys = [], [], []
    for s in specs:
        key = _image_key(s)
        if key not in image_sets:
            crops = any(o.random_crop for o in specs if _image_key(o) == key)
            dd = prepare_data(s.replace(random_crop=crops), data, device)
            image_sets[key] = len(pre)
            pre.append(dd.train_pre)
            raw.append(dd.train_raw)
            tpre.append(dd.test_pre)
            test_y = dd.test_y
            label_sets.setdefault(_label_key(s), dd.train_y)
        if _label_key(s) not in label_sets:  # the labels prepare_data would make for this spec
            y = corrupt_labels(data.train_y[: s.train_subset], s.label_noise, s.data_seed)
            label_sets[_label_key(s)] = torch.from_numpy(y).to(device)
        d = image_sets[key]
        n, m = pre[d].shape[0], tpre[d].shape[0]
        train_base.append(d * n)
        test_base.append(d * m)
        ys.append(label_sets[_label_key(s)])
    train_raw = None
    if any(r is not None for r in raw):
        # Sets without crops still need rows here to keep offsets aligned; gaussian sets are float32.
        dtype = torch.float32 if any(r is not None and r.is_floating_point() for r in raw) else torch.uint8
        shape = (pre[0].shape[0], 3, 32, 32)
        train_raw = torch.cat([(r if r is not None else torch.zeros(shape, dtype=dtype, device=device)).to(dtype)
                               for r in raw])  # fmt: skip
    return PackData(
        train_pre=torch.cat(pre) if len(pre) > 1 else pre[0],
        train_raw=train_raw,
        train_y=torch.stack(ys),
        test_pre=torch.cat(tpre) if len(tpre) > 1 else tpre[0],
        test_y=test_y,
        train_base=train_base,
        test_base=test_base,
        crop=[s.random_crop for s in specs],
    )


def epoch_order(specs: list[RunSpec], epoch: int, n: int, device: torch.device):
    """Each member's data order [K, n] and crop offsets [K, n, 2] (None: nobody crops), as the trainer draws them."""
    orders = [run_epoch_order(s.seed, epoch, n, s.random_crop, device) for s in specs]
    if not any(s.random_crop for s in specs):
        return torch.stack([p for p, _ in orders]), None
    no_crop = torch.zeros(n, 2, dtype=torch.long, device=device)
    return torch.stack([p for p, _ in orders]), torch.stack([o if o is not None else no_crop for _, o in orders])


def train_batch(pd: PackData, perm: torch.Tensor, offsets: torch.Tensor | None, b: int, bs: int):
    """Batch b of every member: inputs [K, B, 3, 28, 28] and labels [K, B]."""
    idx = perm[:, b * bs : (b + 1) * bs]
    rows = idx + pd.train_base_t[:, None]
    y = pd.train_y.gather(1, idx)

    def gather(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # t[r], by index_select: ~2x faster on the CPU
        return t.index_select(0, r.reshape(-1)).view(*r.shape, *t.shape[1:])

    if offsets is None or not any(pd.crop):
        return gather(pd.train_pre, rows), y
    if all(pd.crop):
        off = offsets.gather(1, idx[:, :, None].expand(-1, -1, 2))
        x = preprocess(gather(pd.train_raw, rows).flatten(0, 1), off.flatten(0, 1))
        return x.view(*idx.shape, *x.shape[1:]), y
    x = gather(pd.train_pre, rows)
    k = pd.crop_idx
    off = offsets[k].gather(1, idx[k, :, None].expand(-1, -1, 2))
    cropped = preprocess(gather(pd.train_raw, rows[k]).flatten(0, 1), off.flatten(0, 1))
    x[k] = cropped.view(len(pd.crop_idx), idx.shape[1], *cropped.shape[1:])
    return x, y


# ---------------------------------------------------------------------------------------------- the model


class PackedModel:
    """K models of one architecture as stacked tensors, run as one batched model under torch.func.vmap."""

    def __init__(self, name: str, dropout: float, states: list[dict], device: torch.device,
                 momentum: list[dict] | None = None, compile: bool = False, compile_mode: str | None = None,
                 track_norms: bool = False):  # fmt: skip
        self.template = build_model(name, dropout=dropout)  # names, shapes and the checkpoint layout
        self.param_names = [n for n, _ in self.template.named_parameters()]
        self.decayed = set(decayed_parameter_names(self.template))
        self.buffer_names = [n for n, _ in self.template.named_buffers()]
        self.state_names = list(self.template.state_dict())
        self.base = copy.deepcopy(self.template).to("meta")
        ids = {id(p): n for n, p in self.template.named_parameters()}
        self.tracked = [ids[id(w)] for w in scale_invariant_weights(self.template)] if track_norms else []
        self.params = {n: torch.stack([s[n] for s in states]).to(device).requires_grad_() for n in self.param_names}
        self.buffers = {n: torch.stack([s[n] for s in states]).to(device) for n in self.buffer_names}
        # Momentum buffers exist once a step was taken (SGD creates them lazily, and not at all for momentum 0).
        self.momentum = {n: torch.stack([b[n] for b in momentum]).to(device) for n in self.param_names} if momentum else {}

        def call(params, buffers, x):
            return functional_call(self.base, (params, buffers), (x,))

        self._forward = vmap(call, in_dims=(0, 0, 0), randomness="different")
        self._forward_shared = vmap(call, in_dims=(0, 0, None), randomness="different")
        if compile:
            self._forward = torch.compile(self._forward, mode=compile_mode)
            self._forward_shared = torch.compile(self._forward_shared, mode=compile_mode)

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def forward(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Logits [K, B, 10] of inputs [K, B, ...] (or [B, ...] seen by every member when `shared`)."""
        fn = self._forward_shared if shared else self._forward
        return fn(self.params, self.buffers, x)

    def train_step(self, x, y, lr: float, momentum: float, weight_decay: torch.Tensor | None, amp: bool):
        """One SGD step of every member; returns the losses [K] and the tracked weights' squared gradient norms."""
        self.base.train()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = self.forward(x)
        k, b = y.shape
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 logits -> float32 (float64 stays)
        losses = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(k, b).mean(dim=1)
        params = [self.params[n] for n in self.param_names]
        grads = torch.autograd.grad(losses.sum(), params)
        grad_sq = None
        with torch.no_grad():
            if self.tracked:
                g = dict(zip(self.param_names, grads))
                grad_sq = sum(g[n].double().pow(2).flatten(1).sum(1) for n in self.tracked)
            if weight_decay is not None:  # coupled L2 on the kernels, as the trainer's SGD: d = g + wd_k * w_k
                grads = [torch.addcmul(g, weight_decay.view(-1, *[1] * (g.dim() - 1)), p) if n in self.decayed else g
                         for n, g, p in zip(self.param_names, grads, params)]  # fmt: skip
            if momentum != 0:
                if not self.momentum:
                    self.momentum = {n: g.detach().clone() for n, g in zip(self.param_names, grads)}
                else:
                    bufs = [self.momentum[n] for n in self.param_names]
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, grads)
                grads = [self.momentum[n] for n in self.param_names]
            torch._foreach_add_(params, grads, alpha=-lr)
        return losses.detach(), grad_sq

    @torch.no_grad()
    def evaluate(self, pre: torch.Tensor, base: list[int], y: torch.Tensor, count: int, batch: int):
        """(summed loss [K] float64, correct [K] int64) over rows base[k] .. base[k] + count - 1 of `pre`.

        `y` is [K, count], or [count] when every member has the same labels. No host sync here. Float32
        logits whatever the training precision, as the trainer's `evaluate`.
        """
        self.base.eval()
        k = len(base)
        shared = len(set(base)) == 1  # one image set: every member sees the same inputs, no gather
        loss = torch.zeros(k, device=pre.device, dtype=torch.float64)
        correct = torch.zeros(k, device=pre.device, dtype=torch.int64)
        rows = torch.tensor(base, device=pre.device)[:, None]
        for i in range(0, count, batch):
            j = min(i + batch, count)
            if shared:
                x = pre[base[0] + i : base[0] + j]
            else:
                x = pre[rows + torch.arange(i, j, device=pre.device)]
            with torch.autocast(pre.device.type, enabled=False):
                out = self.forward(x, shared=shared)
            out = out.to(torch.promote_types(out.dtype, torch.float32))
            yb = (y[:, i:j] if y.dim() == 2 else y[i:j].expand(k, -1)).contiguous()
            loss += F.cross_entropy(out.flatten(0, 1), yb.flatten(), reduction="none").view(k, -1).sum(1).double()
            correct += (out.argmax(dim=2) == yb).sum(1)
        return loss, correct

    def weight_sq(self) -> torch.Tensor | None:
        """Squared norm [K] of each member's tracked (scale-invariant) weights."""
        if not self.tracked:
            return None
        return sum(self.params[n].detach().double().pow(2).flatten(1).sum(1) for n in self.tracked)

    def keep(self, idx: list[int]) -> None:
        """Drop every member not in `idx` (members that stopped)."""
        sel = torch.tensor(idx, device=next(iter(self.params.values())).device)
        self.params = {n: p.detach()[sel].requires_grad_() for n, p in self.params.items()}
        self.buffers = {n: b[sel] for n, b in self.buffers.items()}
        self.momentum = {n: b[sel] for n, b in self.momentum.items()}

    def member_state(self, k: int) -> dict:
        """Member k's model state dict, as the unpacked model's `state_dict()` (host copies)."""
        both = {**self.params, **self.buffers}
        return {n: both[n][k].detach().to("cpu", copy=True) for n in self.state_names}

    def member_momentum(self, k: int) -> dict | None:
        if not self.momentum:
            return None
        return {n: self.momentum[n][k].to("cpu", copy=True) for n in self.param_names}


# ---------------------------------------------------------------------------------------------- the step


class PackStep:
    """The engine's step (trainer.Step) for K >= 2 members: one PackedModel on the members' PackData."""

    def __init__(self, runs: list[RunProgress], pd: PackData, ex: Execution, compile_mode: str | None = None):
        spec0 = runs[0].spec
        self.specs, self.pd, self.ex = [r.spec for r in runs], pd, ex
        self.device, self.n_train, self.n_test = ex.device, pd.n, pd.m
        momentum = [r.optimizer.state_dict()["momentum_buffers"] for r in runs]
        self.pm = PackedModel(spec0.model, spec0.dropout, [r.model.state_dict() for r in runs], ex.device,
                              momentum if all(momentum) else None, compile=ex.compile, compile_mode=compile_mode or ex.compile_mode,
                              track_norms=spec0.track_norms)  # fmt: skip
        self._weight_decay()
        self.perm = self.offsets = None

    def _weight_decay(self) -> None:
        wd = [s.weight_decay for s in self.specs]
        self.wd = None if not any(wd) else torch.tensor(wd, device=self.device, dtype=torch.float32)

    def begin_epoch(self, epoch: int) -> None:
        self.perm, self.offsets = epoch_order(self.specs, epoch, self.n_train, self.device)

    def train(self, b: int, lr: float):
        spec0 = self.specs[0]
        x, y = train_batch(self.pd, self.perm, self.offsets, b, spec0.batch_size)
        return self.pm.train_step(x, y, lr, spec0.momentum, self.wd, self.ex.amp)

    def evaluate(self) -> list[torch.Tensor]:
        pd, pm, batch = self.pd, self.pm, self.ex.eval_batch
        tl, tc = pm.evaluate(pd.train_pre, pd.train_base, pd.train_y, pd.n, batch)
        vl, vc = pm.evaluate(pd.test_pre, pd.test_base, pd.test_y, pd.m, batch)
        return [tl, tc, vl, vc]

    def weight_sq(self) -> torch.Tensor | None:
        return self.pm.weight_sq()

    def member_state(self, k: int) -> tuple[dict, dict | None]:
        return self.pm.member_state(k), self.pm.member_momentum(k)

    def keep(self, idx: list[int]) -> None:
        self.specs = [self.specs[k] for k in idx]
        self.pm.keep(idx)
        self.pd.keep(idx)
        self._weight_decay()


def member_model(spec: RunSpec) -> torch.nn.Module:
    """A member's fresh model as the unpacked trainer initializes it (the run's seed, then the model), on the
    host: the source of its slice of the stacked state."""
    torch.manual_seed(spec.seed)
    return build_model(spec.model, dropout=spec.dropout)


# ---------------------------------------------------------------------------------------------- the pack


def train_pack(specs: list[RunSpec], store: Store, data: Cifar10, opts: ExecOptions | None = None,
               compile_mode: str | None = None) -> dict[str, dict]:  # fmt: skip
    """Train every unfinished run of a pack to its end in `store`; returns {run_id: result record}."""
    opts = opts or ExecOptions()
    log = opts.log
    check_packable(specs)
    results: dict[str, dict] = {}
    todo = []
    for s in specs:
        done = run_state(store, s)
        if done.finished:
            results[s.run_id] = done.result
        else:
            todo.append(s)
    if len(specs) > 1 and results:
        log(f"pack: {len(results)} of {len(specs)} runs already finished")
    if len(todo) <= 1:
        for s in todo:
            results[s.run_id] = train_run(s, store, data, opts)
        return results
    # One writer per run: the pack trains the members whose leases it gets; the others are someone else's.
    leases = {s.run_id: Lease(store, s.run_id, ttl=opts.lease_seconds) for s in todo}
    elsewhere = [s for s in todo if leases[s.run_id].try_acquire() is not None]
    for s in elsewhere:
        log(f"run {s.run_id}: another trainer holds its lease; the pack leaves it to that trainer")
        del leases[s.run_id]
    todo = [s for s in todo if s.run_id in leases and not run_state(store, s).finished]
    # SIGTERM is caught from the start, as the trainer does: one arriving while data loads stops the pack at
    # its first step boundary, checkpoints written.
    try:
        with SigtermFlag() as sigterm:
            n = len(data.train_y[: specs[0].train_subset])
            n_batches = math.ceil(n / specs[0].batch_size)
            device = opts.resolve().device
            members = [restore_run(s, store, member_model, device, n_batches, log) for s in todo]
            groups: dict[tuple, list[RunProgress]] = {}
            for m in members:
                groups.setdefault(m.position, []).append(m)
            if len(groups) > 1:
                log(f"pack: members at {len(groups)} different positions; training each position's group on its own")
            for position in sorted(groups, reverse=True):  # the most advanced first: they finish soonest
                group = groups[position]
                if sigterm.set:  # between groups nothing is half done: every member's checkpoint is current
                    raise Preempted("pack: SIGTERM; every member's checkpoint is current, exiting 143")
                if len(group) == 1:  # the trainer takes the run's lease itself
                    leases.pop(group[0].spec.run_id).release()
                    results[group[0].spec.run_id] = train_run(group[0].spec, store, data, opts)
                else:
                    results.update(_train_together(group, store, data, opts, compile_mode, sigterm, leases))
    finally:
        for lease in leases.values():
            lease.release()
    if elsewhere:
        raise LeaseHeld(f"pack: {len(elsewhere)} of its runs are being trained by another trainer "
                        f"({' '.join(s.run_id for s in elsewhere)}); the others are finished")  # fmt: skip
    return {s.run_id: results[s.run_id] for s in specs}


def _train_together(members: list[RunProgress], store: Store, data: Cifar10, opts: ExecOptions,
                    compile_mode: str | None, sigterm: SigtermFlag, leases: dict[str, Lease]) -> dict[str, dict]:  # fmt: skip
    """Train members that stand at the same position as one packed model, to the end of each: the engine's
    loop with the pack's step."""
    spec0 = members[0].spec
    ex = opts.resolve(amp=spec0.amp)  # one precision per pack: RunSpec.precision is a shared field (grouping.py)
    prepare_device(ex.device)
    env = ex.environment()
    env["channels_last"] = False  # a packed model runs 5-d batches; channels_last does not apply
    env["pack"] = {"size": len(members), "run_ids": [m.spec.run_id for m in members]}
    for m in members:
        write_spec(store, m.spec)
        write_metrics(store, m.spec.run_id, m.metrics)  # drop any line written after the checkpoint
    step = PackStep(members, prepare_pack_data([m.spec for m in members], data, ex.device), ex, compile_mode)
    opts.log(f"pack of {len(members)} {spec0.model} runs: {step.n_train} train / {step.n_test} test images each on "
             f"{ex.device}; results in {store.where('runs')}/<run id>")  # fmt: skip
    return train_members(members, step, store, data, opts, sigterm, leases, env)
