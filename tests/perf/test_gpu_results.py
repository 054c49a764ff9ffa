"""bench/gpu-results.sh end to end on the CPU: a dry check of one GPU chunk (slow: about two minutes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rethink.data.synthetic import write_synthetic
from rethink.store import LocalStore
from rethink.store.records import finished_run_ids, import_archive

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_one_chunk_trains_and_exports_what_it_finished(tmp_path, one_thread_env):
    write_synthetic(tmp_path / "data", 100, 20, seed=0)
    out = tmp_path / "out"
    proc = subprocess.run([str(ROOT / "bench" / "gpu-results.sh"), "--device", "cpu", "--smoke", str(tmp_path / "data"),
                           str(out), "2"], cwd=ROOT, env=one_thread_env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (archive,) = out.glob("results-*.tar.gz")
    assert archive.stat().st_size <= 16 * 2**20
    log = (out / "log.txt").read_text()
    assert "time budget" in log  # the chunk ended at its budget, inside the two minutes
    store = LocalStore(tmp_path / "results")
    got = import_archive(str(archive), store, log=lambda m: None)
    assert got.added and finished_run_ids(store) == sorted(got.added)
    assert not list((tmp_path / "results").rglob("*.pt"))
