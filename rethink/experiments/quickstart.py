"""The quickstart: the paper's central claim in minutes on a laptop CPU (not a paper suite)."""

from __future__ import annotations

from rethink.experiments.base import Component, Options, suite_spec
from rethink.experiments.kit import (
    COLORS,
    MARKERS,
    Context,
    Section,
    data_link,
    finish_axes,
    md_table,
    mean_std,
    new_figure,
    no_data,
    plot_curves,
    seeds_note,
)
from rethink.paper import DISPLAY, FIG1A_MODES
from rethink.spec import RunSpec
from rethink.summary import first_reached

# The quickstart [choice, measured in README.md]: MLP 1x512, the cheapest paper model, on the first QUICK_TRAIN
# training images (all test images) for QUICK_EPOCHS epochs, with the paper's optimizer and schedule. Sized so
# that random labels are fitted within minutes on a laptop CPU; not a paper suite (not in full).
QUICK_MODEL = "mlp-1x512"
QUICK_TRAIN = 10_000
QUICK_EPOCHS = 30
QUICK_MODES = (("true", "none"), ("random", "none"), ("partial:0.5", "none"), ("true", "shuffled"),
               ("true", "gaussian"))  # fmt: skip
# One line style per mode, the same in both panels; markers at staggered epochs keep overlapping curves apart.
LINESTYLES = ["-", "--", "-.", ":", (0, (6, 2, 1, 2, 1, 2))]


def quickstart(o: Options) -> list[RunSpec]:
    """MLP 1x512 on true, random and half-corrupted labels, shuffled pixels and gaussian inputs, small and short."""
    return [
        suite_spec(o, s, "quickstart", QUICK_MODEL, labels=labels, pixels=pixels).replace(
            epochs=o.epochs or QUICK_EPOCHS, train_subset=o.train_subset or QUICK_TRAIN
        )
        for s in range(o.seeds)
        for labels, pixels in QUICK_MODES
    ]


def mode_name(spec: RunSpec) -> str:
    """'random labels', 'labels corrupted with p = 0.5', 'shuffled pixels', ... for a spec's randomization test."""
    if (spec.labels, spec.pixels) in FIG1A_MODES:
        return FIG1A_MODES[(spec.labels, spec.pixels)]
    parts = []
    if spec.labels != "true":
        parts.append("random labels" if spec.labels == "random" else f"labels corrupted with p = {spec.label_noise:g}")
    if spec.pixels != "none":
        parts.append(FIG1A_MODES.get(("true", spec.pixels), f"{spec.pixels} pixels"))
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
        look = dict(color=COLORS[i % len(COLORS)], style=LINESTYLES[i % len(LINESTYLES)],
                    marker=MARKERS[i % len(MARKERS)], markevery=(i, len(LINESTYLES)))  # fmt: skip
        plot_curves(ax_train, runs, "epoch", "train_acc", name, **look)
        plot_curves(ax_test, runs, "epoch", "test_acc", name, **look)
        for s in ctx.finished(specs):
            for m in ctx.metrics.get(s.run_id) or []:
                csv_rows.append({"mode": name, "seed": s.seed, "run_id": s.run_id, "epoch": m["epoch"],
                                 "step": m["step"], "train_loss": m["train_loss"], "train_acc": m["train_acc"],
                                 "test_acc": m["test_acc"]})  # fmt: skip
        done = [ctx.results[s.run_id] for s in ctx.finished(specs)]
        fit = [first_reached(ctx.metrics.get(s.run_id) or [], ctx.overfit_threshold) for s in ctx.finished(specs)]
        rows.append([name, f"{len(done)} of {len(specs)}", mean_std([r["final_train_acc"] for r in done], 100),
                     mean_std([r["final_test_acc"] for r in done], 100),
                     ", ".join("never" if h is None else str(h["epoch"]) for h in fit)])  # fmt: skip
    for ax in (ax_train, ax_test):
        if not any(counts):
            no_data(ax)
        ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance (10%)")
        ax.set_ylim(0, 1.02)
    cap = max((s.epochs for s in ctx.specs), default=0)
    n = sorted({s.train_subset or "all" for s in ctx.specs}, key=str)
    finish_axes(ax_train, "training accuracy (whole training set)", "epoch", "accuracy", legend=False)
    finish_axes(ax_test, "test accuracy (true test labels)", "epoch", "accuracy", legend=False)
    handles, labels = ax_train.get_legend_handles_labels()
    if handles:  # one legend for both panels: a mode has the same colour, line and marker in each
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 6), fontsize=9)
    modes = ", ".join(groups) if groups else "no runs"
    fig.suptitle(f"{DISPLAY[ctx.specs[0].model] if ctx.specs else ''} on {modes} "
                 f"({', '.join(map(str, n))} training images, {cap} epochs)", fontsize=12)  # fmt: skip
    names = ctx.save_figure(fig, "quickstart")
    csv = ctx.write_csv("quickstart", csv_rows, ["mode", "seed", "run_id", "epoch", "step", "train_loss", "train_acc",
                                                 "test_acc"])  # fmt: skip
    body = (
        "The paper's central observation, small enough for a laptop: the same network and optimizer fit the "
        "training set whatever its labels or pixels are (left), while the test accuracy (right, always on the "
        "true test labels) is what separates real structure from noise: at chance for random labels and "
        "gaussian inputs, in between for half-corrupted labels." + seeds_note(counts) + data_link(csv)
        + "\n\n"
        + md_table(["mode", "runs finished", "final train acc (%)", "final test acc (%)",
                    f"first epoch with train acc >= {100 * ctx.overfit_threshold:g}%"], rows)  # fmt: skip
    )
    return Section("Quickstart: fitting random labels", body, names[:1])


COMPONENTS = [Component("quickstart", quickstart, render_quickstart)]
