"""The `rethink` commands. Each handler first turns its parsed arguments into values, once (cli.options: the
data, the suite, the run, the execution options), and hands only those down."""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import json
import sys

from rethink.cli.options import Data, SuiteRequest, data_of, exec_options, spec_of, suite_of
from rethink.errors import UserError, is_failure


def cmd_models(args) -> int:
    from rethink.models import model_table

    rows = model_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<16}{'model':<32}{'params':>12}{'paper':>12}  input")
    for r in rows:
        mark = "" if r["params"] == r["paper_params"] else "  MISMATCH"
        shape = "x".join(map(str, r["input_shape"]))
        print(f"{r['name']:<16}{r['display']:<32}{r['params']:>12,}{r['paper_params']:>12,}  {shape}{mark}")
    return 0


def cmd_data_synth(args) -> int:
    from rethink.data.synthetic import write_synthetic

    root = write_synthetic(args.out, args.train, args.test, args.seed)
    print(f"wrote a SYNTHETIC data set (not CIFAR-10) in the official format: {root} "
          f"({args.train} train / {args.test} test images, seed {args.seed})")  # fmt: skip
    return 0


def cmd_data_push(args) -> int:
    from rethink.data.archive import push
    from rethink.store import open_store

    if args.synthetic:
        print("synthetic data: nothing to push (every pod generates the same deterministic synthetic set itself)")
        return 0
    push(open_store(args.store), args.data_dir)
    return 0


def cmd_train(args) -> int:
    from rethink.store import open_store
    from rethink.store.runs import run_dir, run_key, run_state

    data, opts, store_url = data_of(args), exec_options(args), args.store
    suite = suite_of(args, data)
    if args.pack_index is not None or args.pack != 1:
        if args.suite is None or args.pack_index is None or args.index is not None:
            raise UserError("--pack goes with --suite S --pack-index J (not --index): rethink train --suite S --pack K "
                            "--pack-index J; see rethink plan --suite S --pack K")  # fmt: skip
        return _train_pack(suite, args.pack, args.pack_index, open_store(store_url), data, opts)
    if args.suite is not None or args.index is not None:
        if args.suite is None or args.index is None:
            raise UserError("--suite and --index go together: rethink train --suite S --index I")
        specs = suite.specs(selected=False)  # the index is into the whole suite, as pods count
        if not 0 <= args.index < len(specs):
            raise UserError(f"--index {args.index} is out of range: suite {args.suite} has {len(specs)} runs")
        spec = specs[args.index]
    elif not args.spec and not args.model:
        raise UserError("rethink train needs --model M, --spec FILE or --suite S --index I; see rethink train --help")
    else:
        spec = spec_of(args, data)
    store = open_store(store_url)
    print(f"run {spec.run_id}: {spec.label()} -> {store.where(run_dir(spec.run_id))}", flush=True)
    if run_state(store, spec).finished:  # no need to load (or download) any data
        print(f"run {spec.run_id} is already finished: {store.where(run_key(spec.run_id, 'result.json'))}")
        return 0
    with recording_failures(store, [spec]):
        crops = spec.pixels == "none" and may_be_cpu(opts.device)
        loaded, train_run = _data_and(data, "rethink.training.trainer", "train_run", central_crops=crops)
        train_run(spec, store, loaded, opts)
    return 0


@contextlib.contextmanager
def recording_failures(store, specs):
    """What the runner does for its runs, for `rethink train` (what cluster pods run): any failure after the spec
    was accepted, unreadable data included, is written to each unfinished run's error.json (removed when the run
    later finishes), so `status` and the report say failed, with the message. Not failures: preemption and a
    lease another trainer holds (Stopped, LeaseHeld), Ctrl-C, and a store that cannot be written (nothing
    could be recorded there)."""
    from rethink.store.runs import record_failure, run_state

    try:
        yield
    except BaseException as e:
        if not is_failure(e):  # the one definition the runner uses too
            raise
        for spec in specs:
            if not run_state(store, spec).finished:
                record_failure(store, spec, e)
        raise


