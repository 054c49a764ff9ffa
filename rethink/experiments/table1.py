"""Table 1 of the paper: train and test accuracy of every model with and without random crop and weight
decay, and on random labels; ours beside the paper's."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rethink.experiments.base import WEIGHT_DECAY, Component, Options, suite_spec
from rethink.experiments.kit import Context, Section, data_link, md_table, needs
from rethink.paper import DISPLAY, TABLE1_ROWS
from rethink.spec import RunSpec


def table1(o: Options) -> list[RunSpec]:
    """Every CIFAR-10 row of Table 1 (tag 'table1:<row index>')."""
    out = []
    for s in range(o.seeds):
        for i, (model, crop, wd, labels, _, _) in enumerate(TABLE1_ROWS):
            out.append(
                suite_spec(o, s, f"table1:{i}", model, labels=labels, random_crop=crop,
                           weight_decay=WEIGHT_DECAY if wd else 0.0)
            )  # fmt: skip
    return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else np.nan


def _std(values: list[float]) -> float:
    """Sample standard deviation; NaN (an empty cell) for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else np.nan


def table1_frame(ctx: Context) -> pd.DataFrame:
    """One row per row of the paper's Table 1: the paper's accuracies next to ours (%, mean and std over seeds)."""
    rows = []
    for i, (model, crop, wd, labels, paper_train, paper_test) in enumerate(TABLE1_ROWS):
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


COMPONENTS = [Component("table1", table1, render_table1)]
