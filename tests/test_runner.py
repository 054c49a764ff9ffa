"""The local runner: idempotent, failures isolated and reported, parallel jobs, and `rethink status`."""

from __future__ import annotations

import os

import pytest

from rethink import runner
from rethink.data.cifar import dataset_identity
from rethink.data.synthetic import write_synthetic
from rethink.runner import DataSource, run_specs, run_state, threads_per_job
from rethink.spec import RunSpec
from rethink.store import LocalStore
from rethink.store.runs import read_metrics, run_key
from rethink.training.options import ExecOptions


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runner-data")
    write_synthetic(out, 200, 50, seed=0)
    return out


def specs_for(data_dir, n=3, **kw) -> list[RunSpec]:
    ds = dataset_identity(data_dir)
    return [RunSpec(model="mlp-1x512", dataset=ds, epochs=2, batch_size=50, seed=s, **kw) for s in range(n)]


def opts(lines: list[str]) -> ExecOptions:
    return ExecOptions(device="cpu", progress=False, log=lines.append)


def test_runs_everything_then_nothing(tmp_path, data_dir, one_thread):
    specs = specs_for(data_dir)
    lines: list[str] = []
    assert run_specs(specs, str(tmp_path / "s"), DataSource(str(data_dir)), opts(lines)) == {}
    store = LocalStore(tmp_path / "s")
    assert all(run_state(store, s).state == "finished" for s in specs)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*") if p.is_file()}
    lines.clear()
    assert run_specs(specs, str(tmp_path / "s"), DataSource(str(data_dir)), opts(lines)) == {}
    assert any("3 already finished, 0 to train" in line for line in lines)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*") if p.is_file()} == stamps


def test_a_failing_run_is_isolated_and_reported(tmp_path, data_dir, one_thread):
    good = specs_for(data_dir, n=2)
    bad = good[0].replace(dataset="synthetic-n1-m1-s9")  # not the data set on disk: this run fails
    failures = run_specs([bad, *good], str(tmp_path / "s"), DataSource(str(data_dir)), opts([]))
    assert list(failures) == [bad.run_id]
    assert "synthetic-n1-m1-s9" in failures[bad.run_id]
    store = LocalStore(tmp_path / "s")
    state, detail = run_state(store, bad).state, run_state(store, bad).detail
    assert state == "failed" and "synthetic-n1-m1-s9" in detail
    assert all(run_state(store, s).state == "finished" for s in good)


def test_parallel_jobs_give_the_same_runs(tmp_path, data_dir, without_timing):
    specs = specs_for(data_dir, n=2)
    assert run_specs(specs, str(tmp_path / "par"), DataSource(str(data_dir)), opts([]), jobs=2) == {}
    assert run_specs(specs, str(tmp_path / "seq"), DataSource(str(data_dir)), opts([]), jobs=1) == {}
    for s in specs:
        par = without_timing(read_metrics(LocalStore(tmp_path / "par"), s.run_id))
        seq = without_timing(read_metrics(LocalStore(tmp_path / "seq"), s.run_id))
        assert len(par) == len(seq) == 2
        for a, b in zip(par, seq):  # worker threads differ from this process's: equal up to rounding
            assert a.keys() == b.keys()
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_status_shows_each_state(tmp_path, data_dir, one_thread):
    specs = specs_for(data_dir, n=4)
    store = LocalStore(tmp_path / "s")
    run_specs(specs[:1], str(tmp_path / "s"), DataSource(str(data_dir)), opts([]))
    run_specs(specs[1:2], str(tmp_path / "s"), DataSource(str(data_dir)), opts([]))
    store.delete(run_key(specs[1].run_id, "result.json"))  # as if killed after its first epoch's checkpoint
    store.write_text(run_key(specs[1].run_id, "metrics.jsonl"),
                     store.read_text(run_key(specs[1].run_id, "metrics.jsonl")).splitlines()[0] + "\n")  # fmt: skip
    runner.record_failure(store, specs[2], RuntimeError("boom"))
    states = [run_state(store, s) for s in specs]
    assert [s.state for s in states] == ["finished", "partial", "failed", "not started"]
    assert states[1].detail == "epoch 1 of 2" and "boom" in states[2].detail


