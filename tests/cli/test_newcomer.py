"""A newcomer's first hour without dead ends: status and aggregate name the flag that finds runs of the other data
source, reports of the two sources land apart, unverified data is said at the top of a report, submit.py without
its extra says what to install, plan shows whole tags, required options say so, and `rethink run` reports the
suite's progress."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rethink import suites
from rethink.cli import build_parser, main
from rethink.data.synthetic import default_identity
from rethink.store import LocalStore
from rethink.store.runs import run_key
from tests.report.test_aggregate import fabricate

ROOT = Path(__file__).resolve().parents[2]


def _run(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def synthetic_quickstart(tmp_path):
    """A store holding the quickstart's runs on the default synthetic set, as README command 1 leaves it."""
    store = LocalStore(tmp_path / "runs")
    for spec in suites.expand("quickstart", suites.Options(dataset=default_identity())):
        fabricate(store, spec)
    return tmp_path / "runs"


@pytest.mark.parametrize("command", ["status", "aggregate"])
def test_the_other_data_sources_runs_are_pointed_at(synthetic_quickstart, tmp_path, command):
    code, out, _ = _run([command, "--suite", "quickstart", "--store", str(synthetic_quickstart),
                         "--data-dir", str(tmp_path / "data")])  # fmt: skip
    assert code == 0
    assert "note: no run of suite quickstart on CIFAR-10" in out and "5 of its 5 runs on the synthetic set" in out
    assert "add --synthetic" in out
    code, out, _ = _run([command, "--suite", "quickstart", "--synthetic", "--store", str(synthetic_quickstart),
                         "--data-dir", str(tmp_path / "data")])  # fmt: skip
    assert code == 0 and "note:" not in out  # found where asked: nothing to point at
    if command == "status":
        assert "5 finished" in out


def test_reports_of_the_two_sources_land_in_different_folders(synthetic_quickstart, tmp_path):
    store = LocalStore(synthetic_quickstart)
    for spec in suites.expand("quickstart", suites.Options(dataset="cifar10")):
        fabricate(store, spec)
    for extra in ([], ["--synthetic"]):
        code, out, _ = _run(["aggregate", "--suite", "quickstart", "--store", str(synthetic_quickstart),
                             "--data-dir", str(tmp_path / "data"), *extra])  # fmt: skip
        assert code == 0
    synthetic = store.read_text("reports/synthetic/quickstart/report.md")
    real = store.read_text("reports/quickstart/report.md")
    assert "SYNTHETIC DATA" in synthetic and "SYNTHETIC DATA" not in real


def test_unverified_data_is_said_at_the_top_of_the_report(tmp_path):
    from rethink.report.aggregate import UNOFFICIAL_BANNER, aggregate

    store = LocalStore(tmp_path)
    o = suites.Options(dataset="cifar10")
    specs = suites.expand("quickstart", o)
    for i, spec in enumerate(specs):
        fabricate(store, spec)
        key = run_key(spec.run_id, "result.json")
        result = json.loads(store.read_text(key))
        result["data"] = {"identity": "cifar10", "official_md5": i != 0, "description": "CIFAR-10", "file_md5": {}}
        store.write_text(key, json.dumps(result))
    aggregate(store, "quickstart", o, log=lambda m: None)
    md = store.read_text("reports/quickstart/report.md")
    top = md.split("## ")[0]
    assert UNOFFICIAL_BANNER in top and "1 of the runs" in top
    for spec in specs[:1]:  # all official: no banner
        key = run_key(spec.run_id, "result.json")
        result = json.loads(store.read_text(key))
        result["data"]["official_md5"] = True
        store.write_text(key, json.dumps(result))
    aggregate(store, "quickstart", o, log=lambda m: None)
    assert UNOFFICIAL_BANNER not in store.read_text("reports/quickstart/report.md")


_WITHOUT = """
import importlib.abc, runpy, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
sys.argv = ["workflows/submit.py", *{argv!r}]
runpy.run_path("workflows/submit.py", run_name="__main__")
"""


