"""The `rethink` argument parser: one small function per command, the option groups declared once in
cli/options.py. Every option's help states its default; bad input gives the error and where to look."""

from __future__ import annotations

import dataclasses

from rethink.cli import commands
from rethink.cli.options import (
    DEFAULT_DATA_DIR,
    HelpFormatter,
    Parser,
    add_data_options,
    add_exec_options,
    add_expansion_options,
    add_report_options,
    add_store_option,
    add_suite_options,
    duration,
    parse_size,
    subcommand,
)
from rethink.paper import MODELS
from rethink.spec import PIXEL_MODES
from rethink.training.defaults import COMPILE_MODES


def build_parser() -> Parser:
    from rethink import __version__

    parser = Parser(
        prog="rethink",
        description="Reproduce the CIFAR-10 experiments of Zhang et al. 2017, "
        "'Understanding Deep Learning Requires Rethinking Generalization'.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rethink {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_models, _data, _train, _suites, _plan, _run, _status, _export, _import, _aggregate, _expressivity, _kernel, _bench):
        add(sub)
    return parser


def _models(sub) -> None:
    p = subcommand(sub, "models", "list the paper's models and their parameter counts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=commands.cmd_models)


def _data(sub) -> None:
    p = subcommand(sub, "data", "data set utilities")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    p.set_defaults(func=lambda a, p=p: (p.print_help(), 2)[1])
    s = subcommand(dsub, "synth", "write a synthetic data set in the official CIFAR-10 on-disk format")
    s.add_argument("--out", required=True, help="output directory (cifar-10-batches-py/ is created inside)")
    s.add_argument("--train", type=int, default=50_000, help="number of training images")
    s.add_argument("--test", type=int, default=10_000, help="number of test images")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.set_defaults(func=commands.cmd_data_synth)
    s = subcommand(dsub, "push", "put the md5-verified CIFAR-10 archive into the store once (data/cifar-10-python.tar.gz), "
                "where pods with an empty --data-dir fetch it from; skipped when it is there already")
    s.add_argument("--store", required=True, help="the store pods use: a directory, file://PATH or s3://bucket/prefix")
    s.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="take cifar-10-python.tar.gz from here when it is there, else download it here")
    s.add_argument("--synthetic", action="store_true", help="a no-op: pods generate the synthetic set themselves")
    s.set_defaults(func=commands.cmd_data_push)


def _train(sub) -> None:
    from rethink.paper import DEFAULT_LR
    from rethink.spec import RunSpec

    d = {f.name: f.default for f in dataclasses.fields(RunSpec)}  # the spec's defaults, stated once, there
    lrs = " Inception, ".join([f"{DEFAULT_LR['inception']:g}", f"{DEFAULT_LR['alexnet']:g} others"])
    p = subcommand(sub, "train", "train one run (resuming it from the store when it was started before)")
    p.add_argument("--model", choices=MODELS, default=None, help="model to train (required unless --spec)")
    p.add_argument("--labels", default=d["labels"], help="true, random or partial:P (corruption probability P)")
    p.add_argument("--pixels", default=d["pixels"], choices=PIXEL_MODES, help="pixel corruption")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help="L2 weight decay coefficient (paper runs: 5e-4)")
    p.add_argument("--random-crop", action="store_true", help="random 28x28 crops instead of the central crop")
    p.add_argument("--dropout", type=float, default=d["dropout"], help="dropout probability before fully connected layers")
    p.add_argument("--lr", type=float, default=None, help=f"initial learning rate (default: {lrs})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="minibatch size")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed for initialization, data order and corruption")
    p.add_argument("--train-subset", type=int, default=None,
                   help="use only the first N training images; default: all training images")
    p.add_argument("--test-subset", type=int, default=None, help="use only the first N test images; default: all test images")
    p.add_argument("--spec", default=None, help="a run spec as a JSON file (overrides the options above); default: the "
                   "run the options above describe")
    p.add_argument("--suite", default=None, help="train run number --index of this suite (as cluster pods do); "
                   "default: the run the options above describe")
    p.add_argument("--index", type=int, default=None,
                   help="index into the suite's runs (see rethink plan); with --suite: this or --pack-index is required")
    add_expansion_options(p)  # for one run (--epochs, --stop-at-acc, --amp) and for --suite alike
    p.add_argument("--pack", type=int, default=1, help="with --suite and --pack-index: the suite's pack size K")
    p.add_argument("--pack-index", type=int, default=None,
                   help="train pack number J of the suite's packs of --pack K runs together (see rethink plan --pack); "
                        "with --suite and --pack: this or --index is required")
    add_data_options(p)
    add_exec_options(p)
    p.set_defaults(func=commands.cmd_train)


def _suites(sub) -> None:
    p = subcommand(sub, "suites", "list the suites with run counts and estimated cost")
    p.add_argument("--seeds", type=int, default=1, help="count runs for this many seeds")
    p.set_defaults(func=commands.cmd_suites)


def _plan(sub) -> None:
    p = subcommand(sub, "plan", "list the runs of a suite")
    add_suite_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of runs (index, run_id, model, labels, "
                   "pixels, tags, spec); with --pack: of packs (pack_index, size, model, epochs, run_ids, indices)")
    p.add_argument("--pack", type=int, default=None, help="list the packs of up to K runs trained together (rethink "
                   "run/train --pack K); default: list runs")
    add_data_options(p)
    p.set_defaults(func=commands.cmd_plan)


