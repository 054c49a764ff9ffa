"""Aggregation: a suite's runs in the store -> figures, Table 1 and a self-contained report.

`aggregate(store, suite, options)` reads every run of the suite (result.json, metrics.jsonl, error.json) and
writes to `reports/<suite>/` in the same store (local or S3): one section per component of the suite (figure
PNG + SVG files, table CSV/markdown), then `report.md` and `report.html` (figures embedded as base64 PNG data
URIs, no external resources). Whatever runs exist are drawn; the missing, partial and failed ones are listed.

Adding a section (e.g. for a new suite component 'regularizers'):

    from rethink import report

    def render_regularizers(ctx: report.Context) -> report.Section | None:
        fig, ax = report.new_figure()
        for label, group in ctx.seed_groups().items():      # specs differing only by seed
            report.plot_curves(ax, ctx.curves(group), "epoch", "test_acc", label, color=None)
        report.finish_axes(ax, "Test accuracy by regularizer", "epoch", "test accuracy")
        names = ctx.save_figure(fig, "regularizers")        # writes regularizers.png and .svg
        return report.Section("Regularizers", "Some *markdown*.", figures=names[:1])

    report.SECTIONS["regularizers"] = render_regularizers

A renderer gets a `Context` holding the component's specs and, by run id, their results (None: not finished),
per-epoch metrics and error messages; it writes its files through `ctx.save_figure` / `ctx.write_text` and
returns a `Section` (title, markdown body, PNG file names to show) or None to show nothing. Bodies use a small
markdown subset that `report.html` understands: paragraphs, `#` headings, `- ` lists, pipe tables, `code`,
**bold** and *italic*. Finished runs are the ones with a result; `ctx.finished(specs)` filters them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from rethink import periodic, regularizers, suites
from rethink.models import DEFAULT_LR, DISPLAY
from rethink.spec import RunSpec
from rethink.store import Store, run_key
from rethink.train import first_reached, read_metrics, read_result

SYNTHETIC_BANNER = "SYNTHETIC DATA — these numbers are not CIFAR-10"
MODE_NAMES = {
    ("true", "none"): "true labels",
    ("random", "none"): "random labels",
    ("true", "shuffled"): "shuffled pixels",
    ("true", "random"): "random pixels",
    ("true", "gaussian"): "gaussian",
}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


@dataclass
class Section:
    """What a component contributes to the report: a title, a markdown body and the PNGs to show."""

    title: str
    body: str = ""
    figures: list[str] = field(default_factory=list)  # file names in the report folder, e.g. "fig1a.png"


@dataclass
class Context:
    """Everything a section renderer needs: the component's runs and where to write."""

    store: Store
    suite: str
    out: str  # key prefix of the report folder: "reports/<suite>/"
    component: str
    specs: list[RunSpec]
    results: dict[str, dict | None]  # run id -> result.json (None: not finished)
    metrics: dict[str, list[dict]]  # run id -> per-epoch records of metrics.jsonl
    errors: dict[str, str]  # run id -> error message of error.json (failed, unfinished runs only)
    log: Callable[[str], None] = print
    overfit_threshold: float = suites.OVERFIT_THRESHOLD  # Figure 1b: training accuracy that counts as fitted
    written: list[str] = field(default_factory=list)  # keys written so far (shared by all sections)
    images: dict[str, bytes] = field(default_factory=dict)  # PNG file name -> bytes, for report.html

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write a file into the report folder; returns its key."""
        key = self.out + name
        self.store.write_bytes(key, data)
        self.written.append(key)
        self.log(f"wrote {self.store.where(key)}")
        return key

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode())

    def save_figure(self, fig: Figure, name: str) -> list[str]:
        """Write `fig` as <name>.png and <name>.svg; returns the two file names."""
        png, svg = io.BytesIO(), io.BytesIO()
        fig.savefig(png, format="png", dpi=130, bbox_inches="tight")
        fig.savefig(svg, format="svg", bbox_inches="tight", metadata={"Date": None})
        self.images[f"{name}.png"] = png.getvalue()
        self.write_bytes(f"{name}.png", png.getvalue())
        self.write_bytes(f"{name}.svg", svg.getvalue())
        return [f"{name}.png", f"{name}.svg"]

    def write_csv(self, name: str, rows: list[dict], columns: list[str]) -> str:
        """Write a figure's or table's numbers as <name>.csv (8 significant digits); returns the file name."""
        df = pd.DataFrame(rows, columns=columns)
        self.write_text(f"{name}.csv", df.to_csv(index=False, float_format="%.8g"))
        return f"{name}.csv"

    def finished(self, specs: list[RunSpec] | None = None) -> list[RunSpec]:
        """The specs (default: the component's) whose run has a result."""
        return [s for s in (self.specs if specs is None else specs) if self.results.get(s.run_id) is not None]

    def seed_groups(self, specs: list[RunSpec] | None = None) -> dict[str, list[RunSpec]]:
        """Specs grouped by everything but the seed, keyed by a label without the seed, in first-seen order."""
        groups: dict[str, list[RunSpec]] = {}
        for s in self.specs if specs is None else specs:
            groups.setdefault(s.label().rsplit(" seed=", 1)[0], []).append(s)
        return groups

    def curves(self, specs: list[RunSpec]) -> list[list[dict]]:
        """The metrics of the finished runs among `specs` (one list of epoch records per seed)."""
        return [self.metrics.get(s.run_id) or [] for s in self.finished(specs) if self.metrics.get(s.run_id)]


# ---------------------------------------------------------------------------------------------- plotting helpers


def new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.4, sharey: bool = False):
    """A figure on the Agg canvas (no display, no global pyplot state) and its axes."""
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, sharey=sharey, squeeze=False)[0]
    return fig, (axes[0] if ncols == 1 else list(axes))


