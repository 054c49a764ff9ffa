"""Periodic destabilization of BatchNorm networks under weight decay (Lobacheva et al., NeurIPS 2021).

The conv weights followed by BatchNorm are scale-invariant: weight decay shrinks their norm, which raises the
effective learning rate lr / ||w||^2 until training destabilizes (the loss spikes, the norm jumps back up) and a
new period begins. Two suites: `periodic`, their setup (SGD lr 0.01, weight decay 1e-3, no momentum, constant
learning rate) on the whole training set for EPOCHS epochs (expensive: not part of `full`), and
`periodic-smoke`, a scaled-down version that shows a destabilization on a CPU in minutes. `detect_spikes`
finds the destabilizations in a run's per-epoch metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median

from rethink.experiments.base import Component, Options, suite_spec
from rethink.experiments.kit import Section, md_table
from rethink.spec import RunSpec

# BatchNorm is what makes the weights scale-invariant; Small Inception is the paper's BatchNorm model.
MODELS = ("inception",)
# Lobacheva et al.'s optimizer: plain SGD at a constant rate. Their period is about (lr * wd)^-1 SGD steps up to a
# factor that depends on the network; at 391 steps per CIFAR-10 epoch, 1000 epochs leave room for a few periods.
SETUP = {"lr": 0.01, "weight_decay": 1e-3, "momentum": 0.0, "lr_decay": 1.0, "track_norms": True}
EPOCHS = 1000
# The CPU version [choice, measured in docs/regularizers.md]: 128 training images in batches of 32 (4 steps per
# epoch, so per-epoch metrics resolve the spikes) and lr * wd = 0.01, 10^4 times theirs, so that a period is
# about a hundred steps instead of about 10^5.
SMOKE_SETUP = {**SETUP, "lr": 0.1, "weight_decay": 0.1, "batch_size": 32}
SMOKE_SUBSETS = (128, 64)  # training and test images
SMOKE_EPOCHS = 150


def periodic(o: Options) -> list[RunSpec]:
    """Lobacheva et al.'s setup on the whole training set, to EPOCHS epochs (no early stop), tag 'periodic'."""

    return [
        suite_spec(o, s, "periodic", m, stop_at_target=False, **SETUP).replace(epochs=o.epochs or EPOCHS)
        for s in range(o.seeds)
        for m in MODELS
    ]


def periodic_smoke(o: Options) -> list[RunSpec]:
    """The scaled-down setup (SMOKE_SETUP on SMOKE_SUBSETS images for SMOKE_EPOCHS epochs), tag 'periodic'."""

    return [
        suite_spec(o, s, "periodic", m, stop_at_target=False, **SMOKE_SETUP).replace(
            epochs=o.epochs or SMOKE_EPOCHS,
            train_subset=o.train_subset or SMOKE_SUBSETS[0],
            test_subset=o.test_subset or SMOKE_SUBSETS[1],
        )
        for s in range(o.seeds)
        for m in MODELS
    ]


# ---------------------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detector:
    """When an epoch counts as a destabilization, relative to the recent stable epochs before it."""

    window: int = 10  # the baseline: the last `window` stable (non-spike) epochs
    warmup: int = 5  # no detection before this many stable epochs exist
    loss_factor: float = 3.0  # train loss above factor x the baseline's median ...
    min_jump: float = 0.1  # ... and at least this much above it (nats): ignores jitter near zero loss
    # or training accuracy this far below the lowest of the baseline's: a drop beyond the recent noise (in the
    # CPU setting the eval-mode accuracy wanders by tens of points while the loss is flat)
    acc_drop: float = 0.3


@dataclass(frozen=True)
class Spikes:
    """The detected destabilizations of one run."""

    epochs: tuple[int, ...]  # the first epoch (1-based, as in metrics) of each spike
    steps: tuple[int, ...]  # the SGD step count at the end of that epoch
    norm_jumps: tuple[bool, ...]  # whether the weight norm rose within a few epochs after the spike

    @property
    def period_epochs(self) -> float | None:
        """The mean interval between consecutive spikes, in epochs (None with fewer than two spikes)."""
        return _mean_gap(self.epochs)

    @property
    def period_steps(self) -> float | None:
        return _mean_gap(self.steps)

    def describe(self) -> str:
        if not self.epochs:
            return "no destabilization detected"
        where = ", ".join(map(str, self.epochs))
        if len(self.epochs) == 1:
            return f"1 spike (epoch {where})"
        return (f"{len(self.epochs)} spikes (epochs {where}); mean period {self.period_epochs:.1f} epochs "
                f"= {self.period_steps:.0f} steps")  # fmt: skip


def _mean_gap(xs: tuple[int, ...]) -> float | None:
    if len(xs) < 2:
        return None
    return (xs[-1] - xs[0]) / (len(xs) - 1)


