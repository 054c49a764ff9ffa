"""The `rethink` command line. Every option's help states its default; bad input gives one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from rethink.errors import UserError

DEFAULT_DATA_DIR = "./data"
SYNTHETIC_SIZE = (10_000, 2_000)  # what --synthetic generates when no synthetic set exists yet


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        # A help text that already explains its default keeps its own words.
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Bad input gives the error and where to look, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nsee '{self.prog} --help'\n")


def _parser(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="directory holding cifar-10-batches-py/ (downloaded there when missing)")
    p.add_argument("--synthetic", action="store_true",
                   help=f"use synthetic data in DATA_DIR/synthetic (created, {SYNTHETIC_SIZE[0]} train / "
                        f"{SYNTHETIC_SIZE[1]} test images, when missing) instead of CIFAR-10")
    p.add_argument("--no-verify-data", action="store_true", help="skip the md5 check of the CIFAR-10 files")  # fmt: skip


def add_exec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--store", default="./runs", help="where runs live: a directory, file://PATH or s3://bucket/prefix")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast for the training steps (CUDA); default off: float32 (TF32 on CUDA) until "
                        "bench/gpu.sh has shown bf16 and float32 runs agree; evaluation is float32 either way")
    p.add_argument("--no-onednn", action="store_true",
                   help="on the CPU, run fully connected layers through PyTorch's default BLAS instead of oneDNN "
                        "(default: oneDNN, ~2x faster on some CPUs; same function up to rounding)")  # fmt: skip
    p.add_argument("--checkpoint-minutes", type=float, default=10.0,
                   help="also checkpoint mid-epoch when this many minutes passed since the last checkpoint")  # fmt: skip


def data_dir_of(args) -> Path:
    """The data directory the options select (creating the default synthetic set when asked for)."""
    from rethink.data import DIRNAME, write_synthetic

    base = Path(args.data_dir)
    if not getattr(args, "synthetic", False):
        from rethink.datastore import fetch_if_missing

        fetch_if_missing(getattr(args, "store", None), base)  # a pod's empty data dir: the store's archive first
        return base
    path = base / "synthetic"
    if not (path / DIRNAME / "batches.meta").exists():
        print(f"creating a synthetic data set in {path} (not CIFAR-10)", file=sys.stderr)
        write_synthetic(path, *SYNTHETIC_SIZE, seed=0)
    return path


def dataset_of(args) -> str:
    """The data set identity the options select, without creating or downloading anything."""
    from rethink.data import dataset_identity, synthetic_identity

    if getattr(args, "synthetic", False):
        return synthetic_identity(*SYNTHETIC_SIZE, seed=0)
    return dataset_identity(args.data_dir)


def load_data(args):
    from rethink.data import load_cifar10

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_cifar10(data_dir_of(args), verify=not args.no_verify_data)
    if args.no_verify_data and not data.synthetic:
        print(f"warning: md5 checksums of {data.path} not verified (--no-verify-data)", file=sys.stderr)
    return data


def exec_options(args):
    from rethink.train import ExecOptions

    return ExecOptions(
        device=args.device,
        amp=args.amp,
        compile=args.compile,
        onednn=False if getattr(args, "no_onednn", False) else None,
        checkpoint_minutes=args.checkpoint_minutes,
        log=lambda msg: print(msg, flush=True),
    )


# ---------------------------------------------------------------------------------------------- commands


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
    from rethink.data import write_synthetic

    root = write_synthetic(args.out, args.train, args.test, args.seed)
    print(f"wrote a SYNTHETIC data set (not CIFAR-10) in the official format: {root} "
          f"({args.train} train / {args.test} test images, seed {args.seed})")  # fmt: skip
    return 0


def cmd_data_push(args) -> int:
    from rethink.datastore import push
    from rethink.store import open_store

    if args.synthetic:
        print("synthetic data: nothing to push (every pod generates the same deterministic synthetic set itself)")
        return 0
    push(open_store(args.store), args.data_dir)
    return 0


def spec_from_args(args, dataset: str):
    from rethink.spec import RunSpec

    if args.spec:
        try:
            text = Path(args.spec).read_text()
        except OSError as e:
            raise UserError(f"cannot read spec file {args.spec}: {e.strerror}") from None
        return RunSpec.from_json(text)
    return RunSpec(
        model=args.model,
        labels=args.labels,
        pixels=args.pixels,
        weight_decay=args.weight_decay,
        random_crop=args.random_crop,
        dropout=args.dropout,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=100 if args.epochs is None else args.epochs,
        target_train_acc=args.target_acc,
        seed=args.seed,
        dataset=dataset,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
    )


def cmd_train(args) -> int:
    from rethink.store import open_store
    from rethink.train import read_result, train_run

    if args.pack_index is not None or args.pack != 1:
        return _train_pack(args)
    if args.suite is not None or args.index is not None:
        if args.suite is None or args.index is None:
            raise UserError("--suite and --index go together: rethink train --suite S --index I")
        specs = suite_specs(args, selected=False)  # the index is into the whole suite, as pods count
        if not 0 <= args.index < len(specs):
            raise UserError(f"--index {args.index} is out of range: suite {args.suite} has {len(specs)} runs")
        spec = specs[args.index]
    elif not args.spec and not args.model:
        raise UserError("rethink train needs --model M, --spec FILE or --suite S --index I; see rethink train --help")
    else:
        spec = spec_from_args(args, dataset_of(args))
    store = open_store(args.store)
    print(f"run {spec.run_id}: {spec.label()} -> {store.where('runs/' + spec.run_id)}", flush=True)
    if read_result(store, spec.run_id) is not None:  # finished: no need to load (or download) any data
        print(f"run {spec.run_id} is already finished: {store.where(f'runs/{spec.run_id}/result.json')}")
        return 0
    data = load_data(args)
    train_run(spec, store, data, exec_options(args))
    return 0


def _train_pack(args) -> int:
    """`rethink train --suite S --pack K --pack-index J`: one pack of a suite, as a cluster pod trains it."""
    from rethink.pack import suite_pack, train_pack
    from rethink.store import open_store
    from rethink.train import read_result

    if args.suite is None or args.pack_index is None or args.index is not None:
        raise UserError("--pack goes with --suite S --pack-index J (not --index): rethink train --suite S --pack K "
                        "--pack-index J; see rethink plan --suite S --pack K")  # fmt: skip
    pack = suite_pack(suite_specs(args, selected=False), args.pack, args.pack_index)
    store = open_store(args.store)
    todo = [s for s in pack if read_result(store, s.run_id) is None]
    print(f"pack {args.pack_index}: {len(pack)} {pack[0].model} runs, {len(pack) - len(todo)} already finished -> "
          f"{store.where('runs')}", flush=True)  # fmt: skip
    if todo:  # a finished pack needs no data
        train_pack(pack, store, load_data(args), exec_options(args))
    return 0


def add_suite_options(p: argparse.ArgumentParser, required: bool = True, selectable: bool = True) -> None:
    p.add_argument("--suite", required=required, default=None,
                   help="suite name (see rethink suites)" + ("" if required else "; default: every finished run in the store"))
    p.add_argument("--seeds", type=int, default=1, help="repeat the suite over this many seeds (0..K-1)")
    p.add_argument("--epochs", type=int, default=None,
                   help="cap every run at this many epochs (default: the per-model caps, 100 epochs each; "
                        "smoke: 2)")  # fmt: skip
    p.add_argument("--smoke", action="store_true",
                   help="size any suite like the smoke suite: 256 train / 256 test images, 2 epochs unless --epochs")  # fmt: skip
    p.add_argument("--stop-at-acc", type=_fraction, default=None, metavar="ACC",
                   help="stop each run at the first epoch end with training accuracy >= ACC (e.g. 1.0), for little "
                        "compute: other runs than the paper's (their accuracies are not after convergence); "
                        "default: every run trains to its epoch cap")  # fmt: skip
    if selectable:
        p.add_argument("--models", default=None, metavar="M[,M...]",
                       help="only the runs of these models, e.g. mlp-1x512,mlp-3x512 (the MLP part of a suite, for a "
                            "CPU); default: all models")  # fmt: skip
        p.add_argument("--labels", dest="select_labels", default=None, metavar="L[,L...]",
                       help="only runs with these label modes: true, random, partial (any p) or partial:P; "
                            "default: all")  # fmt: skip
        p.add_argument("--pixels", dest="select_pixels", default=None, metavar="P[,P...]",
                       help="only runs with these pixel modes: none, shuffled, random, gaussian; default: all")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overfit-threshold", type=_fraction, default=None, metavar="ACC",
                   help="Figure 1b's time to overfit: the first epoch end with training accuracy >= ACC "
                        "(default: 0.99, a level every run of the paper's Table 1 reaches)")  # fmt: skip


def suite_options(args):
    from rethink.suites import Options

    return Options(dataset=dataset_of(args), seeds=args.seeds, epochs=args.epochs, smoke=getattr(args, "smoke", False),
                   target_acc=getattr(args, "stop_at_acc", None))  # fmt: skip


def selection_of(args):
    """The part of the suite --models/--labels/--pixels select (None: all of it)."""
    from rethink.suites import Selection

    def values(name):
        text = getattr(args, name, None)
        return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())

    s = Selection(models=values("models"), labels=values("select_labels"), pixels=values("select_pixels"))
    return None if s.everything else s


def suite_specs(args, selected: bool = True):
    """The suite's runs; with `selected`, only those --models/--labels/--pixels select."""
    from rethink.suites import expand, select

    specs = expand(args.suite, suite_options(args))
    return select(specs, selection_of(args)) if selected else specs


