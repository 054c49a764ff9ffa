"""The package's shape (docs/architecture.md): layers that import only downward, no cycle, no private name
reached across modules, no torch where no tensor is touched, and one reading of a run's state."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer's modules and any lower layer's, never a higher one's.
LAYERS = [
    ["rethink.errors", "rethink.paper", "rethink.revision"],
    ["rethink.spec"],
    ["rethink.data"],
    ["rethink.models", "rethink.store", "rethink.summary"],
    ["rethink.training"],
    ["rethink.experiments"],
    ["rethink.suites"],
    ["rethink.report"],
    ["rethink.runner", "rethink.perf"],
    ["rethink.cli"],
    ["workflows"],
]


def _layer(module: str) -> int:
    """The layer of a module: its longest matching prefix in LAYERS (the package root: its version only)."""
    if module == "rethink":
        return 0
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return level


def _modules() -> dict[str, Path]:
    out = {}
    for base in ("rethink", "workflows"):
        for path in (ROOT / base).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of the project's own code, wherever it is."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(block)}  # annotations only: not a dependency at run time  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            found.append((mod, [a.name for a in node.names]))
    return [(m, n) for m, n in found if m.split(".")[0] in ("rethink", "workflows")]


def _resolve(mod: str, names: list[str], modules: dict) -> list[str]:
    """The modules an import reaches: `from rethink.data import cifar` reaches rethink.data.cifar."""
    reached = [mod]
    reached += [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
    return reached


def test_layers_import_only_downward():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        if name.endswith("__main__"):
            continue
        for mod, names in _imports(name, path):
            for target in _resolve(mod, names, modules):
                if target in modules and _layer(target) > _layer(name):
                    upward.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not upward, "\n".join(upward)


def _assert_acyclic(graph: dict[str, set[str]], what: str) -> None:
    """Fail with the first cycle found in `graph` (depth first, in name order), as `what: a -> b -> a`."""
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        if state.get(n) == 2:
            return
        assert state.get(n) != 1, f"{what}: " + " -> ".join(trail + [n])
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            visit(m, trail + [n])
        state[n] = 2

    for n in sorted(graph):
        visit(n, [])


def test_no_import_cycle():
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for mod, names in _imports(name, path):
            for target in _resolve(mod, names, modules):
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    _assert_acyclic(graph, "import cycle")


def test_folders_import_downward_too():
    """No cycle between the package's folders and top-level modules (rethink.experiments, rethink.report, ...):
    what serves the experiments (their kit, their costs) lives in experiments/, not in report/ or perf/."""
    modules = _modules()

    def unit(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        for mod, names in _imports(name, path):
            for target in _resolve(mod, names, modules):
                if target in modules and unit(target) != unit(name) and target != "rethink":
                    graph.setdefault(unit(name), set()).add(unit(target))
    _assert_acyclic(graph, "a cycle between folders")


def test_no_private_name_is_imported_from_another_module():
    modules = _modules()
    private = [f"{name}: from {mod} import {n}" for name, path in modules.items()
               for mod, names in _imports(name, path) for n in names
               if n.startswith("_") and not n.endswith("__") and mod != name]  # fmt: skip
    assert not private, "\n".join(private)


@pytest.mark.parametrize("module", ["rethink.spec", "rethink.suites", "rethink.store.runs", "rethink.experiments.estimates",
                                    "workflows.builder", "rethink.training.grouping", "rethink.training.defaults",
                                    "rethink.summary", "rethink.data.forked", "rethink.data.cifar"])  # fmt: skip
def test_modules_that_touch_no_tensor_do_not_import_torch(module):
    code = f"import sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [], f"importing {module} imports torch"


# ---------------------------------------------------------------------------------------------- run state


def test_a_damaged_result_is_one_clear_line_everywhere(tmp_path, capsys):
    """status, aggregate and run all say the same thing about a truncated result.json: no traceback anywhere."""
    from rethink.cli import main
    from rethink.data.synthetic import write_synthetic
    from rethink.store import LocalStore
    from rethink.store.runs import run_key
    from rethink.suites import Options, expand

    write_synthetic(tmp_path / "data", 60, 20, seed=0)
    common = ["--suite", "fig2b", "--smoke", "--epochs", "1", "--data-dir", str(tmp_path / "data"),
              "--store", str(tmp_path / "s")]  # fmt: skip
    assert main(["run", *common, "--device", "cpu", "--no-aggregate"]) == 0
    capsys.readouterr()
    spec = expand("fig2b", Options(dataset="synthetic-n60-m20-s0", smoke=True, epochs=1))[0]
    LocalStore(tmp_path / "s").write_text(run_key(spec.run_id, "result.json"), '{"run_id": "' + spec.run_id[:5])

    assert main(["status", *common]) == 0
    out = capsys.readouterr()
    (line,) = [x for x in out.out.splitlines() if x.startswith(spec.run_id)]
    assert "damaged" in line and "result.json is damaged" in line and "Traceback" not in out.err

    assert main(["aggregate", *common]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    assert sum("result.json is damaged" in x for x in out.out.splitlines()) == 1
    report = (tmp_path / "s" / "reports" / "synthetic" / "fig2b" / "report.md").read_text()
    assert f"`{spec.run_id}` **damaged**" in report

    assert main(["run", *common, "--device", "cpu", "--no-aggregate"]) == 0  # finished again from its checkpoint
    out = capsys.readouterr()
    assert "result.json is damaged" in out.out and "Traceback" not in out.err
    assert main(["status", *common]) == 0
    assert "2 finished" in capsys.readouterr().out


def test_run_paths_are_spelled_in_one_place():
    """Every runs/<id>/... key comes from store.runs.run_dir / run_key: no run path built by hand elsewhere."""
    import re

    pattern = re.compile(r"""["']runs/\{|["']runs/["']\s*\+""")
    found = [f"{path.relative_to(ROOT)}:{i}" for name, path in _modules().items() if name != "rethink.store.runs"
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert not found, found


VALUE_BUILDERS = {"data_of", "suite_of", "spec_of", "exec_options", "precision_of"}


def test_commands_turn_arguments_into_values_once():
    """In cli/commands.py only the command handlers see argparse's namespace, and they pass it whole only to the
    value builders of cli/options.py: everything else gets values."""
    tree = ast.parse((ROOT / "rethink" / "cli" / "commands.py").read_text())
    wrong = []
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        params = [a.arg for a in fn.args.args]
        if "args" in params and not fn.name.startswith("cmd_"):
            wrong.append(f"{fn.name} takes the namespace")
        for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call)]:
            name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")
            whole = [a for a in [*call.args, *(k.value for k in call.keywords)]
                     if isinstance(a, ast.Name) and a.id == "args"]  # fmt: skip
            if whole and name not in VALUE_BUILDERS:
                wrong.append(f"{fn.name} hands the namespace to {name}")
    assert not wrong, "\n".join(wrong)


def test_building_the_command_line_imports_no_heavy_library():
    """Every command's start builds the whole parser: it must not import torch, matplotlib or pandas (the
    catalogue's report kit does; a help text that reads a constant from it once cost every command 1.1 s)."""
    code = ("import json, sys; from rethink.cli import build_parser; build_parser(); "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib', 'pandas'})))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == []


def test_a_run_is_described_before_torch_is_imported():
    """`rethink train` turns its arguments into values (data, execution options, suite, spec) and names the run
    before importing torch, which it then imports while the data set is read: none of those values may import
    torch or the plotting libraries (ExecOptions once imported torch, and the suite's catalogue matplotlib and
    pandas: 2.7 s on the critical path of every run's start)."""
    code = ("import json, sys; from rethink.cli import build_parser; "
            "from rethink.cli.options import data_of, exec_options, spec_of, suite_of; "
            "a = build_parser().parse_args(['train', '--model', 'mlp-1x512', '--synthetic', '--data-dir', 'd']); "
            "d = data_of(a); exec_options(a); suite_of(a, d); spec_of(a, d).run_id; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib', 'pandas'})))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == []


def test_every_process_entry_point_runs_the_same_function():
    """The `rethink` script and `python -m rethink` both run cli.process_main (main, then the quick exit)."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rethink"] == "rethink.cli:process_main"
    assert "process_main()" in (ROOT / "rethink" / "__main__.py").read_text()
    out = subprocess.run([sys.executable, "-m", "rethink", "train", "--model", "no-such-model"], capture_output=True,
                         text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 2 and "no-such-model" in out.stderr
