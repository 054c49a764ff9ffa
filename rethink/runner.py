"""The local runner: train every unfinished run of a list of specs, in-process or in N worker processes.

A failing run does not stop the others: its error is written to runs/<id>/error.json and listed at the end.
Finished runs are skipped, partial ones resume from their checkpoint, so running it again trains nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from rethink.spec import RunSpec
from rethink.store import Store, StoreError, open_store, run_key
from rethink.train import ExecOptions, Preempted, read_metrics, train_run

# What stops the whole runner instead of failing one run: preemption, Ctrl-C, and a store that cannot be written
# (every other run would fail the same way, and their failures could not be recorded either).
FATAL = (Preempted, KeyboardInterrupt, StoreError)


@dataclass
class DataSource:
    """How a worker process finds the data (the loaded arrays are not shipped between processes)."""

    data_dir: str
    verify: bool = True

    def load(self):
        import warnings

        from rethink.data import load_cifar10

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_cifar10(self.data_dir, verify=self.verify)


def run_state(store: Store, spec: RunSpec) -> tuple[str, str]:
    """('finished' | 'failed' | 'partial' | 'not started', a detail for humans)."""
    rid = spec.run_id
    text = store.read_text(run_key(rid, "result.json"))
    if text is not None:
        r = json.loads(text)
        return "finished", f"{r['epochs']} epochs, stopped at {r['stopped']}, test acc {r['final_test_acc']:.4f}"
    error = store.read_text(run_key(rid, "error.json"))
    metrics = read_metrics(store, rid)
    if error is not None:
        return "failed", json.loads(error).get("error", "?")
    if metrics or store.exists(run_key(rid, "checkpoint.pt")):
        return "partial", f"epoch {len(metrics)} of {spec.epochs}"
    return "not started", ""


def record_failure(store: Store, spec: RunSpec, exc: BaseException) -> str:
    message = f"{type(exc).__name__}: {exc}"
    payload = {
        "run_id": spec.run_id,
        "error": message,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        store.write_text(run_key(spec.run_id, "error.json"), json.dumps(payload, indent=2) + "\n")
    except Exception:
        pass  # the store itself may be what failed; the runner still reports it
    return message


_worker_data = {}


def _train_in_worker(spec_json: str, store_url: str, source: DataSource, opts: ExecOptions, threads: int):
    """Runs in a worker process: (run_id, None) on success, (run_id, message) on failure."""
    import torch

    torch.set_num_threads(threads)
    spec = RunSpec.from_json(spec_json)
    store = open_store(store_url)
    try:
        if source.data_dir not in _worker_data:
            _worker_data[source.data_dir] = source.load()
        train_run(spec, store, _worker_data[source.data_dir], opts)
        return spec.run_id, None
    except FATAL:
        raise
    except BaseException as e:
        return spec.run_id, record_failure(store, spec, e)


def run_specs(
    specs: list[RunSpec],
    store_url: str,
    source: DataSource,
    opts: ExecOptions,
    jobs: int = 1,
    progress: bool | None = None,
    pack: int = 1,
) -> dict[str, str]:
    """Train every spec not yet finished; returns {run_id: error message} of the runs that failed.

    With pack > 1, compatible runs train together in packs of up to `pack` (rethink.pack.group_packs).
    """
    store = open_store(store_url)
    todo = [s for s in specs if store.read_bytes(run_key(s.run_id, "result.json")) is None]
    done_before = len(specs) - len(todo)
    progress = sys.stderr.isatty() if progress is None else progress
    say = opts.log
    say(f"{len(specs)} runs: {done_before} already finished, {len(todo)} to train in {store.where()}")
    failures: dict[str, str] = {}
    if not todo:
        return failures
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), initial=done_before, desc="runs", unit="run", file=sys.stderr)
        opts.log = bar.write
        opts.progress = False

    def finished(spec: RunSpec, error: str | None, k: int) -> None:
        if error:
            failures[spec.run_id] = error
        status = "FAILED: " + error if error else "done"
        if bar is not None:
            bar.update(1)
            bar.write(f"[{k}/{len(todo)}] {spec.run_id} {spec.label()}: {status}")
        else:
            say(f"[{k}/{len(todo)}] {spec.run_id} {spec.label()}: {status}")

    if pack > 1:
        from rethink.pack import group_packs

        packs = group_packs(todo, pack)
        say(f"{len(todo)} runs in {len(packs)} packs of up to {pack}")
        _run_packs(packs, store, store_url, source, opts, jobs, finished)
    elif jobs <= 1:
        data = None
        for k, spec in enumerate(todo, 1):
            if bar is not None:
                bar.set_postfix_str(f"{spec.run_id} {spec.label()}")
            error = None
            try:
                if data is None:
                    data = source.load()
                train_run(spec, store, data, opts)
            except FATAL:
                raise
            except Exception as e:
                error = record_failure(store, spec, e)
            finished(spec, error, k)
    else:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // jobs)
        worker_opts = ExecOptions(**{**opts.__dict__, "log": _quiet, "progress": False})
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {
                pool.submit(_train_in_worker, s.canonical_json(), store_url, source, worker_opts, threads): s
                for s in todo
            }
            for k, fut in enumerate(as_completed(futures), 1):
                spec = futures[fut]
                try:
                    _, error = fut.result()
                except FATAL:
                    pool.shutdown(cancel_futures=True)
                    raise
                except Exception as e:  # the worker process died
                    error = record_failure(store, spec, e)
                finished(spec, error, k)
    if bar is not None:
        bar.close()
    return failures


def _train_pack(pack: list[RunSpec], store: Store, data, opts: ExecOptions) -> dict[str, str | None]:
    """Train one pack; {run_id: error message or None}. A failure fails the members it left unfinished."""
    from rethink.pack import train_pack

    try:
        train_pack(pack, store, data, opts)
        return {s.run_id: None for s in pack}
    except FATAL:
        raise
    except Exception as e:
        return {s.run_id: None if store.exists(run_key(s.run_id, "result.json")) else record_failure(store, s, e)
                for s in pack}  # fmt: skip


def _train_pack_in_worker(spec_jsons: list[str], store_url: str, source: DataSource, opts: ExecOptions, threads: int):
    """Runs in a worker process: {run_id: error message or None} for one pack."""
    import torch

    torch.set_num_threads(threads)
    if source.data_dir not in _worker_data:
        _worker_data[source.data_dir] = source.load()
    return _train_pack([RunSpec.from_json(j) for j in spec_jsons], open_store(store_url), _worker_data[source.data_dir],
                       opts)  # fmt: skip


def _run_packs(packs: list[list[RunSpec]], store: Store, store_url: str, source: DataSource, opts: ExecOptions,
               jobs: int, finished) -> None:  # fmt: skip
    """Train packs one after another, or `jobs` at a time in worker processes; report each member's end."""
    k = 0

    def report(pack: list[RunSpec], errors: dict) -> None:
        nonlocal k
        for spec in pack:
            k += 1
            finished(spec, errors.get(spec.run_id), k)

    if jobs <= 1:
        data = source.load()
        for pack in packs:
            report(pack, _train_pack(pack, store, data, opts))
        return
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // jobs)
    worker_opts = ExecOptions(**{**opts.__dict__, "log": _quiet, "progress": False})
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {
            pool.submit(_train_pack_in_worker, [s.canonical_json() for s in pack], store_url, source, worker_opts,
                        threads): pack  # fmt: skip
            for pack in packs
        }
        for fut in as_completed(futures):
            pack = futures[fut]
            try:
                errors = fut.result()
            except FATAL:
                pool.shutdown(cancel_futures=True)
                raise
            except Exception as e:  # the worker process died
                errors = {s.run_id: record_failure(store, s, e) for s in pack
                          if not store.exists(run_key(s.run_id, "result.json"))}  # fmt: skip
            report(pack, errors)


def _quiet(msg: str) -> None:
    """Per-epoch lines of parallel workers would interleave; the runner reports each run's end instead."""