def may_be_cpu(device: str) -> bool:
    """Whether --device may resolve to the CPU, told without importing torch ("auto": unless an NVIDIA device
    node exists). Only a speed choice hangs on it (which preprocessing the data thread does), never a number."""
    return device == "cpu" or (device == "auto" and not glob.glob("/dev/nvidia[0-9]*"))


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for the block, then as it was. Importing torch makes hundreds of
    thousands of objects, each allocation counting towards the next collection, and the collections walk all
    that are still young: off, the import takes ~15% less (docs/performance.md). Nothing the import makes is
    lost: what becomes garbage is collected after the block."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _data_and(data: Data, module: str, name: str, central_crops: bool = False):
    """The data set, read (torch-free) in a child process (else a thread: data.forked) while `module` imports
    torch, and `module.name`; `central_crops`: the reader also makes the float32 crops a CPU run preprocesses
    from (cifar.CentralCrops)."""
    from rethink.data import forked

    reader = forked.start(functools.partial(data.read, central_crops))
    try:
        with collector_paused():
            function = getattr(importlib.import_module(module), name)
    except BaseException:
        reader.cancel()
        raise
    return data.loaded(reader.result()), function


def _train_pack(suite: SuiteRequest, k: int, index: int, store, data: Data, opts) -> int:
    """`rethink train --suite S --pack K --pack-index J`: one pack of a suite, as a cluster pod trains it."""
    from rethink.store.runs import run_state
    from rethink.training.grouping import suite_pack

    pack = suite_pack(suite.specs(selected=False), k, index)
    todo = [s for s in pack if not run_state(store, s).finished]
    print(f"pack {index}: {len(pack)} {pack[0].model} runs, {len(pack) - len(todo)} already finished -> "
          f"{store.where('runs')}", flush=True)  # fmt: skip
    if todo:  # a finished pack needs no data
        with recording_failures(store, todo):
            loaded, train_pack = _data_and(data, "rethink.training.packed", "train_pack")
            train_pack(pack, store, loaded, opts)
    return 0


def cmd_suites(args) -> int:
    from rethink.suites import SUITES, Options, estimate_seconds, expand

    print(f"{'suite':<14}{'runs':>6}{'GPU h (est.)':>14}{'CPU h (est.)':>14}  description")
    for name, suite in SUITES.items():
        specs = expand(name, Options(seeds=args.seeds))
        gpu, cpu = estimate_seconds(specs, "gpu") / 3600, estimate_seconds(specs, "cpu") / 3600
        note = "" if suite.in_full or name == "full" else " [not in full]"
        print(f"{name:<14}{len(specs):>6}{gpu:>14.2f}{cpu:>14.2f}  {suite.description}{note}")
    print("\nestimates: every run to its epoch cap (the paper's protocol; --stop-at-acc finishes sooner); "
          "GPU: one H200, float32, measured for Small Inception and Small AlexNet, targets for the rest; CPU: this project's 2-core machine (docs/performance.md)")
    print("not training suites, so not listed (own cost and hardware): `rethink expressivity` (Section 4, CPU, "
          "seconds) and `rethink kernel` (Section 5, a 50k x 50k kernel solve: a large GPU for the full set)")  # fmt: skip
    return 0


def cmd_plan(args) -> int:
    suite = suite_of(args, data_of(args))
    everything, selection = suite.specs(selected=False), suite.selection
    if args.pack is not None:
        if selection is not None:
            raise UserError("plan --pack lists the packs pods train, of the whole suite: drop --only-models/"
                            "--only-labels/--only-pixels (rethink run --pack K takes them)")  # fmt: skip
        return _plan_packs(everything, args.pack, args.json)
    # Indices stay those of the whole suite: `rethink train --suite S --index I` trains row I.
    rows = [(i, s) for i, s in enumerate(everything) if selection is None or s in selection]
    if args.json:
        print(json.dumps([{"index": i, "run_id": s.run_id, "model": s.model, "labels": s.labels,
                           "pixels": s.pixels, "tags": list(s.tags), "spec": s.to_dict()} for i, s in rows],
                         indent=2))  # fmt: skip
        return 0
    width = max([len("tags"), *(len(",".join(s.tags)) for _, s in rows)])  # whole tags: never cut
    print(f"{'#':>4}  {'run id':<12}  {'tags':<{width}} run")
    for i, s in rows:
        print(f"{i:>4}  {s.run_id:<12}  {','.join(s.tags):<{width}} {s.label()} (<= {s.epochs} epochs)")
    print(f"{len(rows)} runs" + ("" if selection is None else f" of {len(everything)} ({selection.describe()})"))
    return 0


