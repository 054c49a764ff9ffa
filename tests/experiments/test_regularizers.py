"""Explicit regularizers: where dropout sits, the `regularizers` suite, and its report section's verdicts."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from torch import nn

from rethink.cli import main
from rethink.experiments import regularizers
from rethink.models import build_model, count_params
from rethink.paper import PAPER_PARAMS, TABLE1_ROWS
from rethink.report.aggregate import aggregate
from rethink.store import LocalStore
from rethink.store.runs import run_key
from rethink.suites import SUITES, WEIGHT_DECAY, Options, components, expand
from rethink.summary import summarize

# The order in which Dropout (D) and Linear (L) modules run in a forward pass, as docs/regularizers.md states:
# before each fully connected layer; for the MLPs not before the first one (which sees the raw pixels).
DROPOUT_ORDER = {
    "inception": "DL",
    "inception-nobn": "DL",
    "alexnet": "DLDLDL",
    "mlp-1x512": "LDL",
    "mlp-3x512": "LDLDLDL",
}


def _forward_order(model: nn.Module) -> str:
    order = []
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: order.append("D" if isinstance(mod, nn.Dropout) else "L")
        )
        for m in model.modules()
        if isinstance(m, (nn.Dropout, nn.Linear))
    ]
    model(torch.zeros(2, 3, 28, 28))
    for h in hooks:
        h.remove()
    return "".join(order)


@pytest.mark.parametrize("name", sorted(DROPOUT_ORDER))
def test_dropout_sits_before_the_fully_connected_layers(name):
    torch.manual_seed(0)
    model = build_model(name, dropout=regularizers.DROPOUT)
    assert _forward_order(model) == DROPOUT_ORDER[name]
    assert all(m.p == regularizers.DROPOUT for m in model.modules() if isinstance(m, nn.Dropout))
    assert count_params(model) == PAPER_PARAMS[name]  # dropout adds no parameters


@pytest.mark.parametrize("name", sorted(DROPOUT_ORDER))
def test_no_dropout_modules_without_dropout(name):
    model = build_model(name, dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert _forward_order(model) == DROPOUT_ORDER[name].replace("D", "")


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = build_model("mlp-1x512", dropout=0.5)
    seen = []
    model[-1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = torch.randn(64, 3, 28, 28)
    model.train()(x)
    model.eval()(x)
    train_zero = (seen[0] == 0).float().mean().item()
    eval_zero = (seen[1] == 0).float().mean().item()
    # Half of the units the ReLU left non-zero are dropped (zeroed) in training mode, none in evaluation mode.
    assert train_zero == pytest.approx(eval_zero + 0.5 * (1 - eval_zero), abs=0.03)


# ---------------------------------------------------------------------------------------------- the suite


def _setting(spec) -> tuple:
    return (spec.weight_decay, spec.random_crop, spec.dropout)


def test_suite_has_every_model_label_and_setting():
    specs = expand("regularizers", Options(seeds=1))
    assert len(specs) == 30
    assert len({s.run_id for s in specs}) == 30
    expected = {
        (0.0, False, 0.0),
        (WEIGHT_DECAY, False, 0.0),
        (0.0, True, 0.0),
        (0.0, False, regularizers.DROPOUT),
        (WEIGHT_DECAY, True, regularizers.DROPOUT),
    }
    for model in ("inception", "alexnet", "mlp-1x512"):
        for labels in ("true", "random"):
            got = [_setting(s) for s in specs if (s.model, s.labels) == (model, labels)]
            assert sorted(got) == sorted(expected)
    for s in specs:
        # The core suites' stopping rule (to the cap) and protocol: only the regularizers differ.
        assert (s.target_train_acc, s.epochs, s.momentum, s.lr_decay, s.pixels) == (
            None,
            100,
            0.9,
            0.95,
            "none",
        )
        assert regularizers.setting_of(s) in regularizers.SETTINGS
        assert s.tags == ("regularizers",)
    assert len(expand("regularizers", Options(seeds=2))) == 60


def test_runs_shared_with_table1_are_the_same_runs():
    reg = {s.run_id: s for s in components("regularizers", Options())["regularizers"]}
    table1 = components("table1", Options())["table1"]
    shared = [s for s in table1 if s.run_id in reg]
    # Table 1 rows of the three models without dropout: each one is a regularizers configuration.
    wanted = [r for r in TABLE1_ROWS if r[0] in regularizers.MODELS and not (r[1] and r[2])]
    assert len(shared) == len(wanted) == 11
    for s in shared:
        assert reg[s.run_id].canonical_json() == s.canonical_json()
    # Deduplicated in `full`, with both tags.
    full = {s.run_id: s for s in expand("full", Options())}
    assert set(reg) <= set(full)
    assert all({"regularizers", *s.tags} <= set(full[s.run_id].tags) for s in shared)


def test_full_includes_regularizers_but_not_periodic_and_smoke_is_unchanged():
    assert "regularizers" in SUITES["full"].components
    assert not {"periodic", "periodic-smoke"} & set(SUITES["full"].components)
    assert "regularizers" not in SUITES["smoke"].components


def test_smoke_option_sizes_any_suite():
    plain = expand("regularizers", Options())
    smoke = expand("regularizers", Options(smoke=True))
    assert [(s.train_subset, s.test_subset, s.epochs) for s in smoke] == [(256, 256, 2)] * 30
    assert [s.replace(train_subset=None, test_subset=None, epochs=100).run_id for s in smoke] == [
        s.run_id for s in plain
    ]
    assert {s.epochs for s in expand("regularizers", Options(smoke=True, epochs=3))} == {3}


def test_suites_command_lists_regularizers_and_periodic(capsys):
    assert main(["suites"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["regularizers"].split()[1] == "30"
    assert "[not in full]" in lines["periodic"] and "cost" in lines["periodic"]
    assert "[not in full]" in lines["periodic-smoke"]


# ---------------------------------------------------------------------------------------------- the report


def _fabricate(store, specs, accs):
    """Finished runs with result records made by train.summarize from fabricated metrics (schema-true)."""
    for s in specs:
        train_acc, test_acc = accs(s)
        epochs = 3
        metrics = [
            {"epoch": e, "step": 10 * e, "lr": s.lr, "train_loss": 2.0 / e, "train_acc": train_acc * e / epochs,
             "train_eval_loss": 2.0 / e, "test_loss": 2.0, "test_acc": test_acc, "epoch_seconds": 1.0,
             "train_seconds": 0.8, "eval_seconds": 0.2, "images_per_second": 100.0}
            for e in range(1, epochs + 1)
        ]  # fmt: skip
        stopped = "target" if train_acc >= 1.0 else "cap"
        result = summarize(s, metrics, stopped, {"device": "cpu"}, "fabricated")
        store.write_text(run_key(s.run_id, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))
        store.write_text(run_key(s.run_id, "result.json"), json.dumps(result))


def _paper_like(s):
    """Numbers shaped like the paper's: everything fits except AlexNet with weight decay on random labels."""
    if s.labels == "random":
        fits = not (s.model == "alexnet" and s.weight_decay > 0)
        return (1.0 if fits else 0.35), 0.1
    base = {"inception": 0.86, "alexnet": 0.76, "mlp-1x512": 0.5}[s.model]
    return 1.0, base + (0.03 if regularizers.setting_of(s) != "none" else 0.0)