def finish_axes(ax, title: str, xlabel: str, ylabel: str, legend: bool = True, **legend_kw) -> None:
    """Title, axis labels, a light grid, integer ticks for epochs/steps, and a legend when there is one."""
    ax.set_title(title, fontsize=12)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)
    if xlabel in ("epoch", "training step"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if legend and (ax.get_legend_handles_labels()[0] or legend_kw.get("handles")):
        ax.legend(fontsize=9, **legend_kw)


def no_data(ax, what: str = "no finished runs yet") -> None:
    """Say so inside an empty plot: the figure file is still written, so it never goes stale."""
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="gray")


def curve_stats(runs: list[list[dict]], x: str, y: str) -> pd.DataFrame:
    """Per epoch across seeds: mean x, mean and std of y, and n, the number of seeds that reached the epoch."""
    rows = [(m["epoch"], m[x], m[y]) for ms in runs for m in ms]
    if not rows:
        return pd.DataFrame(columns=["epoch", "x", "mean", "std", "n"])
    df = pd.DataFrame(rows, columns=["epoch", "x", "y"])
    g = df.groupby("epoch").agg(x=("x", "mean"), mean=("y", "mean"), std=("y", "std"), n=("y", "count"))
    return g.reset_index().fillna({"std": 0.0})


def plot_curves(
    ax, runs: list[list[dict]], x: str, y: str, label: str, color=None, style: str = "-", band: bool = True
) -> pd.DataFrame:
    """Mean of `y` against `x` over seeds, with a +-1 std band when there are several; returns the stats."""
    st = curve_stats(runs, x, y)
    if st.empty:
        return st
    if len(runs) > 1:
        label = f"{label} (mean ± std, {len(runs)} seeds)"
    (line,) = ax.plot(st["x"], st["mean"], style, color=color, label=label, lw=1.8,
                      marker="." if len(st) < 30 else None)  # fmt: skip
    if band and len(runs) > 1:
        ax.fill_between(st["x"], st["mean"] - st["std"], st["mean"] + st["std"], color=line.get_color(),
                        alpha=0.18, lw=0)  # fmt: skip
    return st


def plot_points(ax, xs, means, stds, exact, label: str, color, marker: str) -> None:
    """A line through per-x means with std error bars; filled markers where `exact`, hollow where a bound."""
    xs, means, stds, exact = (np.asarray(a) for a in (xs, means, stds, exact))
    if len(xs) == 0:
        return
    ax.errorbar(xs, means, yerr=np.nan_to_num(stds), color=color, lw=1.6, capsize=3, zorder=2)
    for mask, face in ((exact.astype(bool), color), (~exact.astype(bool), "white")):
        if mask.any():
            ax.scatter(xs[mask], means[mask], marker=marker, s=48, facecolors=face, edgecolors=color,
                       linewidths=1.6, zorder=3)  # fmt: skip
    ax.plot([], [], color=color, marker=marker, label=label)  # the legend entry


HOLLOW_NOTE = "hollow: never reached the threshold within its epoch cap (plotted at its last step)"


def hollow_handle() -> Line2D:
    """The legend entry explaining hollow markers."""
    return Line2D([], [], color="gray", marker="o", mfc="white", ls="none", label=HOLLOW_NOTE)


