"""The foundation's command line: `rethink models`, `rethink data synth`, data errors as one line, --help defaults."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rethink.cli import build_parser, main
from rethink.data.cifar import DIRNAME, load_cifar10
from rethink.experiments.kit import OVERFIT_THRESHOLD
from rethink.spec import EPOCH_CAP, RunSpec
from tests.test_paper import INITIAL_LR
from tests.test_paper import PARAMS as TABLE_1  # typed in once, from the paper

FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]


# `synth_dir` (a fresh 100/20 synthetic set, free to damage) and `unmarked_dir` come from conftest.py.


def _check_models_json(text: str) -> None:
    rows = json.loads(text)
    assert [r["name"] for r in rows] == list(TABLE_1)
    for r in rows:
        assert r["params"] == TABLE_1[r["name"]] == r["paper_params"], r
        assert r["input_shape"] == [3, 28, 28]
    lrs = {r["name"]: r["default_lr"] for r in rows}
    assert lrs == {
        "inception": 0.1,
        "inception-nobn": 0.1,
        "alexnet": 0.01,
        "mlp-3x512": 0.01,
        "mlp-1x512": 0.01,
    }


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rethink: error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------- models


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    _check_models_json(capsys.readouterr().out)


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for display, count in [
        ("Small Inception", "1,649,402"),
        ("Small Inception w/o BatchNorm", "1,649,402"),
        ("Small AlexNet", "1,387,786"),
        ("MLP 3x512", "1,735,178"),
        ("MLP 1x512", "1,209,866"),
    ]:
        assert any(display in line and line.count(count) == 2 for line in out.splitlines()), (display, out)
    assert "MISMATCH" not in out and "3x28x28" in out


def test_entry_point_runs_as_a_module(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETHINK_")}
    proc = subprocess.run(
        [sys.executable, "-m", "rethink", "models", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _check_models_json(proc.stdout)


# ---------------------------------------------------------------------------------------------- data synth


def test_data_synth_writes_a_loadable_set(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "synth", "--out", str(out), "--train", "1000", "--test", "200", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and str(out / DIRNAME) in printed
    assert sorted(p.name for p in (out / DIRNAME).iterdir()) == sorted(FILES)
    data = load_cifar10(out, download=False)
    assert data.train_x.shape == (1000, 3, 32, 32) and data.test_x.shape == (200, 3, 32, 32)
    assert data.train_x.dtype == np.uint8 and set(np.unique(data.train_y)) == set(range(10))
    assert data.synthetic and data.identity == "synthetic-n1000-m200-s4"


@pytest.mark.parametrize(
    "sizes, words",
    [(["--train", "3", "--test", "10"], "--train must be at least 5"),
     (["--train", "100", "--test", "0"], "--test at least 1"),
     (["--train", "-5", "--test", "10"], "got -5, 10")],
)  # fmt: skip
def test_data_synth_bad_sizes(tmp_path, capsys, sizes, words):
    out = tmp_path / "d"
    assert main(["data", "synth", "--out", str(out), *sizes]) == 2
    captured = capsys.readouterr()
    assert words in _one_error_line(captured.err)
    assert captured.out == "" and not out.exists()


def test_data_synth_non_integer_size(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--out", str(tmp_path / "d"), "--train", "many"])
    assert e.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_data_without_action_prints_help(capsys):
    assert main(["data"]) == 2
    assert "synth" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- data errors through the CLI


def _train_args(data_dir, tmp_path, *extra):
    return ["train", "--model", "mlp-1x512", "--data-dir", str(data_dir), "--store", str(tmp_path / "runs"),
            "--device", "cpu", "--epochs", "1", *extra]  # fmt: skip


def test_md5_mismatch_is_one_line(unmarked_dir, tmp_path, capsys):
    code = main(_train_args(unmarked_dir, tmp_path))
    line = _one_error_line(capsys.readouterr().err)
    assert code != 0
    assert "md5 mismatch" in line and "data_batch_1" in line and "--no-verify-data" in line
    # Nothing half-written: the run's only record is its failure (status and the report say failed, why).
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert [p.name for p in written] == ["error.json"] and "md5 mismatch" in written[0].read_text()


def test_no_verify_data_trains_with_a_warning(unmarked_dir, tmp_path, capsys):
    assert main(_train_args(unmarked_dir, tmp_path, "--no-verify-data")) == 0
    err = capsys.readouterr().err
    assert "md5 checksums" in err and "not verified" in err and "--no-verify-data" in err
    assert "md5 mismatch" not in err


def test_failed_download_is_one_line(tmp_path, capsys, monkeypatch):
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"
    monkeypatch.setenv("RETHINK_CIFAR10_URL", url)
    code = main(_train_args(tmp_path / "empty", tmp_path))
    line = _one_error_line(capsys.readouterr().err)
    assert code != 0
    assert url in line and str(tmp_path / "empty" / DIRNAME) in line
    assert "RETHINK_CIFAR10_URL" in line and "--synthetic" in line


def test_truncated_file_is_one_line(synth_dir, tmp_path, capsys):
    path = synth_dir / DIRNAME / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    # the synthetic set's identity comes from batches.meta, which is intact; the broken batch fails the load
    code = main(_train_args(synth_dir, tmp_path))
    line = _one_error_line(capsys.readouterr().err)
    assert code != 0 and str(path) in line and "truncated or corrupt" in line


# ---------------------------------------------------------------------------------------------- --help


def _subparsers(parser: argparse.ArgumentParser, prefix=()):
    """(command words, parser) for every subcommand, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