def _render(tmp_path, accs, epochs=None):
    store = LocalStore(tmp_path / "store")
    o = Options(dataset="synthetic-n100-m20-s0", epochs=epochs)
    _fabricate(store, expand("regularizers", o), accs)
    aggregate(store, "regularizers", o, log=lambda m: None)
    return tmp_path / "store" / "reports" / "synthetic" / "regularizers"


def test_report_section_judges_the_claims_from_the_numbers(tmp_path):
    out = _render(tmp_path, _paper_like)
    for name in ("regularizers.png", "regularizers.svg", "regularizers.csv", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader(io.StringIO((out / "regularizers.csv").read_text())))
    assert len(rows) == 30
    row = next(
        r for r in rows if (r["model"], r["labels"], r["setting"]) == ("alexnet", "random", "weight decay")
    )
    assert float(row["train_acc"]) == pytest.approx(0.35)
    md = (out / "report.md").read_text()
    assert md.count("- **holds**") == 3
    assert "largest gain +3.00 points" in md
    assert "train acc 35.00% after 3 of 100 epochs" in md


def test_verdicts_follow_the_data(tmp_path):
    def big_gain_and_alexnet_fits(s):
        train, test = _paper_like(s)
        if s.labels == "true" and s.random_crop:
            test += 0.1  # a 13-point gain: no longer "only a little"
        if s.model == "alexnet":
            train = 1.0
        return train, test

    md = (_render(tmp_path, big_gain_and_alexnet_fits) / "report.md").read_text()
    assert "- **does not hold**: explicit regularizers improve test accuracy only a little" in md
    assert "- **holds**: Inception and MLP 1x512 still fit random labels" in md
    assert "- **does not hold**: Small AlexNet with weight decay fails" in md


def test_verdicts_undecided_when_nothing_fits(tmp_path):
    md = (_render(tmp_path / "x", lambda s: (0.2, 0.1), epochs=2) / "report.md").read_text()
    assert "- **undecided**: explicit regularizers" in md
    assert "- **does not hold**: Inception and MLP 1x512" in md
    assert "- **undecided**: Small AlexNet with weight decay fails to fit random labels within 2 epochs" in md


def test_no_verdict_on_regularizers_when_nothing_generalizes(tmp_path):
    md = (_render(tmp_path, lambda s: (1.0, 0.11)) / "report.md").read_text()  # memorized, test at chance
    assert "- **undecided**: explicit regularizers" in md and "does not generalize (test acc 11.00%)" in md
    assert "- **holds**: Inception and MLP 1x512" in md
    assert "- **does not hold**: Small AlexNet" in md


def test_verdicts_without_runs_are_undecided():
    rows = regularizers.table(expand("regularizers", Options()), {})
    assert [v["holds"] for v in regularizers.verdicts(rows)] == [None, None, None]