# ---------------------------------------------------------------------------------------------- formatting


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """'m' for one value, 'm ± s' for several, '' for none."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def md_table(header: list[str], rows: list[list]) -> str:
    """A pipe table; cells are str()-ed with pipes and newlines escaped."""

    def cell(v) -> str:
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _seeds_note(n_runs: list[int]) -> str:
    several = max(n_runs, default=1) > 1
    return " Lines are the mean over seeds, bands ± one standard deviation." if several else ""


# ---------------------------------------------------------------------------------------------- sections


def data_link(*names: str) -> str:
    """'Data: [fig1b.csv](fig1b.csv), ...': the numbers behind a figure, linked beside it."""
    return " Data: " + ", ".join(f"[{n}]({n})" for n in names) + "."


def render_fig1a(ctx: Context) -> Section:
    """Training loss against steps for the five randomization tests (Small Inception)."""
    fig, ax = new_figure()
    rows, counts, points = [], [], []
    for i, (labels, pixels) in enumerate(suites.FIG1A_MODES):
        specs = [s for s in ctx.specs if (s.labels, s.pixels) == (labels, pixels)]
        runs = ctx.curves(specs)
        counts.append(len(runs))
        name = MODE_NAMES[(labels, pixels)]
        st = plot_curves(ax, runs, "step", "train_loss", name, COLORS[i])
        points += [{"mode": name, "epoch": int(r.epoch), "step": r.x, "train_loss": r.mean, "train_loss_std": r.std,
                    "seeds": int(r.n)} for r in st.itertuples()]  # fmt: skip
        done = [ctx.results[s.run_id] for s in ctx.finished(specs)]
        steps01 = [r["loss_threshold_steps"].get("0.1") for r in done]
        reached = [v for v in steps01 if v is not None]
        never = len(steps01) - len(reached)
        rows.append([name, f"{len(done)} of {len(specs)}", _mean_std([r["final_train_loss"] for r in done], 1, 4),
                     (_mean_std(reached, 1, 0) + f" ({never} of {len(done)} never)" if reached and never
                      else "never" if never else _mean_std(reached, 1, 0))])  # fmt: skip
    if not any(counts):
        no_data(ax)
    finish_axes(
        ax, "Figure 1a: Small Inception, training loss", "training step", "training loss (epoch mean)"
    )
    ax.set_ylim(bottom=0)
    names = ctx.save_figure(fig, "fig1a")
    csv = ctx.write_csv("fig1a", points, ["mode", "epoch", "step", "train_loss", "train_loss_std", "seeds"])
    body = (
        "Mean training loss of each epoch against the SGD step at its end, for true labels, random labels, "
        "shuffled pixels, random pixels and gaussian inputs."
        + _seeds_note(counts)
        + data_link(csv)
        + "\n\n"
        + md_table(["mode", "runs finished", "final train loss", "steps to train loss < 0.1"], rows)
    )
    return Section("Figure 1a: fitting random labels and random pixels", body, names[:1])


def overfit_step(metrics: list[dict], result: dict, threshold: float) -> tuple[int, bool]:
    """(the step of the first epoch end with training accuracy >= threshold, True), or (the run's last step,
    False) when it never got there: a lower bound of its time to overfit."""
    hit = first_reached(metrics, threshold)
    return (hit["step"], True) if hit else (result["steps"], False)


def _fig1bc_points(ctx: Context, model: str):
    """Per corruption level p of `model`: p, time to overfit and test error (lists per seed), flags."""
    groups: dict[float, list[RunSpec]] = {}
    for s in ctx.specs:
        if s.model == model:
            groups.setdefault(s.label_noise, []).append(s)
    out = []
    for p in sorted(groups):
        done = ctx.finished(groups[p])
        if not done:
            continue
        results = [ctx.results[s.run_id] for s in done]
        hits = [overfit_step(ctx.metrics.get(s.run_id) or [], ctx.results[s.run_id], ctx.overfit_threshold)
                for s in done]  # fmt: skip
        out.append(dict(p=p, n=len(done), expected=len(groups[p]), steps=[h[0] for h in hits],
                        reached=all(h[1] for h in hits),
                        caps=sorted({r["epochs"] for r, h in zip(results, hits) if not h[1]}),
                        test_err=[1 - r["final_test_acc"] for r in results]))  # fmt: skip
    return out


def render_fig1bc(ctx: Context) -> Section:
    """Relative time to overfit (Figure 1b) and test error (Figure 1c) against label corruption."""
    models = [m for m in suites.FIG1BC_MODELS if any(s.model == m for s in ctx.specs)]
    models += sorted({s.model for s in ctx.specs} - set(models))
    fig_b, ax_b = new_figure()
    fig_c, ax_c = new_figure()
    rows, any_hollow, any_points, notes = [], False, False, []
    csv_b, csv_c = [], []
    target = ctx.overfit_threshold
    points = {m: _fig1bc_points(ctx, m) for m in models}
    for i, model in enumerate(models):
        pts = points[model]
        base = next((q for q in pts if q["p"] == 0.0), None)
        color, marker = COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]
        if pts:
            any_points = True
        if base is None:
            notes.append(f"{DISPLAY[model]}: no finished true-label run, so no relative time")
        else:
            base_steps = float(np.mean(base["steps"]))
            if not base["reached"]:
                notes.append(f"{DISPLAY[model]}: the true-label run did not reach the threshold either; its times "
                             "are relative to its cap")  # fmt: skip
            rel = [[v / base_steps for v in q["steps"]] for q in pts]
            exact = [q["reached"] and base["reached"] for q in pts]
            any_hollow |= not all(exact)
            rel_mean = [float(np.mean(r)) for r in rel]
            rel_std = [float(np.std(r, ddof=1)) if len(r) > 1 else 0.0 for r in rel]
            plot_points(ax_b, [q["p"] for q in pts], rel_mean, rel_std, exact, DISPLAY[model], color, marker)
            csv_b += [{"model": model, "p": q["p"], "runs": q["n"], "threshold": target,
                       "steps": float(np.mean(q["steps"])), "true_label_steps": base_steps, "relative": m,
                       "relative_std": sd, "exact": e} for q, m, sd, e in zip(pts, rel_mean, rel_std, exact)]  # fmt: skip
        err_mean = [float(np.mean(q["test_err"])) for q in pts]
        err_std = [float(np.std(q["test_err"], ddof=1)) if q["n"] > 1 else 0.0 for q in pts]
        plot_points(ax_c, [q["p"] for q in pts], err_mean, err_std, [q["reached"] for q in pts], DISPLAY[model],
                    color, marker)  # fmt: skip
        csv_c += [{"model": model, "p": q["p"], "runs": q["n"], "test_error": m, "test_error_std": sd}
                  for q, m, sd in zip(pts, err_mean, err_std)]  # fmt: skip
        for q in pts:
            t = _mean_std(q["steps"], 1, 0)
            if not q["reached"]:
                t = f">= {t} (not reached by epoch {', '.join(map(str, q['caps']))})"
            rel_s = "" if base is None else _mean_std([v / np.mean(base["steps"]) for v in q["steps"]], 1, 2)
            rows.append([DISPLAY[model], f"{q['p']:g}", f"{q['n']} of {q['expected']}", t, rel_s,
                         _mean_std(q["test_err"], 100, 2)])  # fmt: skip
    for ax in (ax_b, ax_c):
        if not any_points:
            no_data(ax)
        ax.set_xticks(suites.CORRUPTION_LEVELS)
    extra = [hollow_handle()] if any_hollow else []
    handles_b = ax_b.get_legend_handles_labels()[0] + extra
    finish_axes(ax_b, f"Figure 1b: time to overfit ({100 * target:g}% training accuracy) vs label corruption",
                "label corruption p", f"relative time to reach {100 * target:g}% train acc (steps / true labels')",
                handles=handles_b)  # fmt: skip
    ax_b.set_ylim(bottom=0)
    ax_c.axhline(0.9, color="gray", ls="--", lw=1, label="chance (90% error)")
    hollow_c = any(not q["reached"] for pts in points.values() for q in pts)
    handles_c = ax_c.get_legend_handles_labels()[0] + ([hollow_handle()] if hollow_c else [])
    finish_axes(ax_c, "Figure 1c: test error vs label corruption", "label corruption p",
                "test error (1 - final test accuracy)", handles=handles_c)  # fmt: skip
    ax_c.set_ylim(0, 1)
    names = ctx.save_figure(fig_b, "fig1b")[:1] + ctx.save_figure(fig_c, "fig1c")[:1]
    data = [ctx.write_csv("fig1b", csv_b, ["model", "p", "runs", "threshold", "steps", "true_label_steps", "relative",
                                           "relative_std", "exact"]),
            ctx.write_csv("fig1c", csv_c, ["model", "p", "runs", "test_error", "test_error_std"])]  # fmt: skip
    body = (
        f"Time to overfit: the SGD step at the first epoch end with training accuracy >= {100 * target:g}%, "
        "divided by that of the same model on true labels (p = 0). A run that never reached the threshold within "
        "its epoch cap is drawn hollow at its cap: its true time is at least that. Test error is measured at "
        "the end of the run. Error bars: ± one standard deviation over seeds, where there are several."
        + data_link(*data) + "\n\n"
        + "".join(f"- {n}\n" for n in notes)
        + ("\n" if notes else "")
        + md_table(
            ["model", "p", "runs finished", "time to overfit (steps)", "relative", "test error (%)"], rows
        )
    )
    return Section("Figure 1b/c: label corruption", body, names)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else np.nan


def _std(values: list[float]) -> float:
    """Sample standard deviation; NaN (an empty cell) for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else np.nan