@pytest.mark.parametrize("module, argv", [
    ("hera", ["--help"]),  # the workflow is built with Hera: nothing works without it
    ("kubernetes", ["--suite", "smoke", "--synthetic", "--profile", "local", "--kubeconfig", "/nonexistent"]),
])  # fmt: skip
def test_submit_without_the_workflow_extra_is_one_line_and_exit_2(module, argv):
    proc = subprocess.run([sys.executable, "-c", _WITHOUT.format(module=module, argv=argv)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and "pip install -e '.[workflows]'" in lines[-1] and module in lines[-1]
    assert len(lines) == 1 or module == "kubernetes"  # the submission's summary may come first
    assert "Traceback" not in proc.stderr


def test_submit_help_with_the_extra():
    pytest.importorskip("hera")
    proc = subprocess.run([sys.executable, "workflows/submit.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0 and "--suite" in proc.stdout and "(default: None)" not in proc.stdout


def test_plan_shows_whole_tags(capsys):
    code, out, _ = _run(["plan", "--suite", "full"])
    assert code == 0
    longest = max((",".join(s.tags) for s in suites.expand("full", suites.Options())), key=len)
    assert len(longest) > 26 and longest in out


def _every_parser(parser):
    yield parser
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "add_parser") else ():
            yield from _every_parser(sub)


def test_no_option_says_default_none_and_required_ones_say_required():
    sys.path.insert(0, str(ROOT))
    from workflows.submit import build_parser as submit_parser

    for parser in (*_every_parser(build_parser()), submit_parser()):
        text = parser.format_help()
        assert "(default: None)" not in " ".join(text.split()), parser.prog
        for action in parser._actions:
            if action.required and action.option_strings:
                assert "(required)" in parser._get_formatter()._get_help_string(action), (parser.prog, action.dest)


def test_run_reports_the_suites_progress(tmp_path, one_thread):
    """Runs done of the total, elapsed time, an ETA from the runs finished so far and the store, after each run;
    the expected total at the start."""
    from rethink.data.synthetic import write_synthetic
    from rethink.runner import DataSource, run_specs
    from rethink.spec import RunSpec
    from rethink.training.options import ExecOptions

    write_synthetic(tmp_path / "data", 100, 20, seed=0)
    from rethink.data.cifar import load_cifar10

    ident = load_cifar10(tmp_path / "data", download=False).identity
    specs = [RunSpec(model="mlp-1x512", dataset=ident, epochs=1, batch_size=50, seed=s) for s in range(3)]
    lines: list[str] = []
    store = tmp_path / "store"
    run_specs(specs[:1], str(store), DataSource(str(tmp_path / "data")), ExecOptions(device="cpu", log=lambda m: None))
    run_specs(specs, str(store), DataSource(str(tmp_path / "data")),
              ExecOptions(device="cpu", progress=False, log=lines.append), progress=False)  # fmt: skip
    expected = [line for line in lines if line.startswith("expected: about ")]
    assert len(expected) == 1 and "for 2 runs" in expected[0] and "measured on a 2-core AVX-512 CPU" in expected[0]
    suite = [line for line in lines if line.startswith("suite: ")]
    assert len(suite) == 2
    assert suite[0].startswith("suite: 2 of 3 runs done, ") and "elapsed, about " in suite[0]
    assert "to go (from the 1 runs of this call)" in suite[0]
    assert suite[1].startswith("suite: 3 of 3 runs done, ") and "to go" not in suite[1]
    assert all(line.endswith(f"results in {LocalStore(store).where('runs')}") for line in suite)


def test_the_quickstart_figure_tells_each_curve_apart(synthetic_quickstart):
    """Each mode has its own colour and line style, the same in both panels and in the one shared legend; the
    title names what the suite trains (no random pixels); the protocol lists no CNN settings for MLP runs."""
    import csv
    import re

    from rethink.report.aggregate import aggregate

    store = LocalStore(synthetic_quickstart)
    aggregate(store, "quickstart", suites.Options(dataset=default_identity()), log=lambda m: None)
    out = "reports/synthetic/quickstart/"
    rows = list(csv.DictReader(io.StringIO(store.read_text(out + "quickstart.csv"))))
    modes = sorted({r["mode"] for r in rows})
    assert len(modes) == 5
    svg = store.read_text(out + "quickstart.svg")
    for mode in modes:  # one legend entry per mode, for both panels
        assert svg.count(f"<!-- {mode} -->") == 1, mode
    title = re.search(r"<!-- (MLP 1x512 on .*?) -->", svg).group(1)
    assert "random pixels" not in title and all(m in title for m in modes)
    # a line's look: its colour and dash pattern; each mode's look is drawn three times (two panels, the legend)
    looks = re.findall(r'style="fill: none; (?:stroke-dasharray: ([^;]*); )?(?:stroke-dashoffset: [^;]*; )?'
                       r'stroke: (#[0-9a-f]{6}); stroke-width: 1\.8', svg)  # fmt: skip
    counts = {look: looks.count(look) for look in set(looks)}
    assert len(counts) == 5 and set(counts.values()) == {3}, counts
    assert len({color for _, color in counts}) == 5 and len({dash for dash, _ in counts}) == 5
    md = store.read_text(out + "report.md").split("## Protocol choices")[1].split("\n## ")[0]
    assert "LRN" not in md and "BatchNorm" not in md and "random crop" not in md


def test_a_failed_pod_style_train_shows_as_failed_with_its_message(synth_dir, tmp_path):
    """`rethink train --suite S --index I` (what a pod runs) on a damaged data volume: error.json is written, and
    `status` and the report say failed with the message; a later successful train removes it."""

    store = tmp_path / "store"
    common = ["--suite", "smoke", "--data-dir", str(synth_dir), "--store", str(store)]
    good = (synth_dir / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    (synth_dir / "cifar-10-batches-py" / "data_batch_1").write_bytes(good[:100])  # truncated on the volume
    code, _, err = _run(["train", *common, "--index", "30", "--device", "cpu"])
    assert code != 0 and "data_batch_1" in err
    errors = list(store.glob("runs/*/error.json"))
    assert len(errors) == 1
    message = json.loads(errors[0].read_text())["error"]
    assert "data_batch_1" in message
    rid = errors[0].parent.name
    code, out, _ = _run(["status", *common])
    line = next(x for x in out.splitlines() if x.startswith(rid))
    assert "failed" in line and "data_batch_1" in line
    _run(["aggregate", *common])
    md = next(store.glob("reports/**/smoke/report.md")).read_text()
    assert f"`{rid}` **failed**" in md and "data_batch_1" in md
    (synth_dir / "cifar-10-batches-py" / "data_batch_1").write_bytes(good)  # repaired: the retry trains it
    code, _, _ = _run(["train", *common, "--index", "30", "--device", "cpu"])
    assert code == 0 and not errors[0].exists()
