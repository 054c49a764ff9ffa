"""Figure 2b of the paper: learning curves of Small Inception with and without BatchNorm, all explicit
regularizers off (the same runs as Table 1's rows), with what early stopping could gain."""

from __future__ import annotations

from rethink.experiments.base import Component, Options, suite_spec
from rethink.experiments.kit import (
    COLORS,
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
from rethink.paper import DISPLAY
from rethink.spec import RunSpec


def fig2b(o: Options) -> list[RunSpec]:
    """Learning curves of Small Inception with and without BatchNorm, regularizers off (Table 1's runs)."""
    return [suite_spec(o, s, "fig2b", model) for s in range(o.seeds) for model in ("inception", "inception-nobn")]


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
            rows.append([DISPLAY[model], len(runs), mean_std([r["final_train_acc"] for r in done], 100),
                         mean_std([r["final_test_acc"] for r in done], 100),
                         mean_std([r["best_test_acc"] for r in done], 100),
                         mean_std([r["best_test_acc"] - r["final_test_acc"] for r in done], 100)])  # fmt: skip
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
        + seeds_note(counts)
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


COMPONENTS = [Component("fig2b", fig2b, render_fig2b)]