def _plan_packs(specs, k: int, as_json: bool) -> int:
    """The packs `rethink train --suite S --pack K --pack-index J` trains, J = 0, 1, ..."""
    from rethink.training.grouping import group_packs

    packs = group_packs(specs, k)
    index = {s.run_id: i for i, s in enumerate(specs)}
    if as_json:
        rows = [{"pack_index": j, "size": len(p), "model": p[0].model, "epochs": p[0].epochs,
                 "run_ids": [s.run_id for s in p], "indices": [index[s.run_id] for s in p]}
                for j, p in enumerate(packs)]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'pack':>4}  {'runs':>4}  {'model':<16} run ids")
    for j, p in enumerate(packs):
        print(f"{j:>4}  {len(p):>4}  {p[0].model:<16} {' '.join(s.run_id for s in p)}")
    print(f"{len(packs)} packs of <= {k} runs ({len(specs)} runs)")
    return 0


def cmd_status(args) -> int:
    from rethink.store import open_store
    from rethink.store.runs import run_state

    data, store = data_of(args), open_store(args.store)
    suite = suite_of(args, data)
    counts: dict[str, int] = {}
    for s in suite.specs():
        st = run_state(store, s)
        counts[st.state] = counts.get(st.state, 0) + 1
        print(f"{s.run_id}  {st.state:<12} {s.label():<48} {st.detail}")
    objects, size = store.usage()
    print(", ".join(f"{n} {state}" for state, n in counts.items()) + f" ({store.where()}: {objects} files, "
          f"{size / 2**20:.1f} MiB)")  # fmt: skip
    if set(counts) == {"not started"}:
        hint = other_source_hint(suite, data, store)
        if hint:
            print(hint)
    return 0


def other_source_hint(suite: SuiteRequest, data: Data, store) -> str | None:
    """When the store holds none of the suite's runs on the data the options select but some on the other source
    (synthetic or CIFAR-10): one line naming the flag that finds them."""
    from rethink.store.runs import run_state

    synthetic = data.synthetic
    specs = suite.on(data.other_source()).specs()
    found = sum(run_state(store, s).state != "not started" for s in specs)
    if not found:
        return None
    here, there = ("the synthetic set", "CIFAR-10") if synthetic else ("CIFAR-10", "the synthetic set")
    flag = "drop --synthetic" if synthetic else "add --synthetic"
    return (f"note: no run of suite {suite.name} on {here} in {store.where()}, but {found} of its {len(specs)} runs "
            f"on {there} are there: {flag} to see them")  # fmt: skip


def cmd_export(args) -> int:
    from rethink.revision import git_revision
    from rethink.store import open_store
    from rethink.store.records import export, finished_run_ids
    from rethink.store.runs import run_state

    store, suite = open_store(args.store), suite_of(args, data_of(args))
    partial = []
    if suite.name is None:
        if suite.selection is not None:
            raise UserError("--only-models/--only-labels/--only-pixels select part of a suite: give --suite S too")
        ids = finished_run_ids(store)
    else:
        specs = suite.specs()
        states = {s.run_id: run_state(store, s).state for s in specs}
        ids = [s.run_id for s in specs if states[s.run_id] == "finished"]
        partial = [s.run_id for s in specs if states[s.run_id] == "partial"] if args.partial_checkpoints else []
    if args.exclude_store:
        already = set(finished_run_ids(open_store(args.exclude_store)))
        ids = [i for i in ids if i not in already]
    export(store, args.out, ids, partial, max_bytes=args.max_size, revision=git_revision())
    return 0