def undocumented_defaults(parser: argparse.ArgumentParser) -> list[str]:
    """Options of `parser` whose --help does not state the default they actually have (or why there is none).

    - an option with a value (not None) must show that value: "default: 128" for a default of 128 (what the
      `(default: %(default)s)` that argparse appends says, or the help's own words naming the same value);
    - a flag (store_true, --x/--no-x) must say what happens without it ("default: float32", "default off");
    - an option without a default (None) must be required, or say what happens without it ("default: all
      models"): "(default: None)" tells a user nothing.
    """
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.default == argparse.SUPPRESS:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        option = action.option_strings[-1]
        text = " ".join(formatter._expand_help(action).split()) if action.help else ""
        said = [m.strip() for m in re.findall(r"default:? ([^;)]*)", text)]  # what each "default: ..." says
        flag = action.nargs == 0
        if action.required or (action.default is None and "required" in text):
            continue
        if flag and not any(said):
            missing.append(f"{option}: a flag whose help does not say what happens without it: {text!r}")
        elif not flag and action.default is None and not any(w and w != "None" for w in said):
            missing.append(f"{option}: no default, and the help does not say what happens without it: {text!r}")
        elif not flag and action.default is not None and f"default: {action.default}" not in text:
            missing.append(f"{option}: the help does not state its default {action.default!r}: {text!r}")
    return missing


# Options whose help still says "(default: None)"; the words the help should carry instead. An option fixed in
# rethink/cli/parser.py can leave this list; a new option must not join it.
PENDING_HELP: dict = {}  # options whose help does not yet say what happens without them


def _every_parser():
    yield (), build_parser()
    yield from _subparsers(build_parser())


def test_every_option_states_its_actual_default():
    commands = dict(_every_parser())
    assert set(commands) >= {("models",), ("data",), ("data", "synth"), ("train",), ("run",), ("bench",)}
    missing = {}
    for words, parser in commands.items():
        for problem in undocumented_defaults(parser):
            missing[(*words, problem.split(":", 1)[0])] = problem
    new = {k: v for k, v in missing.items() if k not in PENDING_HELP}
    assert not new, "\n".join(f"rethink {' '.join(k[:-1])} {v}" for k, v in new.items())