def detect_spikes(metrics: list[dict], d: Detector | None = None, norm_lookahead: int = 3) -> Spikes:
    """Destabilizations in per-epoch metrics: train loss jumping above, or train accuracy dropping below, the
    recent stable epochs. Consecutive flagged epochs are one spike; the baseline is frozen while it lasts."""
    d = d or Detector()
    stable: list[tuple[float, float]] = []  # (loss, acc) of recent non-spike epochs
    starts: list[int] = []  # indices into metrics
    in_spike = False
    for i, m in enumerate(metrics):
        loss, acc = m["train_loss"], m["train_acc"]
        flagged = False
        if len(stable) >= d.warmup:
            recent = stable[-d.window :]
            base, floor_acc = median(x[0] for x in recent), min(x[1] for x in recent)
            blown = not math.isfinite(loss)
            jumped = loss > d.loss_factor * base and loss - base > d.min_jump
            flagged = blown or jumped or floor_acc - acc > d.acc_drop
        if flagged and not in_spike:
            starts.append(i)
        in_spike = flagged
        if not flagged:
            stable.append((loss, acc))
    jumps = []
    for i in starts:
        before = metrics[i - 1].get("weight_norm") if i > 0 else None
        after = [m.get("weight_norm") for m in metrics[i : i + norm_lookahead]]
        jumps.append(before is not None and any(a is not None and a > before for a in after))
    return Spikes(
        epochs=tuple(metrics[i]["epoch"] for i in starts),
        steps=tuple(metrics[i]["step"] for i in starts),
        norm_jumps=tuple(jumps),
    )


def phases(metrics: list[dict], spikes: Spikes) -> list[dict]:
    """What happened around each spike: effective-lr growth over the period before it, the norm's jump after it,
    and whether the loss came back down before the next spike (or the end of the run)."""
    index = {m["epoch"]: i for i, m in enumerate(metrics)}
    starts = [index[e] for e in spikes.epochs]
    out = []
    for k, i in enumerate(starts):
        prev = starts[k - 1] if k else 0
        nxt = starts[k + 1] if k + 1 < len(starts) else len(metrics)
        period = metrics[prev:i]
        elr = [m["effective_lr"] for m in period if m.get("effective_lr") is not None]
        before = metrics[i - 1] if i > 0 else None
        after = metrics[i : min(i + 3, nxt)]
        norms_after = [m["weight_norm"] for m in after if m.get("weight_norm") is not None]
        floor = min((m["train_loss"] for m in period), default=math.nan)
        out.append({
            "epoch": metrics[i]["epoch"],
            "step": metrics[i]["step"],
            "loss_before": before["train_loss"] if before else None,
            "loss_peak": max(m["train_loss"] for m in metrics[i:nxt]),
            "elr_growth": elr[-1] / min(elr) if elr and min(elr) > 0 else None,
            "norm_before": before.get("weight_norm") if before else None,
            "norm_after": max(norms_after) if norms_after else None,
            "recovered": any(m["train_loss"] < 2 * floor + 0.05 for m in metrics[i + 1 : nxt]),
        })  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- figure

PANELS = [
    ("train_loss", "train loss\n(epoch mean)", "log"),
    ("train_acc", "train accuracy\n(eval mode)", "linear"),
    ("weight_norm", "||w||, scale-invariant\nweights", "log"),
    ("effective_lr", "effective lr\nlr / ||w||^2", "log"),
]


