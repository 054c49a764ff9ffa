"""The catalogue: suite sizes, unique and stable run ids, `full` as the deduplicated union, the plan command."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from rethink.errors import UserError
from rethink.suites import SUITES, Options, components, expand
from tests.test_paper import TABLE1  # typed in once, from the paper

SYN = "synthetic-n10000-m2000-s0"


@pytest.mark.parametrize(("suite", "runs"), [("fig1a", 5), ("fig1bc", 18), ("table1", 19), ("fig2b", 2)])
def test_paper_suites_have_the_papers_runs(suite, runs):
    assert len(expand(suite)) == runs
    assert len(expand(suite, Options(seeds=3))) == 3 * runs


def test_every_suite_has_unique_run_ids():
    for name in SUITES:
        for seeds in (1, 2):
            ids = [s.run_id for s in expand(name, Options(seeds=seeds))]
            assert len(ids) == len(set(ids)), name


def test_full_is_the_deduplicated_union_of_its_components():
    o = Options(seeds=2)
    parts = components("full", o)
    union = {s.run_id for specs in parts.values() for s in specs}
    full = expand("full", o)
    assert {s.run_id for s in full} == union
    assert len(full) == len(union) < sum(len(v) for v in parts.values())  # shared runs are trained once
    by_id = {s.run_id: s for s in full}
    # Inception on true labels is one run in Figure 1a, Figure 1b/c, Table 1 and Figure 2b, tagged for each.
    (shared,) = [s for s in full if s.model == "inception" and s.labels == "true" and s.pixels == "none"
                 and not s.random_crop and not s.weight_decay and s.seed == 0 and not s.dropout]  # fmt: skip
    assert {"fig1a", "fig1bc", "table1:3", "fig2b"} <= set(by_id[shared.run_id].tags)


def test_table1_rows_match_the_paper():
    specs = expand("table1")
    assert len(specs) == len(TABLE1) == 19
    for spec, (model, crop, wd, labels, _, _) in zip(specs, TABLE1):
        assert (spec.model, spec.random_crop, spec.weight_decay > 0, spec.labels) == (model, crop, wd, labels)


def test_seeds_epochs_and_smoke_sizing():
    specs = expand("fig1bc", Options(seeds=2, epochs=7))
    assert {s.seed for s in specs} == {0, 1} and {s.epochs for s in specs} == {7}
    assert {s.data_seed for s in specs} == {0, 1}
    smoke = expand("smoke", Options(dataset=SYN))
    assert {(s.train_subset, s.test_subset, s.epochs, s.dataset) for s in smoke} == {(256, 256, 2, SYN)}
    # smoke exercises every paper figure and the table
    assert set(components("smoke", Options(dataset=SYN))) >= {"fig1a", "fig1bc", "table1", "fig2b"}


def test_unknown_suite_is_a_user_error():
    with pytest.raises(UserError, match="unknown suite 'nope'"):
        expand("nope")


def _plan_json(*argv: str) -> list[dict]:
    from rethink.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--json", *argv]) == 0
    return json.loads(out.getvalue())


def test_plan_json_lists_the_catalogue_with_stable_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty ./data: the data set identity is cifar10
    rows = _plan_json("--suite", "full")
    assert [r["run_id"] for r in rows] == [s.run_id for s in expand("full")]
    assert len({r["run_id"] for r in rows}) == len(rows)
    for r in rows:
        assert {"run_id", "model", "labels", "pixels", "spec"} <= set(r)
        assert r["spec"]["model"] == r["model"]
    # the same ids from a fresh interpreter (another hash seed)
    other = subprocess.run([sys.executable, "-m", "rethink", "plan", "--suite", "full", "--json"], cwd=tmp_path,
                           capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert [r["run_id"] for r in json.loads(other.stdout)] == [r["run_id"] for r in rows]


def test_suites_command_lists_every_suite_with_counts(capsys):
    from rethink.cli import main

    assert main(["suites"]) == 0
    out = capsys.readouterr().out
    for name in SUITES:
        assert name in out
    assert "not in full" in out and "expressivity" in out and "kernel" in out


def test_cost_estimates_say_which_gpu_figures_are_measured():
    """A GPU estimate names its basis: measured on the H200 for Small Inception and Small AlexNet, a target for
    the models no GPU has measured, both for a mix; CPU figures are measurements."""
    from rethink.experiments.estimates import EPOCH_SECONDS, estimate_seconds, source
    from rethink.experiments.kit import needs
    from rethink.spec import RunSpec

    assert source("gpu", {"inception", "alexnet"}) == "measured on one H200"
    assert source("gpu", {"inception-nobn"}) == source("gpu", {"mlp-1x512"}) == "a target for one GPU, not yet measured"
    assert source("gpu", {"alexnet", "mlp-3x512"}) == source("gpu") == "partly measured on one H200, partly targets not yet measured"
    mlp, alexnet = RunSpec(model="mlp-1x512", epochs=100), RunSpec(model="alexnet", epochs=100, train_subset=25_000)
    assert estimate_seconds([alexnet], "gpu") == pytest.approx(EPOCH_SECONDS["gpu"]["alexnet"] * 50)
    assert needs([mlp]).endswith("(a target for one GPU, not yet measured) or 2 CPU-minutes (measured on a 2-core AVX-512 CPU)")
    assert "(measured on one H200)" in needs([alexnet])
