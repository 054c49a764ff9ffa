"""The command line's shared pieces: the parser and help formatter, every option group declared once, and the
functions that turn parsed arguments into typed values (data, execution options, suite options, selection)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from rethink.data.synthetic import DEFAULT_SIZE
from rethink.errors import UserError
from rethink.store import DEFAULT_STORE
from rethink.training.defaults import CHECKPOINT_MINUTES, COMPILE_MODES, LEASE_SECONDS

DEFAULT_DATA_DIR = "./data"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help states its default; a help text that already explains its default keeps its words."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):  # the word, in lower case: not AWS_DEFAULT_REGION
            return action.help
        if action.required:  # a required option has no default to state
            return (action.help or "") + " (required)"
        if action.default is None and "required" in (action.help or ""):  # required in some uses: it says when
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Bad input gives the error and where to look, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nsee '{self.prog} --help'\n")


def subcommand(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


# ---------------------------------------------------------------------------------------------- option groups


def add_store_option(p: argparse.ArgumentParser, default: str | None = DEFAULT_STORE, help: str | None = None) -> None:
    p.add_argument("--store", default=default,
                   help=help or "where runs live: a directory, file://PATH or s3://bucket/prefix")  # fmt: skip


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="directory holding cifar-10-batches-py/ (downloaded there when missing)")
    p.add_argument("--synthetic", action="store_true",
                   help=f"use synthetic data in DATA_DIR/synthetic (created, {DEFAULT_SIZE[0]} train / "
                        f"{DEFAULT_SIZE[1]} test images, when missing) instead of CIFAR-10")
    p.add_argument("--no-verify-data", action="store_true", help="skip the md5 check of the CIFAR-10 files")  # fmt: skip


def add_exec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    add_store_option(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile's mode, with --compile (reduce-overhead: the steps as CUDA graphs, 2.4x "
                        "for Small Inception's step on an H200); default: torch's default mode")  # fmt: skip
    p.add_argument("--no-onednn", action="store_true",
                   help="on the CPU, run fully connected layers through PyTorch's default BLAS instead of oneDNN "
                        "(default: oneDNN unless --compile, ~2x faster on some CPUs; same function up to rounding)")  # fmt: skip

    p.add_argument("--checkpoint-minutes", type=float, default=CHECKPOINT_MINUTES,
                   help="also checkpoint mid-epoch when this many minutes passed since the last checkpoint")  # fmt: skip
    p.add_argument("--keep-checkpoints", choices=("all", "last", "none"), default="last",
                   help="what a finished run keeps: both checkpoints, the last one, or none (its records only; frees "
                        "~19 MB per MLP run, more per Inception run)")  # fmt: skip
    p.add_argument("--lease-seconds", type=float, default=None,
                   help="a run's lease (one writer per run) expires this long after its trainer last renewed it "
                        f"(default: $RETHINK_LEASE_SECONDS, else {LEASE_SECONDS:g}); a successor waits that long for a "
                        "lost one")  # fmt: skip


def add_precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amp", action="store_true",
                   help="runs whose training steps are in bf16 autocast: other runs, with their own ids, than the "
                        "float32 ones (docs/protocol.md); default: float32 (TF32 on CUDA); evaluation is float32 "
                        "either way")  # fmt: skip


def add_suite_options(p: argparse.ArgumentParser, required: bool = True, selectable: bool = True) -> None:
    p.add_argument("--suite", required=required, default=None,
                   help="suite name (see rethink suites)" + ("" if required else "; default: every finished run in the store"))
    add_expansion_options(p)
    if selectable:
        add_selection_options(p)


def add_expansion_options(p: argparse.ArgumentParser) -> None:
    """How a suite becomes runs, declared once: the suite commands, `rethink train` (what pods run) and
    workflows/submit.py take these options, so all of them name the same runs."""
    from rethink.experiments.base import SMOKE  # not rethink.suites: the parser imports no plotting library
    from rethink.spec import EPOCH_CAP

    p.add_argument("--seeds", type=int, default=1, help="repeat the suite over this many seeds (0..K-1)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"cap every run at this many epochs (default: {EPOCH_CAP}; smoke: {SMOKE['epochs']})")
    p.add_argument("--smoke", action="store_true",
                   help=f"size any suite like the smoke suite: {SMOKE['train_subset']} train / {SMOKE['test_subset']} "
                        f"test images, {SMOKE['epochs']} epochs unless --epochs")  # fmt: skip
    p.add_argument("--stop-at-acc", type=fraction, default=None, metavar="ACC",
                   help="stop each run at the first epoch end with training accuracy >= ACC (e.g. 1.0), for little "
                        "compute: other runs than the paper's (their accuracies are not after convergence); "
                        "default: every run trains to its epoch cap")  # fmt: skip
    add_precision_option(p)


def add_selection_options(p: argparse.ArgumentParser) -> None:
    """Part of a suite. Named --only-*: --labels and --pixels are a run's own label and pixel modes (rethink
    train), one meaning each."""
    p.add_argument("--only-models", default=None, metavar="M[,M...]",
                   help="only the runs of these models, e.g. mlp-1x512,mlp-3x512 (the MLP part of a suite, for a "
                        "CPU); default: all models")  # fmt: skip
    p.add_argument("--only-labels", default=None, metavar="L[,L...]",
                   help="only runs with these label modes: true, random, partial (any p) or partial:P; default: all")
    p.add_argument("--only-pixels", default=None, metavar="P[,P...]",
                   help="only runs with these pixel modes: none, shuffled, random, gaussian; default: all")


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def add_report_options(p: argparse.ArgumentParser) -> None:
    from rethink.summary import OVERFIT_THRESHOLD

    p.add_argument("--overfit-threshold", type=fraction, default=None, metavar="ACC",
                   help="Figure 1b's time to overfit: the first epoch end with training accuracy >= ACC "
                        f"(default: {OVERFIT_THRESHOLD}, a level every run of the paper's Table 1 reaches)")  # fmt: skip


def parse_size(text: str) -> int:
    """'16M', '16MiB', '500k', '1G' or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?B)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 16M or 500k, got {text!r}")
    return int(float(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()])


