"""The local runner: train every unfinished run of a list of specs, in-process or in N worker processes.

A failing run does not stop the others: its error is written to runs/<id>/error.json and listed at the end.
Finished runs are skipped, partial ones resume from their checkpoint, so running it again trains nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from rethink.errors import is_failure
from rethink.spec import RunSpec
from rethink.store import Store, open_store
from rethink.store.lease import LeaseHeld, LeaseLost
from rethink.store.runs import record_failure, run_state
from rethink.training.grouping import group_packs
from rethink.training.loop import OutOfTime
from rethink.training.options import ExecOptions
from rethink.training.packed import train_pack
from rethink.training.trainer import train_run

__all__ = ["DataSource", "Outcome", "record_failure", "run_specs", "run_state"]



@dataclass
class DataSource:
    """How a worker process finds the data (the loaded arrays are not shipped between processes)."""

    data_dir: str
    verify: bool = True

    def load(self):
        import warnings

        from rethink.data.cifar import load_cifar10

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_cifar10(self.data_dir, verify=self.verify)


_worker_data = {}


class Outcome(dict):
    """{run_id: error message} of the runs that failed, plus what became of the others in this call."""

    def __init__(self):
        super().__init__()
        self.trained: list[str] = []  # finished in this call
        self.partial: list[str] = []  # stopped by the time budget, checkpointed: a later call resumes them
        self.not_started: list[str] = []  # left for a later call by the time budget
        self.elsewhere: list[str] = []  # being trained by another trainer (it holds the run's lease)
        self.budget_spent = False

    @property
    def failures(self) -> dict[str, str]:
        return dict(self)


def _train_task(task: list[RunSpec], store: Store, data, opts: ExecOptions) -> dict[str, str | None]:
    """Train one task (a run, or a pack of runs); {run_id: None (finished) | PARTIAL | NOT_STARTED | error}."""
    if opts.deadline is not None and opts.clock() >= opts.deadline:
        return {s.run_id: NOT_STARTED for s in task}
    try:
        if len(task) == 1:
            train_run(task[0], store, data, opts)
        else:
            train_pack(task, store, data, opts)
        return {s.run_id: None for s in task}
    except OutOfTime:
        return {s.run_id: None if run_state(store, s).finished else PARTIAL for s in task}
    except (LeaseHeld, LeaseLost):  # another trainer has it: not a failure, and not ours to record
        return {s.run_id: None if run_state(store, s).finished else ELSEWHERE for s in task}
    except BaseException as e:
        if not is_failure(e):  # SIGTERM, Ctrl-C, a store that cannot be written: the whole call stops
            raise
        return {s.run_id: None if run_state(store, s).finished else record_failure(store, s, e)
                for s in task}  # fmt: skip


def _train_task_in_worker(spec_jsons: list[str], store_url: str, source: DataSource, opts: ExecOptions,
                          threads: int) -> dict[str, str | None]:  # fmt: skip
    """Runs in a worker process: `_train_task` of one task, the data loaded once per worker."""
    import torch

    torch.set_num_threads(threads)
    if source.data_dir not in _worker_data:
        _worker_data[source.data_dir] = source.load()
    return _train_task([RunSpec.from_json(j) for j in spec_jsons], open_store(store_url),
                       _worker_data[source.data_dir], opts)  # fmt: skip


PARTIAL, NOT_STARTED, ELSEWHERE = "\x00partial", "\x00not started", "\x00elsewhere"  # outcomes, not errors


def run_specs(
    specs: list[RunSpec],
    store_url: str,
    source: DataSource,
    opts: ExecOptions,
    jobs: int = 1,
    progress: bool | None = None,
    pack: int = 1,
) -> Outcome:
    """Train every spec not yet finished; returns the failures ({run_id: error message}) and what became of the
    rest (`Outcome`). With pack > 1, compatible runs train together in packs of up to `pack`
    (training.grouping.group_packs). With `opts.deadline`, no run starts after it and running ones checkpoint and
    stop at it (`rethink run --time-budget`): a later call resumes where this one stopped.
    """
    store = open_store(store_url)
    opts = dataclasses.replace(opts, lease_wait=0.0)  # a run another trainer holds is skipped, not waited for
    todo = [s for s in specs if not run_state(store, s).finished]
    done_before = len(specs) - len(todo)
    progress = sys.stderr.isatty() if progress is None else progress
    say = opts.log
    say(f"{len(specs)} runs: {done_before} already finished, {len(todo)} to train in {store.where()}")
    outcome = Outcome()
    if not todo:
        return outcome
    say(f"expected: about {hms(expected_seconds(todo, opts))} for {len(todo)} runs ({expected_basis(opts, todo)})")
    t0 = time.monotonic()
    if pack > 1:
        tasks = group_packs(todo, pack)
        say(f"{len(todo)} runs in {len(tasks)} packs of up to {pack}")
    else:
        tasks = [[s] for s in todo]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), initial=done_before, desc="runs", unit="run", file=sys.stderr)
        opts.log = bar.write
        opts.progress = False
    by_id = {s.run_id: s for s in todo}
    k = 0

    def report(results: dict[str, str | None]) -> None:
        nonlocal k
        for rid, result in results.items():
            spec = by_id[rid]
            if result == NOT_STARTED:
                outcome.not_started.append(rid)
                outcome.budget_spent = True
                continue
            k += 1
            if result == ELSEWHERE:
                outcome.elsewhere.append(rid)
                status = "skipped: another trainer holds its lease"
            elif result == PARTIAL:
                outcome.partial.append(rid)
                outcome.budget_spent = True
                status = "stopped at the time budget, checkpointed"
            elif result is None:
                outcome.trained.append(rid)
                status = "done"
            else:
                outcome[rid] = result
                status = "FAILED: " + result
            line = f"[{k}/{len(todo)}] {rid} {spec.label()}: {status}"
            elapsed = time.monotonic() - t0
            eta = elapsed / k * (len(todo) - k)
            suite = (f"suite: {done_before + k} of {len(specs)} runs done, {hms(elapsed)} elapsed"
                     + (f", about {hms(eta)} to go (from the {k} runs of this call)" if k < len(todo) else "")
                     + f"; results in {store.where('runs')}")  # fmt: skip
            if bar is not None:
                bar.update(0 if result in (PARTIAL, ELSEWHERE) else 1)
                bar.write(line)
                bar.write(suite)
            else:
                say(line)
                say(suite)

    if jobs <= 1:
        data = None
        for task in tasks:
            if bar is not None:
                bar.set_postfix_str(f"{task[0].run_id} {task[0].label()}" + (f" (+{len(task) - 1})" if len(task) > 1
                                                                            else ""))  # fmt: skip
            if data is None and not (opts.deadline is not None and opts.clock() >= opts.deadline):
                data = source.load()
            report(_train_task(task, store, data, opts))
    else:
        import multiprocessing as mp

        threads = threads_per_job(jobs)
        worker_opts = ExecOptions(**{**opts.__dict__, "log": _quiet, "progress": False})
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {
                pool.submit(_train_task_in_worker, [s.canonical_json() for s in task], store_url, source, worker_opts,
                            threads): task  # fmt: skip
                for task in tasks
            }
            for fut in as_completed(futures):
                task = futures[fut]
                try:
                    results = fut.result()
                except BaseException as e:  # a stop, or the worker process died
                    if not is_failure(e):
                        pool.shutdown(cancel_futures=True)
                        raise
                    results = {s.run_id: None if run_state(store, s).finished
                               else record_failure(store, s, e) for s in task}  # fmt: skip
                report(results)
    if bar is not None:
        bar.close()
    if outcome.budget_spent:
        say(f"time budget spent: {len(outcome.trained)} runs finished in this call, {len(outcome.partial)} "
            f"checkpointed mid-run, {len(outcome.not_started)} not started; run the same command again to go on")
    return outcome


def threads_per_job(jobs: int) -> int:
    """Torch threads for each of `jobs` worker processes: the CPUs this process may run on, shared out.

    Counted from the affinity mask where there is one (taskset, a container's cpuset), not the machine's
    count: a pod given 4 of a host's 64 CPUs would otherwise start 32 threads per job.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity mask
        usable = os.cpu_count() or 1
    return max(1, usable // jobs)


def hms(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def expected_seconds(specs: list[RunSpec], opts: ExecOptions) -> float:
    """The catalogue's estimate of training `specs` on the device `opts` asks for (every run to its cap)."""
    from rethink.experiments.estimates import estimate_seconds

    return estimate_seconds(specs, "gpu" if _on_gpu(opts) else "cpu")


def expected_basis(opts: ExecOptions, specs: list[RunSpec] | None = None) -> str:
    from rethink.experiments.estimates import source

    kind = "gpu" if _on_gpu(opts) else "cpu"
    models = None if specs is None else {s.model for s in specs}
    return f"every run to its cap at the per-epoch rates of docs/performance.md, {source(kind, models)}"


def _on_gpu(opts: ExecOptions) -> bool:
    if opts.device == "auto":
        import torch

        return torch.cuda.is_available()
    return opts.device.startswith("cuda")


def _quiet(msg: str) -> None:
    """Per-epoch lines of parallel workers would interleave; the runner reports each run's end instead."""