def cmd_suites(args) -> int:
    from rethink.suites import SUITES, Options, estimate_seconds, expand

    print(f"{'suite':<14}{'runs':>6}{'GPU h (est.)':>14}{'CPU h (est.)':>14}  description")
    for name, suite in SUITES.items():
        specs = expand(name, Options(seeds=args.seeds))
        gpu, cpu = estimate_seconds(specs, "gpu") / 3600, estimate_seconds(specs, "cpu") / 3600
        note = "" if suite.in_full or name == "full" else " [not in full]"
        print(f"{name:<14}{len(specs):>6}{gpu:>14.2f}{cpu:>14.2f}  {suite.description}{note}")
    print("\nestimates: every run to its epoch cap (the paper's protocol; --stop-at-acc finishes sooner); "
          "GPU: one H100, float32 targets until measured; CPU: this project's 2-core machine (docs/performance.md)")
    print("not training suites, so not listed (own cost and hardware): `rethink expressivity` (Section 4, CPU, "
          "seconds) and `rethink kernel` (Section 5, a 50k x 50k kernel solve: a large GPU for the full set)")  # fmt: skip
    return 0


def cmd_plan(args) -> int:
    everything = suite_specs(args, selected=False)
    selection = selection_of(args)
    if args.pack is not None:
        if selection is not None:
            raise UserError("plan --pack lists the packs pods train, of the whole suite: drop --models/--labels/"
                            "--pixels (rethink run --pack K takes them)")  # fmt: skip
        return _plan_packs(args, everything)
    # Indices stay those of the whole suite: `rethink train --suite S --index I` trains row I.
    rows = [(i, s) for i, s in enumerate(everything) if selection is None or s in selection]
    if args.json:
        print(json.dumps([{"index": i, "run_id": s.run_id, "model": s.model, "labels": s.labels,
                           "pixels": s.pixels, "tags": list(s.tags), "spec": s.to_dict()} for i, s in rows],
                         indent=2))  # fmt: skip
        return 0
    print(f"{'#':>4}  {'run id':<12}  {'tags':<26} run")
    for i, s in rows:
        print(f"{i:>4}  {s.run_id:<12}  {','.join(s.tags)[:26]:<26} {s.label()} (<= {s.epochs} epochs)")
    print(f"{len(rows)} runs" + ("" if selection is None else f" of {len(everything)} ({selection.describe()})"))
    return 0