def table1_frame(ctx: Context) -> pd.DataFrame:
    """One row per row of the paper's Table 1: the paper's accuracies next to ours (%, mean and std over seeds)."""
    rows = []
    for i, (model, crop, wd, labels, paper_train, paper_test) in enumerate(suites.TABLE1_ROWS):
        specs = [s for s in ctx.specs if f"table1:{i}" in s.tags]
        done = [ctx.results[s.run_id] for s in ctx.finished(specs)]
        failed = [s for s in specs if s.run_id in ctx.errors]
        train = [100 * r["final_train_acc"] for r in done]
        test = [100 * r["final_test_acc"] for r in done]
        if done and len(done) == len(specs):
            status = "ok"
        elif done:
            status = f"incomplete ({len(done)} of {len(specs)} seeds)"
        elif failed:
            status = "failed"
        else:
            status = f"missing: needs {needs(specs)}" if specs else "missing"
        rows.append({
            "row": i, "model": DISPLAY[model], "random_crop": crop, "weight_decay": wd, "labels": labels,
            "paper_train_acc": paper_train, "paper_test_acc": paper_test,
            "train_acc": _mean(train), "train_acc_std": _std(train),
            "test_acc": _mean(test), "test_acc_std": _std(test),
            "train_diff": _mean(train) - paper_train, "test_diff": _mean(test) - paper_test,
            "n_seeds": len(done), "n_expected": len(specs), "status": status,
            "stopped": ", ".join(sorted({r["stopped"] for r in done})),
            "epochs": ", ".join(str(e) for e in sorted({r["epochs"] for r in done})),
            "run_ids": " ".join(s.run_id for s in specs),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _fmt(v, std=np.nan, signed=False) -> str:
    if v is None or pd.isna(v):
        return ""
    s = f"{v:+.2f}" if signed else f"{v:.2f}"
    return s if pd.isna(std) else f"{s} ± {std:.2f}"


def render_table1(ctx: Context) -> Section:
    """Table 1: train/test accuracy with and without random crop and weight decay, paper vs ours."""
    df = table1_frame(ctx)
    ctx.write_text("table1.csv", df.round(4).to_csv(index=False))
    yes = {True: "yes", False: "no"}
    rows = [
        [r.model + (", random labels" if r.labels == "random" else ""), yes[r.random_crop], yes[r.weight_decay],
         _fmt(r.paper_train_acc), _fmt(r.train_acc, r.train_acc_std), _fmt(r.train_diff, signed=True),
         _fmt(r.paper_test_acc), _fmt(r.test_acc, r.test_acc_std), _fmt(r.test_diff, signed=True),
         r.n_seeds, r.status]
        for r in df.itertuples()
    ]  # fmt: skip
    table = md_table(["model", "crop", "wd", "train (paper)", "train (ours)", "Δ train", "test (paper)",
                      "test (ours)", "Δ test", "seeds", "status"], rows)  # fmt: skip
    several = (df["n_seeds"] > 1).any()
    body = (
        "Final training and test accuracy (%) of each row of the paper's Table 1, ours next to the paper's; "
        "Δ = ours − paper (percentage points)."
        + (" Ours: mean ± standard deviation over seeds." if several else "")
        + " Rows without a finished run are kept with empty values and status 'missing' (or 'failed')."
        + data_link("table1.csv") + "\n\n"
        + table
    )
    ctx.write_text("table1.md", "# Table 1: paper vs this reproduction\n\n" + body + "\n")
    return Section("Table 1: accuracy with and without explicit regularization", body)


def render_fig2b(ctx: Context) -> Section:
    """Learning curves with and without BatchNorm; the shaded area is the cumulative best test accuracy."""
    models = list(dict.fromkeys(s.model for s in ctx.specs))
    fig, axes = new_figure(ncols=max(1, len(models)), width=5.6, sharey=True)
    axes = axes if isinstance(axes, list) else [axes]
    rows, counts, points = [], [], []
    for ax, model in zip(axes, models):
        specs = [s for s in ctx.specs if s.model == model]
        runs = ctx.curves(specs)
        counts.append(len(runs))
        train = plot_curves(ax, runs, "epoch", "train_acc", "train accuracy", COLORS[0])
        test = plot_curves(ax, runs, "epoch", "test_acc", "test accuracy", COLORS[1], style="--")
        if not test.empty:
            best = test["mean"].cummax()
            points += [{"model": model, "epoch": int(a.epoch), "train_acc": a.mean, "train_acc_std": a.std,
                        "test_acc": b.mean, "test_acc_std": b.std, "best_test_acc": c, "seeds": int(b.n)}
                       for a, b, c in zip(train.itertuples(), test.itertuples(), best)]  # fmt: skip
            ax.fill_between(test["x"], test["mean"], best, color=COLORS[2], alpha=0.35, lw=0,
                            label="cumulative best test accuracy (gain of early stopping)")  # fmt: skip
            done = [ctx.results[s.run_id] for s in ctx.finished(specs)]
            rows.append([DISPLAY[model], len(runs), _mean_std([r["final_train_acc"] for r in done], 100),
                         _mean_std([r["final_test_acc"] for r in done], 100),
                         _mean_std([r["best_test_acc"] for r in done], 100),
                         _mean_std([r["best_test_acc"] - r["final_test_acc"] for r in done], 100)])  # fmt: skip
        else:
            no_data(ax)
        finish_axes(ax, f"Figure 2b: {DISPLAY[model]}", "epoch", "accuracy")
        ax.set_ylim(0, 1.02)
    names = ctx.save_figure(fig, "fig2b")
    csv = ctx.write_csv("fig2b", points, ["model", "epoch", "train_acc", "train_acc_std", "test_acc", "test_acc_std",
                                          "best_test_acc", "seeds"])  # fmt: skip
    body = (
        "Training and test accuracy at each epoch end, all explicit regularizers off, to the epoch cap. The "
        "shaded area between the test accuracy and its running maximum is what early stopping could gain."
        + _seeds_note(counts)
        + data_link(csv)
        + "\n\n"
        + md_table(
            [
                "model",
                "runs",
                "final train acc (%)",
                "final test acc (%)",
                "best test acc (%)",
                "early-stopping gain (pp)",
            ],
            rows,
        )  # fmt: skip
    )
    return Section("Figure 2b: with and without BatchNorm", body, names[:1])


def mode_name(spec: RunSpec) -> str:
    """'random labels', 'labels corrupted with p = 0.5', 'shuffled pixels', ... for a spec's randomization test."""
    if (spec.labels, spec.pixels) in MODE_NAMES:
        return MODE_NAMES[(spec.labels, spec.pixels)]
    parts = []
    if spec.labels != "true":
        parts.append("random labels" if spec.labels == "random" else f"labels corrupted with p = {spec.label_noise:g}")
    if spec.pixels != "none":
        parts.append(MODE_NAMES.get(("true", spec.pixels), f"{spec.pixels} pixels"))
    return ", ".join(parts)


def render_quickstart(ctx: Context) -> Section:
    """Training and test accuracy per epoch of each randomization test: random labels fitted, test at chance."""
    fig, (ax_train, ax_test) = new_figure(ncols=2, width=5.6, sharey=True)
    groups: dict[str, list[RunSpec]] = {}
    for s in ctx.specs:
        groups.setdefault(mode_name(s), []).append(s)
    rows, counts, csv_rows = [], [], []
    for i, (name, specs) in enumerate(groups.items()):
        runs = ctx.curves(specs)
        counts.append(len(runs))
        color = COLORS[i % len(COLORS)]
        plot_curves(ax_train, runs, "epoch", "train_acc", name, color)
        plot_curves(ax_test, runs, "epoch", "test_acc", name, color, style="--")
        for s in ctx.finished(specs):
            for m in ctx.metrics.get(s.run_id) or []:
                csv_rows.append({"mode": name, "seed": s.seed, "run_id": s.run_id, "epoch": m["epoch"],
                                 "step": m["step"], "train_loss": m["train_loss"], "train_acc": m["train_acc"],
                                 "test_acc": m["test_acc"]})  # fmt: skip
        done = [ctx.results[s.run_id] for s in ctx.finished(specs)]
        fit = [first_reached(ctx.metrics.get(s.run_id) or [], ctx.overfit_threshold) for s in ctx.finished(specs)]
        rows.append([name, f"{len(done)} of {len(specs)}", _mean_std([r["final_train_acc"] for r in done], 100),
                     _mean_std([r["final_test_acc"] for r in done], 100),
                     ", ".join("never" if h is None else str(h["epoch"]) for h in fit)])  # fmt: skip
    for ax in (ax_train, ax_test):
        if not any(counts):
            no_data(ax)
        ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance (10%)")
        ax.set_ylim(0, 1.02)
    cap = max((s.epochs for s in ctx.specs), default=0)
    n = sorted({s.train_subset or "all" for s in ctx.specs}, key=str)
    finish_axes(ax_train, "training accuracy (whole training set)", "epoch", "accuracy")
    finish_axes(ax_test, "test accuracy (true test labels)", "epoch", "accuracy", legend=False)
    fig.suptitle(f"{DISPLAY[ctx.specs[0].model] if ctx.specs else ''}: fitting random labels and random pixels "
                 f"({', '.join(map(str, n))} training images, {cap} epochs)", fontsize=12)  # fmt: skip
    names = ctx.save_figure(fig, "quickstart")
    csv = ctx.write_csv("quickstart", csv_rows, ["mode", "seed", "run_id", "epoch", "step", "train_loss", "train_acc",
                                                 "test_acc"])  # fmt: skip
    body = (
        "The paper's central observation, small enough for a laptop: the same network and optimizer fit the "
        "training set whatever its labels or pixels are (left), while the test accuracy (right, always on the "
        "true test labels) is what separates real structure from noise: at chance for random labels and "
        "gaussian inputs, in between for half-corrupted labels." + _seeds_note(counts) + data_link(csv)
        + "\n\n"
        + md_table(["mode", "runs finished", "final train acc (%)", "final test acc (%)",
                    f"first epoch with train acc >= {100 * ctx.overfit_threshold:g}%"], rows)  # fmt: skip
    )
    return Section("Quickstart: fitting random labels", body, names[:1])


SECTIONS: dict[str, Callable[[Context], Section | None]] = {
    "quickstart": render_quickstart,
    "fig1a": render_fig1a,
    "fig1bc": render_fig1bc,
    "table1": render_table1,
    "fig2b": render_fig2b,
    "regularizers": regularizers.render,  # rethink/regularizers.py
    "periodic": periodic.render,  # rethink/periodic.py
    "periodic-smoke": periodic.render,
}


# ---------------------------------------------------------------------------------------------- the report


def _state(store: Store, spec: RunSpec, results, metrics, errors) -> tuple[str, str]:
    rid = spec.run_id
    if results.get(rid) is not None:
        return "finished", ""
    if rid in errors:
        return "failed", errors[rid]
    if metrics.get(rid) or store.exists(run_key(rid, "checkpoint.pt")):
        return "partial", f"{len(metrics.get(rid) or [])} of {spec.epochs} epochs"
    return "missing", "not in the store"


def _load(store: Store, specs: list[RunSpec], log) -> tuple[dict, dict, dict]:
    results, metrics, errors = {}, {}, {}
    for s in specs:
        rid = s.run_id
        results[rid] = read_result(store, rid, log)
        try:
            metrics[rid] = read_metrics(store, rid)
        except ValueError as e:
            log(f"warning: ignoring unreadable {store.where(run_key(rid, 'metrics.jsonl'))} ({e})")
            metrics[rid] = []
        if results[rid] is None:
            text = store.read_text(run_key(rid, "error.json"))
            if text is not None:
                try:
                    errors[rid] = str(json.loads(text).get("error") or "unknown error")
                except (ValueError, AttributeError):
                    errors[rid] = "unreadable error.json"
    return results, metrics, errors


def _protocol(specs: list[RunSpec], o: suites.Options, overfit_threshold: float) -> str:
    def values(attr) -> str:
        return ", ".join(sorted({f"{getattr(s, attr):g}" if isinstance(getattr(s, attr), float)
                                 else str(getattr(s, attr)) for s in specs}))  # fmt: skip

    caps = {
        m: sorted({s.epochs for s in specs if s.model == m}) for m in dict.fromkeys(s.model for s in specs)
    }
    subsets = sorted({(s.train_subset, s.test_subset) for s in specs}, key=str)
    items = [
        f"batch size {values('batch_size')}; SGD momentum {values('momentum')}",
        "initial learning rate "
        + ", ".join(f"{DISPLAY[m]} {DEFAULT_LR[m]:g}" for m in DEFAULT_LR)
        + f"; multiplied by {values('lr_decay')} after every epoch",
        f"weight decay, when on: {suites.WEIGHT_DECAY:g} (coupled L2 added to the gradient) on the kernels of "
        "convolutional and linear layers only, not on biases or BatchNorm offsets",
        "preprocessing: central 28x28 crop and per-image standardization; random crop: a 28x28 window per image "
        "per epoch; evaluation always uses the central crop",
        "test labels: always the true labels (corruptions touch the training labels only)",
        f"time to overfit: the step count at the first epoch end with training accuracy >= "
        f"{100 * overfit_threshold:g}% (evaluated on the whole training set, float32 logits)",
        "epoch caps of the paper suites: "
        + ", ".join(f"{m} {c}" for m, c in suites.EPOCH_CAPS.items())
        + "; in this report: "
        + "; ".join(f"{m} {', '.join(map(str, c))}" for m, c in caps.items()),
        "stopping: "
        + ("every run trains to its epoch cap (accuracies after convergence)"
           if all(s.target_train_acc is None for s in specs)
           else "runs with a target stop at the first epoch end reaching it ("
           + ", ".join(sorted({f"{100 * s.target_train_acc:g}%" for s in specs if s.target_train_acc}))
           + "), the others at their cap: accuracies are not all after convergence"),
        "Small AlexNet LRN: size 9, alpha 1e-3, beta 0.75, k 1",
        "Small Inception BatchNorm without scale (no affine parameters, a learned per-channel offset after it); "
        "PyTorch defaults momentum 0.1, eps 1e-5",
        f"seeds: {o.seeds}; data sets: {values('dataset')}",
    ]
    if subsets != [(None, None)]:
        items.append(
            "subsets (train/test images): " + ", ".join(f"{a or 'all'}/{b or 'all'}" for a, b in subsets)
        )
    return "".join(f"- {i}\n" for i in items) + "\nAll choices are listed in docs/protocol.md.\n"


def _environment(results: dict) -> str:
    envs: dict[str, list] = {}
    for r in results.values():
        if r is not None:
            env = r.get("environment") or {}
            envs.setdefault(json.dumps(env, sort_keys=True), []).append(r)
    if not envs:
        return "No finished runs yet.\n"
    keys = [
        "device",
        "device_name",
        "torch",
        "python",
        "rethink",
        "git",
        "threads",
        "precision",
        "channels_last",
        "compile",
    ]
    rows = []
    for text, rs in envs.items():
        env = json.loads(text)
        rows.append([env.get(k, "") for k in keys] + [len(rs)])
    data = sorted({data_line(r.get("data")) for r in results.values() if r is not None})
    return md_table(keys + ["runs"], rows) + "\n\nData: " + "; ".join(data) + "\n"


def data_line(data) -> str:
    """A result's data provenance in one line: what it was and the md5 of each file read."""
    if not isinstance(data, dict):
        return str(data or "")
    md5 = data.get("file_md5") or {}
    files = ", ".join(f"{name} {digest}" for name, digest in md5.items())
    return data.get("description", data.get("identity", "")) + (f" (md5: {files})" if files else "")


def needs(specs: list[RunSpec]) -> str:
    """What training `specs` costs, from the catalogue's estimates: 'about 40 GPU-minutes' (and CPU time for MLPs)."""
    def minutes(seconds: float, kind: str) -> str:
        m = max(1, round(seconds / 60))
        return f"{m} {kind}-minute{'s' if m != 1 else ''}"

    text = "about " + minutes(suites.estimate_seconds(specs, "gpu"), "GPU")
    if all(s.model.startswith("mlp") for s in specs):
        text += " or " + minutes(suites.estimate_seconds(specs, "cpu"), "CPU")
    return text + ", estimated"


def _status(store, specs, results, metrics, errors, selection=None) -> tuple[str, dict]:
    counts: dict[str, int] = {}
    lines, unselected = [], []
    for s in specs:
        state, detail = _state(store, s, results, metrics, errors)
        if state == "missing" and selection is not None and s not in selection:
            unselected.append(s)
            state = "not selected"
        counts[state] = counts.get(state, 0) + 1
        if state not in ("finished", "not selected"):
            lines.append(
                f"- `{s.run_id}` **{state}**: {s.label()} ({', '.join(s.tags)}): {md_escape(detail)}"
            )
    summary = ", ".join(f"{n} {st}" for st, n in counts.items())
    if not lines and not unselected:
        return f"All {len(specs)} runs finished.\n", counts
    text = f"{summary} of {len(specs)} runs. Figures and tables use the finished runs only."
    if unselected:
        by_model: dict[str, list[RunSpec]] = {}
        for s in unselected:
            by_model.setdefault(s.model, []).append(s)
        text += (f"\n\nNot selected for this store ({selection.describe()}), so not run: "
                 + "; ".join(f"{len(v)} runs of {DISPLAY[m]}, {needs(v)}" for m, v in by_model.items()) + ".")
    if lines:
        text += " These are not finished:\n\n" + "\n".join(lines)
    return text + "\n", counts  # fmt: skip


def aggregate(store: Store, suite: str, o: suites.Options, log=print,
              overfit_threshold: float = suites.OVERFIT_THRESHOLD, selection=None) -> list[str]:  # fmt: skip
    """Render `reports/<suite>/` from the suite's runs in `store`; returns the keys written."""
    specs_by_component = suites.components(suite, o)
    all_specs = suites.expand(suite, o)
    info = suites.get_suite(suite)
    out = f"reports/{suite}/"
    results, metrics, errors = _load(store, all_specs, log)
    written: list[str] = []
    images: dict[str, bytes] = {}
    sections: list[Section] = []
    for component, specs in specs_by_component.items():
        render = SECTIONS.get(component)
        if render is None:
            log(f"note: no report section for component {component!r}; its runs are listed under run status")
            continue
        ids = [s.run_id for s in specs]
        ctx = Context(store=store, suite=suite, out=out, component=component, specs=specs,
                      results={i: results[i] for i in ids}, metrics={i: metrics[i] for i in ids},
                      errors={i: errors[i] for i in ids if i in errors}, log=log,
                      overfit_threshold=overfit_threshold, written=written, images=images)  # fmt: skip
        section = render(ctx)
        if section is not None:
            sections.append(section)

    synthetic = any(s.synthetic for s in all_specs) or any(r and r.get("synthetic") for r in results.values())
    status, counts = _status(store, all_specs, results, metrics, errors, selection)
    n_done = counts.get("finished", 0)
    head = [f"# Rethinking generalization: suite `{suite}`", ""]
    if synthetic:
        head += [f"> **{SYNTHETIC_BANNER}**", ""]
    head += [
        f"{info.description[:1].upper() + info.description[1:]}. {n_done} of {len(all_specs)} runs finished; generated "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {store.where()}.",
        "",
        "Reproduction of Zhang, Bengio, Hardt, Recht and Vinyals, *Understanding Deep Learning Requires "
        "Rethinking Generalization* (ICLR 2017), CIFAR-10 experiments.",
        "",
    ]
    parts = list(head)
    for sec in sections:
        parts += [f"## {sec.title}", ""]
        parts += [f"![{name.rsplit('.', 1)[0]}]({name})\n" for name in sec.figures]
        parts += [sec.body.rstrip(), ""]
    parts += ["## Protocol choices", "", _protocol(all_specs, suites.options_for(info, o), overfit_threshold).rstrip(), ""]
    parts += ["## Environment", "", _environment(results).rstrip(), ""]
    parts += ["## Run status", "", status.rstrip(), ""]
    markdown = "\n".join(parts)

    def write(name: str, text: str) -> None:
        key = out + name
        store.write_text(key, text)
        written.append(key)
        log(f"wrote {store.where(key)}")

    write("report.md", markdown)
    write("report.html", to_html(markdown, images, title=f"rethink report: {suite}"))
    return written


# ---------------------------------------------------------------------------------------------- markdown -> HTML

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 3px; }
.banner { background: #c62828; color: white; font-size: 1.5em; font-weight: bold; padding: 0.6em 1em;
          border: 4px solid #7f0000; text-align: center; margin: 1em 0; }
"""


def md_escape(text: str) -> str:
    """Text shown as is (an error message, say): backslash-escape what the markdown subset would interpret."""
    return re.sub(r"([\\`*|])", r"\\\1", text.replace("\n", " "))


def _inline(text: str) -> str:
    escaped: list[str] = []

    def hold(m) -> str:  # a backslash-escaped character, kept out of the patterns below
        escaped.append(m.group(1))
        return f"\x00{len(escaped) - 1}\x00"

    s = html.escape(re.sub(r"\\([!-/:-@\[-`{-~])", hold, text), quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\[([^\]]+)\]\(([\w./-]+)\)", r'<a href="\2">\1</a>', s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"(?<![*\w])\*([^*\s][^*]*)\*(?![*\w])", r"<em>\1</em>", s)
    return re.sub("\x00(\\d+)\x00", lambda m: html.escape(escaped[int(m.group(1))], quote=False), s)


def _table_html(lines: list[str]) -> str:
    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        return [_inline(p.strip()) for p in parts]

    head, body = cells(lines[0]), [cells(line) for line in lines[2:]]
    out = ["<table>", "<tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body]
    return "\n".join(out + ["</table>"])


def to_html(markdown: str, images: dict[str, bytes], title: str) -> str:
    """The report's markdown subset as one self-contained HTML page, PNGs inlined as data URIs."""
    out: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,4}) (.*)", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
        elif m := re.match(r"!\[(.*)\]\((.+)\)\s*$", line):
            data = images.get(m.group(2))
            if data is None:
                out.append(f"<p>[figure {html.escape(m.group(2))} not rendered]</p>")
            else:
                uri = "data:image/png;base64," + base64.b64encode(data).decode()
                out.append(f'<figure><img alt="{html.escape(m.group(1))}" src="{uri}"></figure>')
            i += 1
        elif line.startswith("> "):
            text = line[2:].strip()
            cls = ' class="banner"' if SYNTHETIC_BANNER in text else ""
            out.append(f"<div{cls}>{_inline(text)}</div>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table_html(block))
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>\n" + "\n".join(items) + "\n</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,4} |!\[|> |\||- )", lines[i]):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(out) + "\n</body>\n</html>\n"
    )