def test_run_command_exits_nonzero_listing_failures(tmp_path, data_dir, monkeypatch, capsys):
    from rethink.cli import main

    real = runner.train_run

    def flaky(spec, store, data, o):
        if spec.seed == 1:
            raise RuntimeError("simulated failure")
        return real(spec, store, data, o)

    monkeypatch.setattr(runner, "train_run", flaky)
    argv = ["run", "--suite", "fig2b", "--smoke", "--epochs", "1", "--seeds", "2", "--data-dir", str(data_dir),
            "--store", str(tmp_path / "s"), "--device", "cpu", "--no-aggregate"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "2 of 4 runs failed" in err and err.count("simulated failure") == 2


def test_an_unwritable_store_stops_the_runner_with_one_error(tmp_path, data_dir, monkeypatch):
    from rethink.store import StoreError

    calls = []

    def store_down(spec, store, data, o):
        calls.append(spec.run_id)
        raise StoreError("cannot write runs/x/spec.json in store s3://b: unreachable")

    monkeypatch.setattr(runner, "train_run", store_down)
    with pytest.raises(StoreError, match="unreachable"):
        run_specs(specs_for(data_dir), str(tmp_path / "s"), DataSource(str(data_dir)), opts([]))
    assert len(calls) == 1  # stopped at the first run instead of failing every run the same way


def test_a_store_that_cannot_be_read_is_one_error_before_training(tmp_path, data_dir):
    from rethink.store import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="in store .*Not a directory"):
        run_specs(specs_for(data_dir), str(blocker / "store"), DataSource(str(data_dir)), opts([]))


# ---------------------------------------------------------------------------------------------- time budget


class _Budget:
    """A clock for ExecOptions.deadline that passes the deadline once `steps` SGD steps were taken in all."""

    def __init__(self, monkeypatch, steps: int):
        from rethink.training import trainer as train

        self.steps, self.taken = steps, 0
        real = train.sgd_step

        def counting(*a, **k):
            self.taken += 1
            return real(*a, **k)

        monkeypatch.setattr(train, "sgd_step", counting)

    def __call__(self) -> float:
        return 1.0 if self.taken >= self.steps else 0.0


def test_a_time_boxed_run_stops_at_its_budget_and_the_next_call_finishes_it(tmp_path, data_dir, monkeypatch,
                                                                            without_timing, one_thread):  # fmt: skip
    specs = specs_for(data_dir, n=3)  # 2 epochs of 4 steps each
    boxed = ExecOptions(device="cpu", progress=False, log=[].append, deadline=0.5, clock=_Budget(monkeypatch, 10))
    outcome = run_specs(specs, str(tmp_path / "boxed"), DataSource(str(data_dir)), boxed)
    monkeypatch.undo()
    # The budget ended during the second run's third step: the first finished, the second stopped
    # mid-epoch with a checkpoint, the third never started.
    assert outcome.budget_spent and outcome == {}
    assert (outcome.trained, outcome.partial, outcome.not_started) == ([specs[0].run_id], [specs[1].run_id],
                                                                      [specs[2].run_id])  # fmt: skip
    store = LocalStore(tmp_path / "boxed")
    import io

    import torch

    ckpt = torch.load(io.BytesIO(store.read_bytes(run_key(specs[1].run_id, "checkpoint.pt"))), weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"]) == (0, 2)
    assert [run_state(store, s).state for s in specs] == ["finished", "partial", "not started"]
    # The next call, without a budget, finishes the suite with the metrics of an uninterrupted call.
    lines: list[str] = []
    again = run_specs(specs, str(tmp_path / "boxed"), DataSource(str(data_dir)), opts(lines))
    assert again.trained == [specs[1].run_id, specs[2].run_id] and not again.budget_spent
    assert any(f"run {specs[1].run_id}: resuming at epoch 1, batch 2" in line for line in lines)
    run_specs(specs, str(tmp_path / "whole"), DataSource(str(data_dir)), opts([]))
    for s in specs:
        assert without_timing(read_metrics(store, s.run_id)) == without_timing(
            read_metrics(LocalStore(tmp_path / "whole"), s.run_id))  # fmt: skip


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("9m", 540), ("1h30m", 5400), ("1.5h", 5400)])
def test_time_budget_durations(text, seconds):
    from rethink.cli.options import duration

    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["9", "nine minutes", "0m", "5m x"])
def test_a_bad_time_budget_is_refused(text, capsys):
    from rethink.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "--suite", "smoke", "--time-budget", text])
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("expected a duration" in err or "must be positive" in err), err


def test_jobs_share_the_cpus_this_process_may_use_not_the_machines(monkeypatch):
    # A container given 4 of a host's 64 CPUs: two jobs get 2 threads each, not 32.
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert threads_per_job(2) == 2
    assert threads_per_job(8) == 1  # never zero
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # no affinity mask (macOS): the machine's count
    assert threads_per_job(2) == 32