class _OwnWords(argparse.ArgumentDefaultsHelpFormatter):
    """As rethink's formatter: a help that mentions its default keeps its own words."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def test_the_default_check_catches_a_wrong_or_missing_default():
    p = argparse.ArgumentParser(formatter_class=_OwnWords)
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate (default: 0.01)")  # another value
    p.add_argument("--subset", type=int, help="use only the first N images")  # "(default: None)"
    p.add_argument("--models", help="these models only; default: all models")
    p.add_argument("--amp", action="store_true", help="bf16")  # "(default: False)": off
    p.add_argument("--onednn", action="store_true", help="oneDNN (default on)")  # no "default: ..." words
    p.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="output directory")
    assert [m.split(":", 1)[0] for m in undocumented_defaults(p)] == ["--lr", "--subset"]


def test_help_names_the_defaults_the_code_resolves_later():
    """Options whose default is decided after parsing (None to argparse) name the value the code then uses."""
    commands = dict(_every_parser())

    def help_of(words, option):
        parser = commands[words]
        action = next(a for a in parser._actions if option in a.option_strings)
        return " ".join(parser._get_formatter()._expand_help(action).split())

    assert f"(default: {INITIAL_LR['inception']:g} Inception, {INITIAL_LR['alexnet']:g} others)" in help_of(
        ("train",), "--lr")  # fmt: skip
    assert {RunSpec(model=m).lr for m in ("inception", "inception-nobn")} == {INITIAL_LR["inception"]}
    assert {RunSpec(model=m).lr for m in ("alexnet", "mlp-3x512", "mlp-1x512")} == {INITIAL_LR["alexnet"]}
    assert f"(default: {RunSpec(model='mlp-1x512').epochs};" in help_of(("train",), "--epochs")
    cap = EPOCH_CAP
    for words in (("plan",), ("run",), ("status",), ("aggregate",)):  # one definition (cli.options): one text
        assert f"(default: {cap};" in help_of(words, "--epochs"), words
    for words in (("run",), ("aggregate",)):
        assert f"(default: {OVERFIT_THRESHOLD}," in help_of(words, "--overfit-threshold"), words
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as out:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(out.getvalue().split())
    for fragment in ("--batch-size BATCH_SIZE minibatch size (default: 128)", "(default: ./data)"):
        assert fragment in text, fragment


def test_synth_into_an_unwritable_place_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "synth", "--out", str(blocker / "d"), "--train", "10", "--test", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rethink: error: cannot write a synthetic data set") and "Traceback" not in err


def test_zero_epochs_is_refused_not_replaced_by_the_default(synth_dir, tmp_path, capsys):
    argv = ["train", "--model", "mlp-1x512", "--epochs", "0", "--data-dir", str(synth_dir), "--store", str(tmp_path / "s")]
    assert main(argv) == 2
    assert "epochs must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--model", "resnet9000"], ["invalid choice: 'resnet9000'", "rethink train --help"]),
        (["train", "--model", "mlp-1x512", "--pixels", "blurry"], ["invalid choice: 'blurry'", "rethink train --help"]),
        (["run", "--suite", "table1", "--stop-at-acc", "1.5"], ["(0, 1]", "rethink run --help"]),
        (["aggregate", "--suite", "fig1bc", "--overfit-threshold", "x"], ["'x'", "rethink aggregate --help"]),
    ],
)
def test_a_bad_choice_is_the_error_and_where_to_look(argv, words, capsys):
    """No usage block: the error, then one line saying which --help to read; exit code 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "usage:" not in err, err
    assert all(w in err for w in words), err


def test_train_without_options_is_the_specs_defaults():
    """`rethink train --model M` names the run RunSpec(model=M) names: the CLI takes its defaults from the spec."""
    from rethink.cli.options import data_of, spec_of

    for model in ("mlp-1x512", "inception"):
        args = build_parser().parse_args(["train", "--model", model])
        assert spec_of(args, data_of(args)) == RunSpec(model=model, dataset="cifar10")


def test_amp_trains_the_bf16_twin_as_a_run_of_its_own(synth_dir, tmp_path, capsys):
    """`rethink train --amp` is another run than the float32 one: its own id and folder, its precision in its spec
    and its result; the float32 run beside it is not touched (nor taken for finished)."""
    store = tmp_path / "runs"
    args = _train_args(synth_dir, tmp_path, "--no-verify-data", "--train-subset", "100", "--batch-size", "50")
    assert main(args) == 0
    assert main([*args, "--amp"]) == 0
    results = {json.loads(p.read_text())["spec"]["precision"]: (p.parent.name, json.loads(p.read_text()))
               for p in store.rglob("result.json")}  # fmt: skip
    assert set(results) == {"float32", "bf16"}
    (fp32_id, fp32), (bf16_id, bf16) = results["float32"], results["bf16"]
    assert fp32_id != bf16_id
    assert fp32["environment"]["amp"] is False and "bf16" not in fp32["environment"]["precision"]
    assert bf16["environment"]["amp"] is True and "bf16" in bf16["environment"]["precision"]
    out = capsys.readouterr().out
    assert f"run {bf16_id}: mlp-1x512" in out and "bf16" in out