def _run(sub) -> None:
    p = subcommand(sub, "run", "train every unfinished run of a suite, then aggregate its report")
    add_suite_options(p)
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with an equal share of the CPUs this "
                   "process may use as its torch threads (on a CPU, two one-thread jobs give more run-epochs per "
                   "hour than one two-thread run: docs/performance.md)")  # fmt: skip
    p.add_argument("--no-aggregate", action="store_true", help="skip rendering the report at the end")
    p.add_argument("--time-budget", type=duration, default=None, metavar="DURATION",
                   help="e.g. 9m or 1h30m: start no run after it; at it, checkpoint the running ones and exit "
                        "cleanly (0) with a summary; the same command later resumes them; default: no limit")  # fmt: skip
    add_report_options(p)
    p.add_argument("--pack", type=int, default=1, help="train up to K compatible runs together as one batched model "
                   "(same model and schedule; see docs/performance.md); 1: each run alone")
    add_data_options(p)
    add_exec_options(p)
    p.set_defaults(func=commands.cmd_run)


def _status(sub) -> None:
    p = subcommand(sub, "status", "show each run of a suite as finished, partial, failed or not started")
    add_suite_options(p)
    add_store_option(p)
    add_data_options(p)
    p.set_defaults(func=commands.cmd_status)


def _export(sub) -> None:
    p = subcommand(sub, "export", "write the records of finished runs (spec, metrics, result; no checkpoints) into "
                "one .tar.gz with a manifest, to import into another store (rethink import)")
    add_suite_options(p, required=False)
    add_store_option(p)
    p.add_argument("--out", required=True, help="the archive to write (.tar.gz)")
    p.add_argument("--exclude-store", default=None,
                   help="leave out runs already finished in this store (e.g. results); default: export all")
    p.add_argument("--partial-checkpoints", action="store_true",
                   help="with --suite: also the checkpoints of the suite's partial runs, while they fit --max-size, "
                        "so another machine can resume them (default: records of finished runs only)")  # fmt: skip
    p.add_argument("--max-size", type=parse_size, default=None,
                   help="refuse to write records larger than this (e.g. 16M); partial checkpoints beyond it are left "
                        "out; default: no limit")  # fmt: skip
    add_data_options(p)
    p.set_defaults(func=commands.cmd_export)


def _import(sub) -> None:
    p = subcommand(sub, "import", "check and add the runs of an archive written by rethink export to a store; refuses "
                "(adding nothing) a record whose spec does not hash to its run id or that differs from one there")
    p.add_argument("archive", help="the .tar.gz written by rethink export")
    add_store_option(p, help="the store to add them to: a directory, file://PATH or s3://bucket/prefix")
    p.add_argument("--with-checkpoints", action="store_true",
                   help="also take the archive's partial runs (their checkpoints), to resume them here; default: "
                        "finished records only (a results store holds no checkpoints)")  # fmt: skip
    p.set_defaults(func=commands.cmd_import)


def _aggregate(sub) -> None:
    p = subcommand(sub, "aggregate", "render a suite's figures, tables and report from the runs in the store")
    add_suite_options(p)
    add_report_options(p)
    add_store_option(p)
    add_data_options(p)
    p.set_defaults(func=commands.cmd_aggregate)



def _expressivity(sub) -> None:
    p = subcommand(sub, "expressivity", "build Theorem 1's two-layer ReLU network with 2n + d weights that fits n "
                "training images, and report its parameter count, accuracies and conditioning")
    p.add_argument("--n", type=int, default=2000, help="number of training images to fit (the first N)")
    p.add_argument("--labels", choices=("true", "random"), default="random", help="labels to fit")
    p.add_argument("--seed", type=int, default=0, help="seed for the random labels and the projection direction")
    p.add_argument("--bias-position", type=float, default=0.1,
                   help="where each bias sits in the gap between sorted projections (0..1; above 0.5 the weights "
                        "grow geometrically)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_store_option(p, default=None,
                     help="also write reports/expressivity/expressivity.{json,md} there; default: only print the report")
    add_data_options(p)
    p.set_defaults(func=commands.cmd_expressivity)


def _kernel(sub) -> None:
    p = subcommand(sub, "kernel", "minimum-norm kernel interpolation K alpha = Y (Gaussian kernel on pixels, or random "
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
    add_store_option(p, help="where reports/kernel/kernel.{csv,md,png} are written")
    add_data_options(p)
    p.set_defaults(func=commands.cmd_kernel)



def _bench(sub) -> None:
    p = subcommand(sub, "bench", "measure training/evaluation throughput, seconds per epoch, FLOPs and utilization "
                "of one model (optionally against the typical DataLoader pipeline)")
    p.add_argument("--model", choices=MODELS, required=True, help="model to measure")
    p.add_argument("--pack", type=int, default=1, help="runs trained together as one batched model")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
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
    p.add_argument("--reference", action="store_true",
                   help="also measure the reference model in the same run (the layers as models.py writes them, "
                        "contiguous memory, evaluation batches of 1000: the CPU path before the fast layers) and "
                        "print the ratio of their epochs")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the record as JSON (fields: docs/performance.md)")

    p.set_defaults(func=commands.cmd_bench)
