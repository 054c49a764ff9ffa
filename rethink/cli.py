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
    pass


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
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast (on by default on CUDA only)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0,
                   help="also checkpoint mid-epoch when this many minutes passed since the last checkpoint")  # fmt: skip


def data_dir_of(args) -> Path:
    """The data directory the options select (creating the default synthetic set when asked for)."""
    from rethink.data import DIRNAME, write_synthetic

    base = Path(args.data_dir)
    if not getattr(args, "synthetic", False):
        return base
    path = base / "synthetic"
    if not (path / DIRNAME / "batches.meta").exists():
        print(f"creating a synthetic data set in {path} (not CIFAR-10)", file=sys.stderr)
        write_synthetic(path, *SYNTHETIC_SIZE, seed=0)
    return path


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
        amp=False if args.no_amp else None,
        compile=args.compile,
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
        epochs=args.epochs,
        target_train_acc=args.target_acc,
        seed=args.seed,
        dataset=dataset,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
    )


def cmd_train(args) -> int:
    from rethink.data import dataset_identity
    from rethink.store import open_store
    from rethink.train import train_run

    if not args.spec and not args.model:
        raise UserError("rethink train needs --model M (or --spec FILE); see rethink train --help")
    dataset = dataset_identity(data_dir_of(args))
    spec = spec_from_args(args, dataset)
    store = open_store(args.store)
    print(f"run {spec.run_id}: {spec.label()} -> {store.where('runs/' + spec.run_id)}", flush=True)
    data = load_data(args)
    train_run(spec, store, data, exec_options(args))
    return 0


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from rethink import __version__
    from rethink.corruptions import PIXEL_MODES
    from rethink.models import MODELS

    parser = argparse.ArgumentParser(
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
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    s = _parser(dsub, "synth", "write a synthetic data set in the official CIFAR-10 on-disk format")
    s.add_argument("--out", required=True, help="output directory (cifar-10-batches-py/ is created inside)")
    s.add_argument("--train", type=int, default=50_000, help="number of training images")
    s.add_argument("--test", type=int, default=10_000, help="number of test images")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.set_defaults(func=cmd_data_synth)

    p = _parser(sub, "train", "train one run (resuming it from the store when it was started before)")
    p.add_argument("--model", choices=MODELS, default=None, help="model to train (required unless --spec)")
    p.add_argument("--labels", default="true", help="true, random or partial:P (corruption probability P)")
    p.add_argument("--pixels", default="none", choices=PIXEL_MODES, help="pixel corruption")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay coefficient (paper runs: 5e-4)")
    p.add_argument("--random-crop", action="store_true", help="random 28x28 crops instead of the central crop")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability before fully connected layers")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: 0.1 Inception, 0.01 others)")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size")
    p.add_argument("--epochs", type=int, default=100, help="maximum number of epochs")
    p.add_argument("--target-acc", type=float, default=None,
                   help="stop once training accuracy reaches this (e.g. 1.0); default: train all epochs")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization, data order and corruption")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="use only the first N test images")
    p.add_argument("--spec", default=None, help="a run spec as a JSON file (overrides the options above)")
    add_data_options(p)
    add_exec_options(p)
    p.set_defaults(func=cmd_train)

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
    except Exception as e:
        from rethink.train import Preempted

        if isinstance(e, Preempted):
            print(f"rethink: {e}", file=sys.stderr)
            return 143
        raise
