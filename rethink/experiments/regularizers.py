"""Explicit regularizers with true and random labels (Zhang et al. 2017, Section 3 and Table 1).

Small Inception, Small AlexNet and MLP 1x512, each with no regularizer, weight decay, random crop, dropout, or
all three, on true and on random labels. The runs share the core suites' stopping rule (the epoch cap, unless
--stop-at-acc), so a configuration that is also a Table 1 or Figure 1b/c row is the same run, trained once.
The claims are checked against the measured numbers by `verdicts`, never written in by hand.
"""

from __future__ import annotations

import math

from rethink.experiments.base import WEIGHT_DECAY, Component, Options, suite_spec
from rethink.experiments.kit import Section, md_table
from rethink.paper import DISPLAY, TABLE1_ROWS
from rethink.spec import RunSpec

MODELS = ("inception", "alexnet", "mlp-1x512")
LABELS = ("true", "random")
# [choice] the usual rate for fully connected layers; where it sits: models.py, docs/regularizers.md
DROPOUT = 0.5
SETTINGS = ("none", "weight decay", "random crop", "dropout", "all three")
FIT_ACC = 0.99  # "fits" the training set [choice]: Table 1 counts 99.34% (MLP 1x512, random labels) as fitted
# "helps only a little" [choice]: the paper's largest CIFAR-10 gain is 5.15 points (AlexNet, crop + wd)
SMALL_GAIN = 0.06
# Generalizing at all [choice]: test accuracy at least twice chance (10 classes), else there is nothing to compare.
GENERALIZES = 0.2


def setting_fields(setting: str, weight_decay: float) -> dict:
    """The spec fields of a regularizer setting (fields not named keep the spec's defaults: off)."""
    wd = {"weight_decay": weight_decay}
    crop = {"random_crop": True}
    drop = {"dropout": DROPOUT}
    return {
        "none": {},
        "weight decay": wd,
        "random crop": crop,
        "dropout": drop,
        "all three": {**wd, **crop, **drop},
    }[setting]


def setting_of(spec: RunSpec) -> str | None:
    """The inverse of `setting_fields`: which setting a spec is, or None when it is none of them."""
    on = (spec.weight_decay > 0, spec.random_crop, spec.dropout > 0)
    return {
        (False, False, False): "none",
        (True, False, False): "weight decay",
        (False, True, False): "random crop",
        (False, False, True): "dropout",
        (True, True, True): "all three",
    }.get(on)


def regularizers(o: Options) -> list[RunSpec]:
    """Every (model, labels, setting): 30 runs per seed, tagged 'regularizers'."""
    return [
        suite_spec(o, s, "regularizers", model, labels=labels, **setting_fields(setting, WEIGHT_DECAY))
        for s in range(o.seeds)
        for model in MODELS
        for labels in LABELS
        for setting in SETTINGS
    ]


# ---------------------------------------------------------------------------------------------- analysis


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def table(specs: list[RunSpec], results: dict[str, dict]) -> list[dict]:
    """One row per (model, labels, setting): mean train/test accuracy over the finished seeds.

    `results` maps run ids to result records (train.summarize); runs without one count as missing.
    """
    rows = []
    for model in MODELS:
        for labels in LABELS:
            for setting in SETTINGS:
                group = [
                    s for s in specs if s.model == model and s.labels == labels and setting_of(s) == setting
                ]
                done = [results[s.run_id] for s in group if s.run_id in results]
                train = [r["final_train_acc"] for r in done]
                test = [r["final_test_acc"] for r in done]
                rows.append({
                    "model": model,
                    "labels": labels,
                    "setting": setting,
                    "runs": len(group),
                    "finished": len(done),
                    "train_acc": _mean(train),
                    "train_acc_std": _std(train),
                    "test_acc": _mean(test),
                    "test_acc_std": _std(test),
                    "best_test_acc": _mean([r["best_test_acc"] for r in done]),
                    "epochs": _mean([r["epochs"] for r in done]),
                    "epoch_cap": max((s.epochs for s in group), default=None),
                    "reached_fit": sum((r.get("train_acc_steps") or {}).get(f"{FIT_ACC:g}") is not None
                                       for r in done),
                    "run_ids": " ".join(s.run_id for s in group),
                })  # fmt: skip
    return rows


