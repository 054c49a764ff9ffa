"""Figure 1 of the paper: fitting random labels and random pixels (1a), and the time to overfit (1b) and the
test error (1c) against the label corruption level p."""

from __future__ import annotations

import numpy as np

from rethink.experiments.base import Component, Options, suite_spec
from rethink.experiments.kit import (
    COLORS,
    MARKERS,
    Context,
    Section,
    data_link,
    finish_axes,
    hollow_handle,
    md_table,
    mean_std,
    new_figure,
    no_data,
    plot_curves,
    plot_points,
    seeds_note,
)
from rethink.paper import CORRUPTION_LEVELS, DISPLAY, FIG1A_MODES, FIG1BC_MODELS
from rethink.spec import RunSpec
from rethink.summary import first_reached


def fig1a(o: Options) -> list[RunSpec]:
    """Small Inception under true labels, random labels, shuffled pixels, random pixels, gaussian."""
    return [
        suite_spec(o, s, "fig1a", "inception", labels=labels, pixels=pixels)
        for s in range(o.seeds)
        for labels, pixels in FIG1A_MODES
    ]


def fig1bc(o: Options) -> list[RunSpec]:
    """Inception, AlexNet, MLP 1x512 at label corruption p in 0..1: time to overfit and test error."""
    out = []
    for s in range(o.seeds):
        for model in FIG1BC_MODELS:
            for p in CORRUPTION_LEVELS:
                labels = "true" if p == 0 else "random" if p == 1 else f"partial:{p:g}"
                out.append(suite_spec(o, s, "fig1bc", model, labels=labels))
    return out


def render_fig1a(ctx: Context) -> Section:
    """Training loss against steps for the five randomization tests (Small Inception)."""
    fig, ax = new_figure()
    rows, counts, points = [], [], []
    for i, (labels, pixels) in enumerate(FIG1A_MODES):
        specs = [s for s in ctx.specs if (s.labels, s.pixels) == (labels, pixels)]
        runs = ctx.curves(specs)
        counts.append(len(runs))
        name = FIG1A_MODES[(labels, pixels)]
        st = plot_curves(ax, runs, "step", "train_loss", name, COLORS[i])
        points += [{"mode": name, "epoch": int(r.epoch), "step": r.x, "train_loss": r.mean, "train_loss_std": r.std,
                    "seeds": int(r.n)} for r in st.itertuples()]  # fmt: skip
        done = [ctx.results[s.run_id] for s in ctx.finished(specs)]
        steps01 = [r["loss_threshold_steps"].get("0.1") for r in done]
        reached = [v for v in steps01 if v is not None]
        never = len(steps01) - len(reached)
        rows.append([name, f"{len(done)} of {len(specs)}", mean_std([r["final_train_loss"] for r in done], 1, 4),
                     (mean_std(reached, 1, 0) + f" ({never} of {len(done)} never)" if reached and never
                      else "never" if never else mean_std(reached, 1, 0))])  # fmt: skip
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
        + seeds_note(counts)
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
    models = [m for m in FIG1BC_MODELS if any(s.model == m for s in ctx.specs)]
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
            t = mean_std(q["steps"], 1, 0)
            if not q["reached"]:
                t = f">= {t} (not reached by epoch {', '.join(map(str, q['caps']))})"
            rel_s = "" if base is None else mean_std([v / np.mean(base["steps"]) for v in q["steps"]], 1, 2)
            rows.append([DISPLAY[model], f"{q['p']:g}", f"{q['n']} of {q['expected']}", t, rel_s,
                         mean_std(q["test_err"], 100, 2)])  # fmt: skip
    for ax in (ax_b, ax_c):
        if not any_points:
            no_data(ax)
        ax.set_xticks(CORRUPTION_LEVELS)
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


COMPONENTS = [Component("fig1a", fig1a, render_fig1a), Component("fig1bc", fig1bc, render_fig1bc)]
