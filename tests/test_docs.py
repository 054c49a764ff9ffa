"""The repository's own paths named in its docs, scripts and comments exist: a file moved in a restructure
must not leave the README, a doc, or bench/gpu.sh's test selection pointing at nothing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A path inside the repository, as the docs write it: a top-level folder of this repository, then a file name.
PATH = re.compile(r"(?<![\w./-])(?:rethink|tests|workflows|bench|k8s|docs|results|requirements)/[\w./-]*\w\.(?:py|sh|md|yaml|json|toml|lock|csv)\b")
TEXT = (".md", ".py", ".sh", ".yaml", ".toml", ".lock", ".txt", "Dockerfile", "run")
SELF = "tests/test_docs.py"  # its examples name moved files on purpose
NOT_PATHS = {"tests/x.py"}  # a placeholder in an example of pytest's output (tests/mutation_check.py)


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    skip = ("results/runs/", "results/reports/", "workflows/schema/", "workflows/golden/", "tests/workflows/recorded/")
    return [ROOT / n for n in names.split() if n.endswith(TEXT) and not n.startswith(skip) and n != SELF]


def test_paths_named_in_the_repository_exist():
    missing = []
    for f in tracked_text_files():
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for p in PATH.findall(line):
                if p not in NOT_PATHS and not (ROOT / p).exists():
                    missing.append(f"{f.relative_to(ROOT)}:{i}: {p}")
    assert not missing, "paths that name nothing:\n" + "\n".join(missing)


def test_the_check_sees_a_moved_file(tmp_path):
    assert PATH.findall("see `tests/test_pack.py` and rethink/training/packed.py.") == [
        "tests/test_pack.py", "rethink/training/packed.py"]  # fmt: skip
    assert not (ROOT / "tests/test_pack.py").exists()
