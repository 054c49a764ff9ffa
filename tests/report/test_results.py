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
