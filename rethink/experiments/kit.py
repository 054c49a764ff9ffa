"""The report's kit: what a section renderer gets (Context) and gives back (Section), figures on the Agg
canvas (no display, no global pyplot state), curves and points with seed statistics, markdown tables, and the
cost of runs not yet made. Experiments (rethink/experiments) render their sections with it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from rethink.experiments.estimates import estimate_seconds
from rethink.spec import RunSpec
from rethink.store import Store
from rethink.summary import OVERFIT_THRESHOLD  # defined there, torch- and plot-free: the CLI's help reads it

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
    overfit_threshold: float = OVERFIT_THRESHOLD  # Figure 1b: training accuracy that counts as fitted
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
        with matplotlib.rc_context({"svg.hashsalt": name}):  # fixed element ids: the same records give the same bytes
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
    ax, runs: list[list[dict]], x: str, y: str, label: str, color=None, style: str = "-", band: bool = True,
    marker: str | None = None, markevery=None,
) -> pd.DataFrame:
    """Mean of `y` against `x` over seeds, with a +-1 std band when there are several; returns the stats.
    `marker`/`markevery` tell overlapping curves apart (default: small dots on short curves)."""
    st = curve_stats(runs, x, y)
    if st.empty:
        return st
    if len(runs) > 1:
        label = f"{label} (mean ± std, {len(runs)} seeds)"
    if marker is None:
        marker = "." if len(st) < 30 else None
    (line,) = ax.plot(st["x"], st["mean"], linestyle=style, color=color, label=label, lw=1.8, marker=marker,
                      markevery=markevery, markersize=5)  # fmt: skip
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


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
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


def seeds_note(n_runs: list[int]) -> str:
    several = max(n_runs, default=1) > 1
    return " Lines are the mean over seeds, bands ± one standard deviation." if several else ""


def data_link(*names: str) -> str:
    """'Data: [fig1b.csv](fig1b.csv), ...': the numbers behind a figure, linked beside it."""
    return " Data: " + ", ".join(f"[{n}]({n})" for n in names) + "."


def needs(specs: list[RunSpec]) -> str:
    """What training `specs` costs, from the catalogue's estimates, each with where its figure comes from:
    'about 40 GPU-minutes (measured ...) or 3.1 CPU-hours (measured ...)'."""
    from rethink.experiments.estimates import source

    def amount(seconds: float, kind: str) -> str:
        m = max(1, round(seconds / 60))
        if m > 120:
            return f"{seconds / 3600:.1f} {kind}-hours"
        return f"{m} {kind}-minute{'s' if m != 1 else ''}"

    gpu, cpu = estimate_seconds(specs, "gpu"), estimate_seconds(specs, "cpu")
    models = {s.model for s in specs}
    return f"about {amount(gpu, 'GPU')} ({source('gpu', models)}) or {amount(cpu, 'CPU')} ({source('cpu')})"


def md_escape(text: str) -> str:
    """Text shown as is (an error message, say): backslash-escape what the markdown subset would interpret."""
    return re.sub(r"([\\`*|])", r"\\\1", text.replace("\n", " "))