def _row(rows: list[dict], model: str, labels: str, setting: str) -> dict:
    return next(r for r in rows if (r["model"], r["labels"], r["setting"]) == (model, labels, setting))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def verdicts(rows: list[dict]) -> list[dict]:
    """The paper's three claims about explicit regularizers, each judged from `rows` (see `table`).

    Each verdict: claim, holds (True, False, or None: undecided, when the runs it needs are missing or the
    comparison is meaningless at this budget) and the evidence (measured numbers, and why when undecided).
    """

    def get(model, labels, setting, key="train_acc"):
        return _row(rows, model, labels, setting)[key]

    out = []

    # 1. Regularizers help generalization only a little: no setting adds more than SMALL_GAIN of test accuracy.
    # Only meaningful where the unregularized model fits its training set and generalizes, as in the paper.
    gains, evidence, unfit = [], [], []
    for model in MODELS:
        base, fit = get(model, "true", "none", "test_acc"), get(model, "true", "none")
        if fit is not None and fit < FIT_ACC:
            unfit.append(f"{model} did not fit its training set (train acc {_pct(fit)})")
        elif base is not None and base < GENERALIZES:
            unfit.append(f"{model} does not generalize (test acc {_pct(base)})")
        parts = []
        for setting in SETTINGS[1:]:
            acc = get(model, "true", setting, "test_acc")
            if base is not None and acc is not None:
                gains.append((acc - base, model, setting))
                parts.append(f"{setting} {100 * (acc - base):+.2f}")
        evidence.append(
            f"{model}: none {_pct(base)}; " + (", ".join(parts) or "no regularized runs finished")
        )
    holds = None
    if gains:
        top = max(gains)
        evidence.append(f"largest gain {100 * top[0]:+.2f} points ({top[1]}, {top[2]}); "
                        f"threshold {100 * SMALL_GAIN:.0f} points")  # fmt: skip
        if unfit:
            evidence.append("undecided: without regularizers " + ", ".join(unfit) + f" (the claim needs train acc "
                            f">= {_pct(FIT_ACC)} and test acc >= {_pct(GENERALIZES)})")  # fmt: skip
        else:
            holds = top[0] <= SMALL_GAIN
    out.append({
        "claim": "explicit regularizers improve test accuracy only a little (true labels, gain over none)",
        "holds": holds,
        "evidence": evidence,
    })  # fmt: skip

    # 2. Inception and the MLP still fit random labels with weight decay on.
    accs = {m: get(m, "random", "weight decay") for m in ("inception", "mlp-1x512")}
    known = [a for a in accs.values() if a is not None]
    cap = max((get(m, "random", "weight decay", "epoch_cap") or 0 for m in accs), default=0)
    out.append({
        "claim": f"Inception and MLP 1x512 still fit random labels with weight decay (train acc >= {_pct(FIT_ACC)} "
                 f"within {cap} epochs)",
        "holds": None if len(known) < len(accs) else all(a >= FIT_ACC for a in known),
        "evidence": [f"{m}: train acc {_pct(a)} on random labels with weight decay after "
                     f"{_epochs(get(m, 'random', 'weight decay', 'epochs'))} epochs" for m, a in accs.items()],
    })  # fmt: skip

    # 3. AlexNet with weight decay fails to converge on random labels, within its epoch cap; only a claim about
    # weight decay when AlexNet without it does fit them.
    wd, plain = _row(rows, "alexnet", "random", "weight decay"), _row(rows, "alexnet", "random", "none")
    cap = wd["epoch_cap"]
    evidence = [
        f"alexnet, random labels, weight decay: train acc {_pct(wd['train_acc'])} after {_epochs(wd['epochs'])} "
        f"of {cap} epochs",
        f"without weight decay: train acc {_pct(plain['train_acc'])} after {_epochs(plain['epochs'])} epochs",
    ]
    holds = None
    if wd["train_acc"] is not None and wd["train_acc"] >= FIT_ACC:
        holds = False
    elif wd["train_acc"] is not None and plain["train_acc"] is not None:
        if plain["train_acc"] >= FIT_ACC:
            holds = True
        else:
            evidence.append("undecided: without weight decay it does not fit them either at this budget")
    out.append({
        "claim": f"Small AlexNet with weight decay fails to fit random labels within {cap} epochs (while it "
                 "does without weight decay)",
        "holds": holds,
        "evidence": evidence,
    })  # fmt: skip
    return out