def figure(runs: list[tuple[str, list[dict], Spikes]], title: str = ""):
    """Train loss, train accuracy, weight norm and effective lr against epochs, one line per run (label,
    metrics, spikes), spikes marked as dashed lines in the run's colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    for r, (label, metrics, spikes) in enumerate(runs):
        color = colors[r % len(colors)]
        mark = "tab:red" if len(runs) == 1 else color
        epochs = [m["epoch"] for m in metrics]
        for ax, (key, _, _) in zip(axes, PANELS):
            ax.plot(epochs, [m.get(key, math.nan) for m in metrics], lw=1.0, color=color,
                    label=f"{label}: {spikes.describe()}")  # fmt: skip
            for e in spikes.epochs:
                ax.axvline(e, color=mark, lw=0.8, ls="--", alpha=0.6)
    for ax, (_, ylabel, scale) in zip(axes, PANELS):
        ax.set_yscale(scale)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, alpha=0.3)
    if not runs:
        axes[0].text(
            0.5, 0.5, "no runs with metrics yet", ha="center", va="center", transform=axes[0].transAxes
        )
    else:
        from matplotlib.lines import Line2D

        handles = axes[0].get_legend_handles_labels()[0] if len(runs) > 1 else []
        handles.append(
            Line2D([], [], color="tab:red" if len(runs) == 1 else "gray", ls="--", label="detected spike")
        )
        fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=8)
    axes[-1].set_xlabel("epoch")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------- report


def render(ctx):
    """The report section of the 'periodic' and 'periodic-smoke' components (report.SECTIONS)."""
    import pandas as pd


    d = Detector()
    runs, rows, lines, csv = [], [], [], []
    for s in ctx.specs:
        metrics = ctx.metrics.get(s.run_id) or []
        if not metrics:
            continue
        spikes = detect_spikes(metrics, d)
        runs.append((f"seed {s.seed}", metrics, spikes))
        flagged = set(spikes.epochs)
        csv += [{"run_id": s.run_id, "seed": s.seed, **{k: m.get(k) for k in CSV_FIELDS},
                 "spike": m["epoch"] in flagged} for m in metrics]  # fmt: skip
        scale = 1 / (s.lr * s.weight_decay)
        state = "finished" if ctx.results.get(s.run_id) else f"partial, {len(metrics)} of {s.epochs} epochs"
        period = spikes.period_steps
        lines.append(
            f"- `{s.run_id}` seed {s.seed} ({state}; lr {s.lr:g}, weight decay {s.weight_decay:g}, momentum "
            f"{s.momentum:g}, batch {s.batch_size}, {s.train_subset or 'all'} training images): "
            f"{spikes.describe()}; (lr·wd)^-1 = {scale:.0f} steps"
            + (f", measured period / (lr·wd)^-1 = {period / scale:.2f}" if period else "")
        )
        for ph in phases(metrics, spikes):
            rows.append([s.seed, ph["epoch"], ph["step"], _num(ph["loss_before"]), _num(ph["loss_peak"]),
                         _num(ph["elr_growth"], ".2f") + "x", _num(ph["norm_before"]), _num(ph["norm_after"]),
                         "yes" if ph["recovered"] else "no"])  # fmt: skip
    title = "BatchNorm + weight decay at a constant lr: " + (
        f"{runs[0][0]}: {runs[0][2].describe()}" + (f" (+{len(runs) - 1} more runs)" if len(runs) > 1 else "")
        if runs
        else "no runs yet"
    )
    names = ctx.save_figure(figure(runs, title), "periodic")
    if csv:
        ctx.write_text("periodic.csv", pd.DataFrame(csv).to_csv(index=False))
    every = [ph for _, m, sp in runs for ph in phases(m, sp)]
    body = [
        "Lobacheva et al. (NeurIPS 2021) train BatchNorm networks with weight decay at a constant learning rate "
        "for a long time and see training destabilize periodically: weight decay shrinks the norm of the "
        "scale-invariant weights, so the effective learning rate lr / ||w||^2 grows until the loss spikes; the "
        "norm then jumps up, the effective learning rate falls, the loss comes back down and a new period "
        "begins. Spikes here: an epoch whose mean training loss is above "
        f"{d.loss_factor:g}x the median of the last {d.window} stable epochs (and {d.min_jump:g} above it), or "
        f"whose training accuracy is {d.acc_drop:g} below the lowest of theirs (`periodic.Detector`)."
        + (" Data: [periodic.csv](periodic.csv)." if csv else ""),
        "",
        *(lines or ["- no run has metrics yet"]),
        "",
    ]
    if rows:
        body += [md_table(["seed", "spike epoch", "step", "loss before", "loss peak", "eff. lr growth before",
                           "norm before", "norm after", "loss recovered"], rows), ""]  # fmt: skip
        grew = sum(ph["elr_growth"] is not None and ph["elr_growth"] > 1 for ph in every)
        jumped = sum(ph["norm_after"] is not None and ph["norm_before"] is not None
                     and ph["norm_after"] > ph["norm_before"] for ph in every)  # fmt: skip
        recovered = sum(ph["recovered"] for ph in every)
        n = len(every)
        agree = grew == jumped == n and recovered >= n - 1  # the last spike may run into the end of the run
        body.append(
            f"Compared with Lobacheva et al.: the effective learning rate grew before {grew} of {n} spikes, the "
            f"norm jumped up after {jumped} of {n}, and the loss recovered after {recovered} of {n}: "
            + (
                "**consistent** with the periodic regime they describe."
                if agree
                else "**not fully consistent** with the periodic regime they describe."
            )  # fmt: skip
        )
    elif runs:
        body.append("Compared with Lobacheva et al.: **no destabilization detected** in these runs; their periods "
                    "take a number of steps of the order of (lr·wd)^-1, so a run may be too short to show one.")  # fmt: skip
    return Section(
        "Periodic behaviour with BatchNorm and weight decay (Lobacheva et al.)", "\n".join(body), names[:1]
    )


CSV_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_acc", "weight_norm", "effective_lr",
              "grad_norm")  # fmt: skip


def _num(x, fmt: str = ".4g") -> str:
    return "" if x is None else format(x, fmt)


COMPONENTS = [Component("periodic", periodic, render), Component("periodic-smoke", periodic_smoke, render)]