def test_a_suite_with_amp_is_the_bf16_twin_of_each_run(capsys):
    """plan/status/aggregate/run with --amp name the bf16 twins: other ids, the same runs otherwise."""

    def plan(*extra):
        assert main(["plan", "--suite", "quickstart", "--synthetic", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    fp32, bf16 = plan(), plan("--amp")
    assert len(fp32) == len(bf16) > 1
    assert not {r["run_id"] for r in fp32} & {r["run_id"] for r in bf16}
    for a, b in zip(fp32, bf16):
        assert RunSpec.from_dict(b["spec"]) == RunSpec.from_dict(a["spec"]).replace(precision="bf16")


def test_only_flags_select_part_of_a_suite_and_labels_keeps_one_meaning(capsys):
    """--only-models/--only-labels/--only-pixels select runs of the whole suite (same ids); --labels is a run's
    own label mode (rethink train), not a filter."""

    def plan(*extra):
        code = main(["plan", "--suite", "table1", "--synthetic", "--json", *extra])
        return code, capsys.readouterr()

    whole = {r["run_id"]: r for r in json.loads(plan()[1].out)}
    code, out = plan("--only-models", "mlp-1x512", "--only-labels", "random")
    part = json.loads(out.out)
    assert code == 0 and part and all(r["run_id"] in whole for r in part)
    assert {(r["model"], r["labels"]) for r in part} == {("mlp-1x512", "random")}
    code, out = plan("--only-labels", "noisy")
    assert code == 2 and "--only-labels" in _one_error_line(out.err)
    with pytest.raises(SystemExit) as e:  # not an option of plan: a run's labels are set on rethink train
        plan("--labels", "random")
    assert e.value.code == 2 and "unrecognized arguments: --labels" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the CPU's crops


def test_may_be_cpu_is_told_from_the_device_nodes(monkeypatch):
    from rethink.cli import commands

    assert commands.may_be_cpu("cpu") and not commands.may_be_cpu("cuda") and not commands.may_be_cpu("cuda:1")
    monkeypatch.setattr(commands.glob, "glob", lambda pattern: [])
    assert commands.may_be_cpu("auto")
    monkeypatch.setattr(commands.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    assert not commands.may_be_cpu("auto")


@pytest.mark.parametrize("pixels", ["none", "shuffled"])
def test_cpu_train_with_the_loaders_crops_learns_the_same_numbers(synth_dir, tmp_path, monkeypatch, pixels):
    """rethink train on the CPU has the loader make the float32 crops (pixels "none" only); the run's metrics
    are the same bit for bit as when it preprocesses for itself."""
    from rethink.cli import commands
    from rethink.data import cifar

    asked = []
    load = cifar.load_cifar10
    monkeypatch.setattr(cifar, "load_cifar10", lambda *a, **k: asked.append(k["central_crops"]) or load(*a, **k))
    args = ["--pixels", pixels, "--no-verify-data", "--epochs", "2"]
    assert main(_train_args(synth_dir, tmp_path / "crops", *args)) == 0
    monkeypatch.setattr(commands, "may_be_cpu", lambda device: False)
    assert main(_train_args(synth_dir, tmp_path / "plain", *args)) == 0
    assert asked == [pixels == "none", False]

    def metrics(store):
        rows = [json.loads(line) for line in next(store.rglob("metrics.jsonl")).read_text().splitlines()]
        return [{k: v for k, v in row.items() if "second" not in k} for row in rows]

    assert metrics(tmp_path / "crops") == metrics(tmp_path / "plain") and len(metrics(tmp_path / "crops")) == 2