def _epochs(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def verdict_word(holds: bool | None) -> str:
    return {True: "holds", False: "does not hold", None: "undecided"}[holds]


# ---------------------------------------------------------------------------------------------- figure


def figure(rows: list[dict], title: str = ""):
    """Training and test accuracy per setting: one panel per (labels, model), a pair of bars per setting."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * len(MODELS), 3.6 * len(LABELS)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(LABELS), len(MODELS), sharey=True, squeeze=False)
    width, xs = 0.38, list(range(len(SETTINGS)))
    for i, labels in enumerate(LABELS):
        for j, model in enumerate(MODELS):
            ax = axes[i][j]
            got = [_row(rows, model, labels, s) for s in SETTINGS]
            for offset, key, color in (
                (-width / 2, "train_acc", "#1f77b4"),
                (width / 2, "test_acc", "#d62728"),
            ):
                vals = [math.nan if r[key] is None else r[key] for r in got]
                stds = [r[key + "_std"] for r in got]
                errs = None if all(e is None for e in stds) else [e or 0.0 for e in stds]  # several seeds
                ax.bar([x + offset for x in xs], vals, width, yerr=errs, color=color, capsize=2,
                       label=key.replace("_acc", " accuracy"))  # fmt: skip
            ax.axhline(0.1, color="gray", lw=0.8, ls="--", label="chance")
            ax.set_xticks(xs, [s.replace(" ", "\n") for s in SETTINGS], fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{DISPLAY[model]}, {labels} labels", fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
            if j == 0:
                ax.set_ylabel("final accuracy")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------- report


def _paper(model: str, labels: str, setting: str) -> tuple[float, float] | None:
    """The paper's Table 1 (train, test) accuracy in % for this configuration, when Table 1 has it."""
    fields = setting_fields(setting, 1.0)
    key = (model, bool(fields.get("random_crop")), bool(fields.get("weight_decay")), labels)
    if fields.get("dropout"):
        return None
    return next(((tr, te) for m, c, w, lab, tr, te in TABLE1_ROWS if (m, c, w, lab) == key), None)


def render(ctx):
    """The report section of the 'regularizers' component (report.SECTIONS)."""
    import pandas as pd


    results = {rid: r for rid, r in ctx.results.items() if r is not None}
    rows = table(ctx.specs, results)
    names = ctx.save_figure(
        figure(rows, "Explicit regularizers: final train and test accuracy"), "regularizers"
    )
    ctx.write_text("regularizers.csv", pd.DataFrame(rows).to_csv(index=False))
    caps = sorted({s.epochs for s in ctx.specs})
    body = [
        f"Each model with no explicit regularizer, weight decay ({WEIGHT_DECAY:g}), random crop, dropout "
        f"({DROPOUT:g}, before each fully connected layer) or all three, on true and on random labels; every run "
        f"trains to its cap ({', '.join(map(str, caps))} epochs), as in Table 1, so "
        "configurations that are also Table 1 rows are the same runs. Accuracies are final (at the stop); the "
        "paper's Table 1 value is given where it has the configuration. Data: [regularizers.csv](regularizers.csv).",
        "",
        "Claims of the paper, judged from these runs:",
        "",
    ]
    for v in verdicts(rows):
        body.append(f"- **{verdict_word(v['holds'])}**: {v['claim']}. " + "; ".join(v["evidence"]) + ".")
    table_rows = []
    for r in rows:
        paper = _paper(r["model"], r["labels"], r["setting"])
        table_rows.append([
            r["model"], r["labels"], r["setting"], _pct_cell(r["train_acc"], r["train_acc_std"]),
            _pct_cell(r["test_acc"], r["test_acc_std"]), "" if paper is None else f"{paper[0]:.2f} / {paper[1]:.2f}",
            _epochs(r["epochs"]), f"{r['finished']} of {r['runs']}",
        ])  # fmt: skip
    body += ["", md_table(["model", "labels", "setting", "train acc (%)", "test acc (%)", "paper train / test (%)",
                           "epochs", "finished"], table_rows)]  # fmt: skip
    return Section("Explicit regularizers with true and random labels", "\n".join(body), names[:1])


def _pct_cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


COMPONENTS = [Component("regularizers", regularizers, render)]