def _plan_packs(args, specs) -> int:
    """The packs `rethink train --suite S --pack K --pack-index J` trains, J = 0, 1, ..."""
    from rethink.pack import group_packs

    packs = group_packs(specs, args.pack)
    index = {s.run_id: i for i, s in enumerate(specs)}
    if args.json:
        rows = [{"pack_index": j, "size": len(p), "model": p[0].model, "epochs": p[0].epochs,
                 "run_ids": [s.run_id for s in p], "indices": [index[s.run_id] for s in p]}
                for j, p in enumerate(packs)]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'pack':>4}  {'runs':>4}  {'model':<16} run ids")
    for j, p in enumerate(packs):
        print(f"{j:>4}  {len(p):>4}  {p[0].model:<16} {' '.join(s.run_id for s in p)}")
    print(f"{len(packs)} packs of <= {args.pack} runs ({len(specs)} runs)")
    return 0


def cmd_status(args) -> int:
    from rethink.runner import run_state
    from rethink.store import open_store

    store = open_store(args.store)
    counts: dict[str, int] = {}
    for s in suite_specs(args):
        state, detail = run_state(store, s)
        counts[state] = counts.get(state, 0) + 1
        print(f"{s.run_id}  {state:<12} {s.label():<48} {detail}")
    print(", ".join(f"{n} {state}" for state, n in counts.items()) + f" ({store.where()})")
    return 0