def cmd_import(args) -> int:
    from rethink.store import open_store
    from rethink.store.records import import_archive

    import_archive(args.archive, open_store(args.store), with_checkpoints=args.with_checkpoints)
    return 0


def cmd_run(args) -> int:
    import time

    from rethink.runner import DataSource, run_specs

    data, opts = data_of(args), exec_options(args)
    suite = suite_of(args, data)
    if args.time_budget is not None:
        opts.deadline = opts.clock() + args.time_budget  # counted from the command's start
    specs = suite.specs()
    source = DataSource(str(data.directory()), verify=data.verify)
    t0 = time.monotonic()
    outcome = run_specs(specs, args.store, source, opts, jobs=args.jobs, pack=args.pack)
    failures = outcome.failures
    if outcome.budget_spent:
        print(f"time budget of {args.time_budget:g} s spent after {time.monotonic() - t0:.0f} s: "
              f"{len(outcome.trained)} runs finished, {len(outcome.partial)} partial (checkpointed: "
              f"{' '.join(outcome.partial) or 'none'}), {len(outcome.not_started)} not started; the same command "
              "resumes them", flush=True)  # fmt: skip
        if not args.no_aggregate:
            print("report not rendered (the budget is spent): rethink aggregate with the same options renders it")
    elif not args.no_aggregate:
        _aggregate(suite, data, args.store, args.overfit_threshold)
    if failures:
        print(f"rethink: {len(failures)} of {len(specs)} runs failed:", file=sys.stderr)
        for rid, message in failures.items():
            print(f"  {rid}: {message}", file=sys.stderr)
        return 1
    return 0


def _aggregate(suite: SuiteRequest, data: Data, store_url: str, overfit_threshold: float | None) -> None:
    from rethink.experiments.kit import OVERFIT_THRESHOLD
    from rethink.report.aggregate import aggregate
    from rethink.store import open_store
    from rethink.store.runs import run_state

    store = open_store(store_url)
    written = aggregate(store, suite.name, suite.options, log=lambda m: print(m, flush=True),
                        overfit_threshold=overfit_threshold or OVERFIT_THRESHOLD, selection=suite.selection)  # fmt: skip
    if all(run_state(store, s).state == "not started" for s in suite.specs()):
        hint = other_source_hint(suite, data, store)
        if hint:
            print(hint)
    for key in written:
        if key.endswith("report.html"):
            print(f"report: {store.where(key)}")


def cmd_aggregate(args) -> int:
    data = data_of(args)
    _aggregate(suite_of(args, data), data, args.store, args.overfit_threshold)
    return 0


def cmd_expressivity(args) -> int:
    from rethink.experiments.expressivity import run_and_report

    return run_and_report(data_of(args).load(), n=args.n, labels=args.labels, seed=args.seed,
                          bias_position=args.bias_position, store=args.store, as_json=args.json)  # fmt: skip


def cmd_kernel(args) -> int:
    from rethink.experiments.kernel import run_and_report

    return run_and_report(data_of(args).load(), store=args.store, as_json=args.json, features=args.features,
                          n_train=args.n_train, n_test=args.n_test, filters=args.filters, l2s=args.l2, dtype=args.dtype,
                          device=args.device, seed=args.seed)  # fmt: skip


def cmd_bench(args) -> int:
    from rethink.perf.bench import bench, format_record

    record = bench(args.model, device=args.device, pack=args.pack, compile=args.compile, compile_mode=args.compile_mode,
                   amp=args.amp, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                   data_dir=args.data_dir, baseline=args.baseline, workers=args.workers, epochs=args.epochs,
                   train_images=args.train_images, test_images=args.test_images, reference=args.reference,
                   log=(lambda m: None) if args.json else (lambda m: print(m, flush=True)))  # fmt: skip
    print(json.dumps(record, indent=2) if args.json else format_record(record))
    return 0
