"""The committed results/ are what their run records render to: each `rethink aggregate` line of
results/render.sh, run on a copy of results/runs, reproduces the committed report's text and data files
byte for byte (the figures' pixels depend on the matplotlib build, so PNG/SVG/HTML are not compared)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from rethink.cli import main

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"


def render_lines() -> list[list[str]]:
    """The arguments of each `agg ...` line of results/render.sh."""
    lines = (RESULTS / "render.sh").read_text().splitlines()
    return [shlex.split(line)[1:] for line in lines if re.match(r"agg --suite ", line)]


def test_render_sh_renders_every_committed_report():
    suites = {args[args.index("--suite") + 1] for args in render_lines()}
    assert suites == {p.name for p in (RESULTS / "reports").iterdir() if p.is_dir()}


@pytest.mark.parametrize("args", render_lines(), ids=lambda a: " ".join(a))
def test_committed_report_is_what_the_records_render(args, tmp_path, capsys):
    shutil.copytree(RESULTS / "runs", tmp_path / "runs")
    assert main(["aggregate", "--store", str(tmp_path), *args]) == 0
    capsys.readouterr()
    suite = args[args.index("--suite") + 1]
    committed = RESULTS / "reports" / suite
    names = sorted(p.name for p in committed.iterdir() if p.suffix in (".md", ".csv"))
    assert names, f"nothing to compare in {committed}"
    for name in names:
        ours = (tmp_path / "reports" / suite / name).read_text().replace(str(tmp_path), "results")
        assert ours == (committed / name).read_text(), f"results/reports/{suite}/{name} differs from its records"


def test_the_precision_comparison_pairs_a_bf16_run_with_its_float32_twin(tmp_path, synth_dir):
    """results/precision.py finds each finished bf16 run whose float32 twin is there, and writes both rows and
    the difference of their final test accuracies; a float32 run alone is not compared."""
    import sys

    from rethink.data.cifar import load_cifar10
    from rethink.spec import RunSpec
    from rethink.store import LocalStore
    from rethink.training.options import ExecOptions
    from rethink.training.trainer import train_run

    sys.path.insert(0, str(RESULTS))
    import precision

    data = load_cifar10(synth_dir, verify=False)
    store = LocalStore(tmp_path)
    base = RunSpec(model="mlp-1x512", dataset=data.identity, epochs=2, batch_size=50)
    quiet = ExecOptions(device="cpu", log=lambda m: None)
    alone = train_run(base.replace(seed=1), store, data, quiet)
    assert precision.section(tmp_path / "runs", tmp_path / "figs") == ["No bf16 run with its float32 twin in results/ yet."]
    fp32 = train_run(base, store, data, quiet)
    bf16 = train_run(base.replace(precision="bf16"), store, data, quiet)
    lines = precision.section(tmp_path / "runs", tmp_path / "figs")
    text = "\n".join(lines)
    assert f"`{fp32['run_id']}`" in text and f"`{bf16['run_id']}`" in text and alone["run_id"] not in text
    assert f"{100 * (bf16['final_test_acc'] - fp32['final_test_acc']):+.2f} points" in text
    assert sorted(p.suffix for p in (tmp_path / "figs").iterdir()) == [".png", ".svg"]