def _size(text: str) -> int:
    """'16M', '16MiB', '500k', '1G' or a number of bytes."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?B)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 16M or 500k, got {text!r}")
    return int(float(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()])


def cmd_export(args) -> int:
    from rethink.records import export, finished_run_ids
    from rethink.store import open_store

    store = open_store(args.store)
    partial = []
    if args.suite is None:
        if selection_of(args) is not None:
            raise UserError("--models/--labels/--pixels select part of a suite: give --suite S too")
        ids = finished_run_ids(store)
    else:
        from rethink.runner import run_state

        specs = suite_specs(args)
        states = {s.run_id: run_state(store, s)[0] for s in specs}
        ids = [s.run_id for s in specs if states[s.run_id] == "finished"]
        partial = [s.run_id for s in specs if states[s.run_id] == "partial"] if args.partial_checkpoints else []
    if args.exclude_store:
        from rethink.records import finished_run_ids as done

        already = set(done(open_store(args.exclude_store)))
        ids = [i for i in ids if i not in already]
    export(store, args.out, ids, partial, max_bytes=args.max_size)
    return 0


def cmd_import(args) -> int:
    from rethink.records import import_archive
    from rethink.store import open_store

    import_archive(args.archive, open_store(args.store), with_checkpoints=args.with_checkpoints)
    return 0


def duration(text: str) -> float:
    """Seconds in '90s', '9m', '1h30m', '2h', '1.5h'."""
    import re

    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text.strip().lower())
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", text.strip().lower()).strip():
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 9m or 1h30m, got {text!r}")
    seconds = sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"the time budget must be positive, got {text!r}")
    return seconds


def cmd_run(args) -> int:
    import time

    from rethink.runner import DataSource, run_specs

    opts = exec_options(args)
    if args.time_budget is not None:
        opts.deadline = opts.clock() + args.time_budget  # counted from the command's start
    specs = suite_specs(args)
    source = DataSource(str(data_dir_of(args)), verify=not args.no_verify_data)
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
        _aggregate(args)
    if failures:
        print(f"rethink: {len(failures)} of {len(specs)} runs failed:", file=sys.stderr)
        for rid, message in failures.items():
            print(f"  {rid}: {message}", file=sys.stderr)
        return 1
    return 0


def _aggregate(args) -> None:
    from rethink.report import aggregate
    from rethink.store import open_store
    from rethink.suites import OVERFIT_THRESHOLD

    threshold = getattr(args, "overfit_threshold", None) or OVERFIT_THRESHOLD
    written = aggregate(open_store(args.store), args.suite, suite_options(args), log=lambda m: print(m, flush=True),
                        overfit_threshold=threshold, selection=selection_of(args))  # fmt: skip
    for key in written:
        if key.endswith("report.html"):
            print(f"report: {open_store(args.store).where(key)}")


def cmd_aggregate(args) -> int:
    _aggregate(args)
    return 0


def cmd_expressivity(args) -> int:
    from rethink.expressivity import run_and_report

    return run_and_report(load_data(args), args)


def cmd_kernel(args) -> int:
    from rethink.kernel import run_and_report

    return run_and_report(load_data(args), args)


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from rethink import __version__
    from rethink.corruptions import PIXEL_MODES
    from rethink.models import MODELS

    parser = _Parser(
        prog="rethink",
        description="Reproduce the CIFAR-10 experiments of Zhang et al. 2017, "
        "'Understanding Deep Learning Requires Rethinking Generalization'.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"rethink {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _parser(sub, "models", "list the paper's models and their parameter counts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = _parser(sub, "data", "data set utilities")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    p.set_defaults(func=lambda a, p=p: (p.print_help(), 2)[1])
    s = _parser(dsub, "synth", "write a synthetic data set in the official CIFAR-10 on-disk format")
    s.add_argument("--out", required=True, help="output directory (cifar-10-batches-py/ is created inside)")
    s.add_argument("--train", type=int, default=50_000, help="number of training images")
    s.add_argument("--test", type=int, default=10_000, help="number of test images")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.set_defaults(func=cmd_data_synth)
    s = _parser(dsub, "push", "put the md5-verified CIFAR-10 archive into the store once (data/cifar-10-python.tar.gz), "
                "where pods with an empty --data-dir fetch it from; skipped when it is there already")
    s.add_argument("--store", required=True, help="the store pods use: a directory, file://PATH or s3://bucket/prefix")
    s.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="take cifar-10-python.tar.gz from here when it is there, else download it here")
    s.add_argument("--synthetic", action="store_true", help="a no-op: pods generate the synthetic set themselves")
    s.set_defaults(func=cmd_data_push)

    p = _parser(sub, "train", "train one run (resuming it from the store when it was started before)")
    p.add_argument("--model", choices=MODELS, default=None, help="model to train (required unless --spec)")
    p.add_argument("--labels", default="true", help="true, random or partial:P (corruption probability P)")
    p.add_argument("--pixels", default="none", choices=PIXEL_MODES, help="pixel corruption")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay coefficient (paper runs: 5e-4)")
    p.add_argument("--random-crop", action="store_true", help="random 28x28 crops instead of the central crop")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability before fully connected layers")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: 0.1 Inception, 0.01 others)")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size")
    p.add_argument("--epochs", type=int, default=None, help="maximum number of epochs (default: 100; with --suite: "
                   "the suite's caps)")
    p.add_argument("--target-acc", type=float, default=None,
                   help="stop once training accuracy reaches this (e.g. 1.0); default: train all epochs")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization, data order and corruption")
    p.add_argument("--train-subset", type=int, default=None,
                   help="use only the first N training images; default: all training images")
    p.add_argument("--test-subset", type=int, default=None, help="use only the first N test images; default: all test images")
    p.add_argument("--spec", default=None, help="a run spec as a JSON file (overrides the options above); default: the "
                   "run the options above describe")
    p.add_argument("--suite", default=None, help="train run number --index of this suite (as cluster pods do); "
                   "default: the run the options above describe")
    p.add_argument("--index", type=int, default=None,
                   help="index into the suite's runs (see rethink plan); with --suite: this or --pack-index is required")
    p.add_argument("--seeds", type=int, default=1, help="with --suite: the suite's number of seeds")
    p.add_argument("--smoke", action="store_true", help="with --suite: the suite in smoke sizing (see rethink run)")
    p.add_argument("--pack", type=int, default=1, help="with --suite and --pack-index: the suite's pack size K")
    p.add_argument("--pack-index", type=int, default=None,
                   help="train pack number J of the suite's packs of --pack K runs together (see rethink plan --pack); "
                        "with --suite and --pack: this or --index is required")
    add_data_options(p)
    add_exec_options(p)
    p.set_defaults(func=cmd_train)

    p = _parser(sub, "suites", "list the suites with run counts and estimated cost")
    p.add_argument("--seeds", type=int, default=1, help="count runs for this many seeds")
    p.set_defaults(func=cmd_suites)

    p = _parser(sub, "plan", "list the runs of a suite")
    add_suite_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of runs (index, run_id, model, labels, "
                   "pixels, tags, spec); with --pack: of packs (pack_index, size, model, epochs, run_ids, indices)")
    p.add_argument("--pack", type=int, default=None, help="list the packs of up to K runs trained together (rethink "
                   "run/train --pack K); default: list runs")
    add_data_options(p)
    p.set_defaults(func=cmd_plan)

    p = _parser(sub, "run", "train every unfinished run of a suite, then aggregate its report")
    add_suite_options(p)
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    p.add_argument("--no-aggregate", action="store_true", help="skip rendering the report at the end")
    p.add_argument("--time-budget", type=duration, default=None, metavar="DURATION",
                   help="e.g. 9m or 1h30m: start no run after it; at it, checkpoint the running ones and exit "
                        "cleanly (0) with a summary; the same command later resumes them; default: no limit")  # fmt: skip
    add_report_options(p)
    p.add_argument("--pack", type=int, default=1, help="train up to K compatible runs together as one batched model "
                   "(same model and schedule; see docs/performance.md); 1: each run alone")
    add_data_options(p)
    add_exec_options(p)
    p.set_defaults(func=cmd_run)

    p = _parser(sub, "status", "show each run of a suite as finished, partial, failed or not started")
    add_suite_options(p)
    p.add_argument("--store", default="./runs", help="where runs live: a directory, file://PATH or s3://bucket/prefix")
    add_data_options(p)
    p.set_defaults(func=cmd_status)

    p = _parser(sub, "export", "write the records of finished runs (spec, metrics, result; no checkpoints) into "
                "one .tar.gz with a manifest, to import into another store (rethink import)")
    add_suite_options(p, required=False)
    p.add_argument("--store", default="./runs", help="where runs live: a directory, file://PATH or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="the archive to write (.tar.gz)")
    p.add_argument("--exclude-store", default=None,
                   help="leave out runs already finished in this store (e.g. results); default: export all")
    p.add_argument("--partial-checkpoints", action="store_true",
                   help="with --suite: also the checkpoints of the suite's partial runs, while they fit --max-size, "
                        "so another machine can resume them (default: records of finished runs only)")  # fmt: skip
    p.add_argument("--max-size", type=_size, default=None,
                   help="refuse to write records larger than this (e.g. 16M); partial checkpoints beyond it are left "
                        "out; default: no limit")  # fmt: skip
    add_data_options(p)
    p.set_defaults(func=cmd_export)

    p = _parser(sub, "import", "check and add the runs of an archive written by rethink export to a store; refuses "
                "(adding nothing) a record whose spec does not hash to its run id or that differs from one there")
    p.add_argument("archive", help="the .tar.gz written by rethink export")
    p.add_argument("--store", default="./runs", help="the store to add them to: a directory, file://PATH or s3://...")
    p.add_argument("--with-checkpoints", action="store_true",
                   help="also take the archive's partial runs (their checkpoints), to resume them here; default: "
                        "finished records only (a results store holds no checkpoints)")  # fmt: skip
    p.set_defaults(func=cmd_import)

    p = _parser(sub, "aggregate", "render a suite's figures, tables and report from the runs in the store")
    add_suite_options(p)
    add_report_options(p)
    p.add_argument("--store", default="./runs", help="where runs live: a directory, file://PATH or s3://bucket/prefix")
    add_data_options(p)
    p.set_defaults(func=cmd_aggregate)

    # Section 4 and 5 of the paper: handlers in rethink/expressivity.py and rethink/kernel.py.
    p = _parser(sub, "expressivity", "build Theorem 1's two-layer ReLU network with 2n + d weights that fits n "
                "training images, and report its parameter count, accuracies and conditioning")
    p.add_argument("--n", type=int, default=2000, help="number of training images to fit (the first N)")
    p.add_argument("--labels", choices=("true", "random"), default="random", help="labels to fit")
    p.add_argument("--seed", type=int, default=0, help="seed for the random labels and the projection direction")
    p.add_argument("--bias-position", type=float, default=0.1,
                   help="where each bias sits in the gap between sorted projections (0..1; above 0.5 the weights "
                        "grow geometrically)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--store", default=None,
                   help="also write reports/expressivity/expressivity.{json,md} there; default: only print the report")
    add_data_options(p)
    p.set_defaults(func=cmd_expressivity)

    p = _parser(sub, "kernel", "minimum-norm kernel interpolation K alpha = Y (Gaussian kernel on pixels, or random "
                "convolutional features); report errors and norms beside the paper's")
    p.add_argument("--features", nargs="+", choices=("gaussian", "random-conv"), default=["gaussian", "random-conv"],
                   help="kernels to run (one or both)")
    p.add_argument("--n-train", type=int, default=2000, help="training images (the first N; 50000: all, GPU-sized)")
    p.add_argument("--n-test", type=int, default=1000, help="test images (the first M)")
    p.add_argument("--filters", type=int, default=1024, help="random 5x5x3 filters for random-conv (paper: 32000)")
    p.add_argument("--l2", type=float, nargs="+", default=[0.0], help="l2 regularization strengths, one row each")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="kernel and solve precision")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random filters and the bandwidth sample")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--store", default="./runs", help="where reports/kernel/kernel.{csv,md,png} are written")
    add_data_options(p)
    p.set_defaults(func=cmd_kernel)

    # The speed benchmark: handler in rethink/bench.py (fields of --json in docs/performance.md).
    p = _parser(sub, "bench", "measure training/evaluation throughput, seconds per epoch, FLOPs and utilization "
                "of one model (optionally against the typical DataLoader pipeline)")
    p.add_argument("--model", choices=MODELS, required=True, help="model to measure")
    p.add_argument("--pack", type=int, default=1, help="runs trained together as one batched model")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs); default: torch's default")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the training steps (default: float32)")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size")
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--epochs", type=int, default=0,
                   help="also time this many whole epochs of the real trainer (after one warm-up epoch)")
    p.add_argument("--train-images", type=int, default=None,
                   help="training images (default: enough for the steps, at most 50000; 50000 with --epochs)")
    p.add_argument("--test-images", type=int, default=None,
                   help="test images (default: a fifth of the training images; 10000 with --epochs)")
    p.add_argument("--data-dir", default=None, help="read cifar-10-batches-py/ there; default: random images in memory")
    p.add_argument("--baseline", action="store_true",
                   help="also measure the typical pipeline (PIL transforms, DataLoader, eager fp32) and the ratio")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the --baseline pipeline")
    p.add_argument("--json", action="store_true", help="print the record as JSON (fields: docs/performance.md)")

    def cmd_bench(args) -> int:
        from rethink.bench import run_cli

        return run_cli(args)

    p.set_defaults(func=cmd_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    from rethink.store import StoreError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"rethink: error: {e}", file=sys.stderr)
        return e.exit_code
    except StoreError as e:  # pragma: no cover - StoreError is a UserError; kept for clarity
        print(f"rethink: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("rethink: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        from rethink.train import Preempted

        if isinstance(e, Preempted):
            print(f"rethink: {e}", file=sys.stderr)
            return 143
        raise