def duration(text: str) -> float:
    """Seconds in '90s', '9m', '1h30m', '2h', '1.5h'."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text.strip().lower())
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", text.strip().lower()).strip():
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 9m or 1h30m, got {text!r}")
    seconds = sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"the time budget must be positive, got {text!r}")
    return seconds


# ---------------------------------------------------------------------------------------------- arguments -> values
# Each command turns its namespace into these values first, once (data_of, suite_of, exec_options, spec_of), and
# hands only them down: nothing below the command reads argparse's namespace.


@dataclass(frozen=True)
class Data:
    """The data the options select: nothing is read, created or fetched until `directory` or `load`."""

    data_dir: Path  # --data-dir
    synthetic: bool = False  # --synthetic: the default synthetic set under data_dir/synthetic
    verify: bool = True  # check the official md5s (--no-verify-data: False)
    store: str | None = None  # the store a pod's empty data dir is filled from (data push)

    @property
    def identity(self) -> str:
        """The data set identity runs record (RunSpec.dataset), without creating or downloading anything."""
        from rethink.data.cifar import dataset_identity
        from rethink.data.synthetic import default_identity

        return default_identity() if self.synthetic else dataset_identity(self.data_dir)

    def other_source(self) -> Data:
        """The same options on the other source (CIFAR-10 <-> the synthetic set)."""
        return dataclasses.replace(self, synthetic=not self.synthetic)

    def directory(self) -> Path:
        """The directory holding the data (creating the default synthetic set, or fetching a pod's archive)."""
        from rethink.data.cifar import DIRNAME, META_FILE
        from rethink.data.synthetic import write_synthetic

        if not self.synthetic:
            from rethink.data.archive import fetch_if_missing
            from rethink.store import open_store

            if self.store and not (self.data_dir / DIRNAME).is_dir():  # a pod's empty data dir: the store's archive
                fetch_if_missing(open_store(self.store), self.data_dir)
            return self.data_dir
        path = self.data_dir / "synthetic"
        if not (path / DIRNAME / META_FILE).exists():
            print(f"creating a synthetic data set in {path} (not CIFAR-10)", file=sys.stderr)
            write_synthetic(path, *DEFAULT_SIZE, seed=0)
        return path

    def load(self, central_crops: bool = False):
        """The data set (cifar.Cifar10); `central_crops`: with the float32 crops one CPU run preprocesses from."""
        return self.loaded(self.read(central_crops))

    def read(self, central_crops: bool = False, alloc=None):
        """`load` without its warning (`loaded` says it): what a loader thread or process runs; `alloc`:
        where the large arrays go (cifar.Alloc, given by data.forked's child; its md5s are then hashed at once)."""
        from rethink.data.cifar import load_cifar10

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_cifar10(self.directory(), verify=self.verify, central_crops=central_crops, alloc=alloc,
                                background=alloc is None)  # fmt: skip

    def loaded(self, data):
        """The data `read` returned, after saying what the user must know about it."""
        if not self.verify and not data.synthetic:
            print(f"warning: md5 checksums of {data.path} not verified (--no-verify-data)", file=sys.stderr)
        return data


def data_of(args) -> Data:
    return Data(Path(args.data_dir), synthetic=getattr(args, "synthetic", False),
                verify=not getattr(args, "no_verify_data", False), store=getattr(args, "store", None))  # fmt: skip


@dataclass(frozen=True)
class SuiteRequest:
    """The suite the options name: its expansion options and the part of it selected."""

    name: str | None
    options: object  # suites.Options
    selection: object | None = None  # suites.Selection; None: all of it

    def specs(self, selected: bool = True) -> list:
        """The suite's runs; with `selected`, only those --only-models/--only-labels/--only-pixels select."""
        from rethink.suites import expand, select

        specs = expand(self.name, self.options)
        return select(specs, self.selection) if selected else specs

    def on(self, data: Data) -> SuiteRequest:
        """The same suite on other data (another data set identity: other runs)."""
        return dataclasses.replace(self, options=dataclasses.replace(self.options, dataset=data.identity))


def suite_of(args, data: Data) -> SuiteRequest:
    # experiments.base, not rethink.suites: starting a run needs no catalogue (and its plotting libraries)
    from rethink.experiments.base import Options, Selection

    def values(name):
        text = getattr(args, name, None)
        return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())

    options = Options(dataset=data.identity, seeds=getattr(args, "seeds", 1), epochs=getattr(args, "epochs", None),
                      smoke=getattr(args, "smoke", False), target_acc=getattr(args, "stop_at_acc", None),
                      precision=precision_of(args))  # fmt: skip
    s = Selection(models=values("only_models"), labels=values("only_labels"), pixels=values("only_pixels"))
    return SuiteRequest(getattr(args, "suite", None), options, None if s.everything else s)


def precision_of(args) -> str:
    """The runs' precision: bf16 with --amp (commands without the flag: float32)."""
    return "bf16" if getattr(args, "amp", False) else "float32"


def spec_of(args, data: Data):
    """The one run `rethink train --model M ...` (or --spec FILE) describes."""
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
        **({} if args.epochs is None else {"epochs": args.epochs}),  # None: the spec's cap
        target_train_acc=args.stop_at_acc,
        seed=args.seed,
        dataset=data.identity,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        precision=precision_of(args),
    )


def exec_options(args):
    from rethink.training.options import ExecOptions

    return ExecOptions(
        device=args.device,
        compile=args.compile,
        compile_mode=args.compile_mode,
        onednn=False if getattr(args, "no_onednn", False) else None,
        checkpoint_minutes=args.checkpoint_minutes,
        keep_checkpoints=args.keep_checkpoints,
        **({"lease_seconds": args.lease_seconds} if args.lease_seconds is not None else {}),
        log=lambda msg: print(msg, flush=True),
    )
