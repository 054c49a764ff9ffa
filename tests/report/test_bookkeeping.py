"""The report's bookkeeping: Figure 1b's baseline is the true-label run (p = 0) and nothing else, and a Table 1
row is "ok" only when every seed it asks for has finished."""

from __future__ import annotations

import json

import pytest

from rethink import suites
from rethink.store import LocalStore
from rethink.store.runs import run_key
from tests.report.test_aggregate import SYNTH, csv_rows, fabricate, read, record, table1_rows

FIG = suites.Options(dataset=SYNTH, epochs=10)


def _fig1bc(store, p0: str):
    """MLP 1x512's Figure 1b/c runs at p = 0.2 and 1 finished, and its p = 0 run `p0`: finished, unfinished
    (spec and metrics, no result) or missing. Returns fig1b.csv's rows of MLP 1x512 by p, and the section."""
    specs = {s.label_noise: s for s in suites.expand("fig1bc", FIG) if s.model == "mlp-1x512"}
    # 391 steps per epoch: 99% at epoch 4 (p = 0), 5 (p = 0.2), 8 (p = 1)
    curves = {0.0: [0.5, 0.8, 0.9, 0.995] + [1] * 6, 0.2: [0.3] * 4 + [0.99] + [1] * 5, 1.0: [0.1] * 7 + [0.99] * 3}
    for p in (0.2, 1.0):
        record(store, specs[p], curves[p], [0.3] * 10, 391)
    if p0 == "finished":
        record(store, specs[0.0], curves[0.0], [0.5] * 10, 391)
    elif p0 == "unfinished":
        record(store, specs[0.0], curves[0.0], [0.5] * 10, 391)
        store.delete(run_key(specs[0.0].run_id, "result.json"))
    from rethink.report import aggregate as report

    report.aggregate(store, "fig1bc", FIG, log=lambda m: None)
    rows = {float(r["p"]): r for r in csv_rows(store, "fig1bc", "fig1b.csv") if r["model"] == "mlp-1x512"}
    section = read(store, "fig1bc", "report.md").split("## Figure 1b/c")[1].split("\n## ")[0]
    return rows, section


def test_figure_1b_is_relative_to_the_true_label_run(tmp_path):
    rows, section = _fig1bc(LocalStore(tmp_path), "finished")
    assert float(rows[0.2]["relative"]) == pytest.approx(5 / 4)
    assert float(rows[1.0]["relative"]) == pytest.approx(8 / 4)
    assert float(rows[1.0]["true_label_steps"]) == 4 * 391
    assert "MLP 1x512: no finished true-label run" not in section


@pytest.mark.parametrize("p0", ["missing", "unfinished"])
def test_without_a_finished_true_label_run_figure_1b_has_no_relative_time(tmp_path, p0):
    """Not the lowest p that finished as a stand-in baseline: no relative time at all, and a note says why."""
    rows, section = _fig1bc(LocalStore(tmp_path), p0)
    assert rows == {}  # fig1b.csv draws nothing for the model
    assert "MLP 1x512: no finished true-label run, so no relative time" in section
    # Figure 1c (test error) does not need the baseline: its points are there.
    errors = {float(r["p"]) for r in csv_rows(LocalStore(tmp_path), "fig1bc", "fig1c.csv") if r["model"] == "mlp-1x512"}
    assert errors == {0.2, 1.0}
    table = [line for line in section.splitlines() if line.startswith("| MLP 1x512 |")]
    assert len(table) == 2 and all(line.split("|")[5].strip() == "" for line in table)  # the relative column


ROW = 11  # Table 1: Small AlexNet, no crop, no weight decay, true labels


def _table1(store, finished: int, failed: int = 0) -> dict:
    o = suites.Options(dataset=SYNTH, seeds=3, epochs=2)
    specs = sorted((s for s in suites.expand("table1", o) if f"table1:{ROW}" in s.tags), key=lambda s: s.seed)
    assert len(specs) == 3
    for s in specs[:finished]:
        fabricate(store, s)
    for s in specs[finished : finished + failed]:
        store.write_text(run_key(s.run_id, "error.json"), json.dumps({"run_id": s.run_id, "error": "boom"}))
    from rethink.report import aggregate as report

    report.aggregate(store, "table1", o, log=lambda m: None)
    return table1_rows(store, "table1")[ROW]


@pytest.mark.parametrize("finished, failed, status", [
    (0, 0, "missing"), (1, 0, "incomplete (1 of 3 seeds)"), (2, 0, "incomplete (2 of 3 seeds)"), (3, 0, "ok"),
    (2, 1, "incomplete (2 of 3 seeds)"), (0, 1, "failed"),
])  # fmt: skip
def test_a_table1_row_is_ok_only_with_every_seed_finished(tmp_path, finished, failed, status):
    row = _table1(LocalStore(tmp_path), finished, failed)
    assert row["status"].startswith(status)
    assert row["n_seeds"] == str(finished) and row["n_expected"] == "3"
    if finished:
        # fabricated test accuracy 40% + 2 points per seed: the mean over the finished seeds only
        assert float(row["test_acc"]) == pytest.approx(40 + 2 * (finished - 1) / 2)
    else:
        assert row["test_acc"] == ""
