"""Mutation check: apply one-line semantic mutations to a copy of the repository; report which CI tests catch each.

Not part of CI (pytest does not collect this file): it runs the chosen test files once per mutation, minutes in
all. Run it from anywhere:

    python tests/mutation_check.py              # every mutation; exit status 0 when every one is caught
    python tests/mutation_check.py -k lr -k md5  # only mutations whose name contains one of these
    python tests/mutation_check.py --list       # the mutations and the tests meant to catch them
    python tests/mutation_check.py --markdown table.md   # also write the result table as markdown

The working tree (tracked files and untracked ones git does not ignore) is copied to a temporary directory.
Each mutation names a file, an exact snippet of it (found exactly once, else the mutation is reported STALE
and counts as a failure: the code moved on and the mutation must be updated), its replacement, and the test
files meant to catch it. Those run in the copy with CI's selection (pyproject's addopts) and the copy's
package first on the path; the copy is restored after each mutation. First the unmutated copy must pass all
of them (the baseline), or no verdict means anything.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str  # an exact snippet, found exactly once in `file`
    replacement: str
    tests: tuple[str, ...]  # test files (or node ids) meant to catch it
    what: str = ""


MUTATIONS = [
    Mutation("table1-paper-number", "rethink/paper.py",
             '("alexnet", True, False, "true", 99.82, 79.66),', '("alexnet", True, False, "true", 99.82, 76.96),',
             ("tests/test_paper.py", "tests/report/test_aggregate.py", "tests/test_suites.py"),
             "a Table 1 test accuracy of the paper typed wrong (79.66 -> 76.96)"),
    Mutation("md5-hex-digit", "rethink/data/cifar.py",
             '"data_batch_1": "c99cafc152244af753f735de768cd75f",', '"data_batch_1": "c99cafc152244af753f735de768cd75e",',
             ("tests/test_paper.py", "tests/data/test_cifar.py", "tests/cli/test_cli.py"),
             "one hex digit of a CIFAR-10 file's md5"),
    Mutation("fig1c-from-accuracy", "rethink/experiments/randomization.py",
             'test_err=[1 - r["final_test_acc"] for r in results]', 'test_err=[r["final_test_acc"] for r in results]',
             ("tests/report/test_aggregate.py",), "Figure 1c drawn from test accuracy instead of test error"),
    Mutation("fig1b-ratio-inverted", "rethink/experiments/randomization.py",
             "rel = [[v / base_steps for v in q[\"steps\"]] for q in pts]",
             "rel = [[base_steps / v for v in q[\"steps\"]] for q in pts]",
             ("tests/report/test_aggregate.py",), "Figure 1b's time to overfit relative to true labels, inverted"),
    Mutation("lr-decay-one-epoch-early", "rethink/training/trainer.py",
             "return spec.lr * spec.lr_decay**epoch\n", "return spec.lr * spec.lr_decay ** (epoch + 1)\n",
             ("tests/perf/test_bench.py", "tests/training/test_trainer.py", "tests/training/test_packed.py"),
             "the learning rate decayed once more than the paper's x0.95 per finished epoch"),
    Mutation("shuffled-pixels-test-permutation", "rethink/data/corruptions.py",
             "return shuffle_pixels(train_x, seed), shuffle_pixels(test_x, seed)",
             "return shuffle_pixels(train_x, seed), shuffle_pixels(test_x, seed + 1)",
             ("tests/data/test_corruptions.py",), "test images shuffled by another permutation than the training images"),
    Mutation("unbiased-std", "rethink/data/preprocess.py",
             ".div_(n**0.5)  # population std", ".div_((n - 1) ** 0.5)  # population std",
             ("tests/data/test_cifar.py", "tests/perf/test_bench.py"),
             "per-image standardization with the unbiased (n - 1) std instead of the population std"),
    Mutation("no-rng-restore-on-resume", "rethink/training/loop.py",
             'torch.set_rng_state(saved["torch"].cpu())', "pass",
             ("tests/training/test_trainer.py",), "a mid-epoch resume does not restore the dropout RNG"),
    Mutation("weight-decay-on-biases", "rethink/models.py",
             'names.append(f"{prefix}.weight" if prefix else "weight")',
             'names += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]',
             ("tests/perf/test_bench.py", "tests/test_models.py", "tests/training/test_packed.py"),
             "weight decay on biases as well as kernels"),
    Mutation("label-noise-halved", "rethink/data/corruptions.py",
             "replace = rng.random(len(labels)) < p\n", "replace = rng.random(len(labels)) < p / 2\n",
             ("tests/data/test_corruptions.py",), "partial corruption replaces labels with probability p/2, not p"),
    Mutation("random-crop-offsets-0-to-3", "rethink/data/preprocess.py",
             "torch.randint(0, IMAGE - CROP + 1, (n, 2)", "torch.randint(0, IMAGE - CROP, (n, 2)",
             ("tests/data/test_cifar.py", "tests/perf/test_bench.py"), "random crops never use the last offset (4)"),
    Mutation("central-crop-off-by-one", "rethink/paper.py",
             "BORDER = (IMAGE - CROP) // 2 ", "BORDER = (IMAGE - CROP) // 2 + 1 ",
             ("tests/data/test_cifar.py",), "the central crop one pixel off centre"),
    Mutation("checkpoint-batch-off-by-one", "rethink/training/loop.py",
             "self.save(b + 1, self.before + now - self.t0)\n            self.last = now",
             "self.save(b, self.before + now - self.t0)\n            self.last = now",
             ("tests/training/test_trainer.py",), "a timed mid-epoch checkpoint records one batch fewer than were done"),
    Mutation("no-checkpoint-rotation", "rethink/training/checkpoint.py",
             "if rotate and store.exists(key):", "if False and store.exists(key):",
             ("tests/training/test_trainer.py",), "the previous checkpoint is never kept as checkpoint.prev.pt"),
    Mutation("evaluation-in-train-mode", "rethink/training/loop.py",
             "    model.eval()\n    loss = torch.zeros(", "    model.train()\n    loss = torch.zeros(",
             ("tests/training/test_trainer.py", "tests/training/test_packed.py"),
             "accuracies measured in training mode (batch statistics, dropout on)"),
    Mutation("same-data-order-every-epoch", "rethink/data/device.py",
             "(seed * 1_000_003 + epoch * 7_919 + 12_345)", "(seed * 1_000_003 + 0 * epoch + 12_345)",
             ("tests/training/test_trainer.py", "tests/perf/test_bench.py", "tests/training/test_packed.py"),
             "every epoch draws the same data order and crops"),
    Mutation("momentum-default", "rethink/paper.py",
             "MOMENTUM = 0.9\n", "MOMENTUM = 0.0\n",
             ("tests/test_paper.py", "tests/test_spec.py"), "the default momentum is not the paper's 0.9"),
    Mutation("overfit-threshold", "rethink/summary.py",
             "OVERFIT_THRESHOLD = 0.99\n", "OVERFIT_THRESHOLD = 1.0\n",
             ("tests/test_protocol.py", "tests/report/test_aggregate.py"),
             "Figure 1b's time to overfit read at 100% instead of the protocol's 99% (the help reads the constant)"),
    Mutation("s3-backoff-not-doubling", "rethink/store/s3.py",
             "delay = min(delay * 2, 10.0)", "delay = min(delay * 1.2, 10.0)",
             ("tests/store/test_s3.py",), "S3 retries back off by x1.2 instead of doubling"),
    # Added with issue 23: the report's bookkeeping, the corruptions' invariants, conditional writes, archives.
    Mutation("fig1b-baseline-lowest-p", "rethink/experiments/randomization.py",
             'base = next((q for q in pts if q["p"] == 0.0), None)', 'base = min(pts, key=lambda q: q["p"], default=None)',
             ("tests/report/test_bookkeeping.py",),
             "Figure 1b's baseline is the lowest finished p instead of the true-label run (p = 0)"),
    Mutation("table1-incomplete-ok", "rethink/experiments/table1.py",
             "if done and len(done) == len(specs):", "if done:",
             ("tests/report/test_bookkeeping.py",), "a Table 1 row with fewer finished seeds than specified is 'ok'"),
    Mutation("partial-labels-nine-classes", "rethink/data/corruptions.py",
             "random = rng.integers(0, NUM_CLASSES, size=len(labels))",
             "random = rng.integers(0, NUM_CLASSES - 1, size=len(labels))",
             ("tests/data/test_corruptions.py", "tests/data/test_properties.py"),
             "replaced labels drawn from 9 of the 10 classes"),
    Mutation("s3-unconditional-put", "rethink/store/s3.py",
             'condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}', "condition = {}",
             ("tests/store/test_conditional.py",),
             "the S3 lease's conditional write (If-None-Match / If-Match) dropped; caught without a server"),
    Mutation("import-checksums-skipped", "rethink/store/records.py",
             "changed = sorted(n for n, b in files.items() if _sha256(b) != listed[n])", "changed = []",
             ("tests/store/test_records.py",), "an import does not compare the files with the manifest's checksums"),
    Mutation("random-pixels-with-replacement", "rethink/data/corruptions.py",
             "perms = np.argsort(rng.random((x.shape[0], CROP * CROP)), axis=1)",
             "perms = rng.integers(0, CROP * CROP, (x.shape[0], CROP * CROP))",
             ("tests/data/test_corruptions.py", "tests/data/test_properties.py"),
             "random pixels drawn with replacement: not a permutation of the image's pixels"),
    Mutation("shuffled-permutation-per-set", "rethink/data/corruptions.py",
             "_center(x)[:, :, shuffled_permutation(seed)]", "_center(x)[:, :, shuffled_permutation(seed + len(x))]",
             ("tests/data/test_corruptions.py", "tests/data/test_properties.py"),
             "shuffled pixels: the permutation depends on the set's size, so train and test differ"),
    Mutation("label-noise-too-high", "rethink/data/corruptions.py",
             "replace = rng.random(len(labels)) < p\n", "replace = rng.random(len(labels)) < min(1.0, 1.5 * p)\n",
             ("tests/data/test_corruptions.py", "tests/data/test_properties.py"),
             "partial corruption replaces labels with probability 1.5p"),
    Mutation("test-labels-corrupted", "rethink/data/device.py",
             "    train_y = corrupt_labels(train_y, spec.label_noise, spec.data_seed)\n",
             "    train_y, test_y = (corrupt_labels(y, spec.label_noise, spec.data_seed) for y in (train_y, test_y))\n",
             ("tests/data/test_corruptions.py", "tests/data/test_properties.py"), "label corruption reaches the test labels"),
    Mutation("run-id-counts-tags", "rethink/spec.py",
             'd.pop("tags")\n', 'd["tags"] = sorted(d["tags"])\n',
             ("tests/test_spec.py", "tests/data/test_properties.py"), "a run's id depends on its report tags"),
    Mutation("standardization-no-guard", "rethink/data/preprocess.py",
             "std.clamp_(min=scale / n**0.5)", "std.clamp_(min=1e-12 * scale)",
             ("tests/data/test_cifar.py", "tests/data/test_properties.py"),
             "per-image standardization without TensorFlow's 1/sqrt(N) guard on the std"),
    Mutation("resume-forgets-environment", "rethink/training/checkpoint.py",
             "    return [*segments, {\"from_step\": step, **env}]\n", "    return [{\"from_step\": 0, **env}]\n",
             ("tests/training/test_trainer.py",),
             "a run resumed on another machine keeps only the last environment: its result hides the first"),
    Mutation("forked-arrays-overlap", "rethink/data/forked.py",
             "        offset = self.size\n", "        offset = 0\n",
             ("tests/data/test_forked.py",),
             "the child puts every array at the start of the shared memory file: the parent's arrays overlap"),
]  # fmt: skip


def repository_files(root: Path) -> list[str]:
    """Tracked files and untracked ones git does not ignore (the working tree as CI would see it, edits included)."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode()  # fmt: skip
    return sorted({f for f in out.split("\0") if f and (root / f).is_file()})


def copy_tree(root: Path, dest: Path) -> None:
    for f in repository_files(root):
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, target)


def pytest_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    # No bytecode: a mutated module and its restored original can share size and mtime (second resolution),
    # and a stale .pyc would then run the mutation again.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_pytest(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, list[str], str]:
    """(exit code or None on timeout, failing test ids, output tail) of CI's selection of `tests` in `copy`."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=pytest_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, [], ""
    out = proc.stdout + proc.stderr
    # "FAILED tests/x.py::name[param id] - message": the node id may hold spaces, the message follows " - ".
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, flags=re.MULTILINE)
    return proc.returncode, failed, "\n".join(out.strip().splitlines()[-15:])


def check_import_location(copy: Path) -> None:
    """The copy's package must be the one imported (not the checkout an editable install points at)."""
    probe = "import rethink, sys; sys.stdout.write(rethink.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=tempfile.gettempdir(), env=pytest_env(copy),
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    if not Path(where).resolve().is_relative_to(copy.resolve()):
        sys.exit(f"mutation_check: `import rethink` resolves to {where}, not to the copy in {copy}")


def short(node: str) -> str:
    return node.removeprefix("tests/")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    return (f"{cpu} ({os.cpu_count()} CPUs), Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-k", action="append", default=[], metavar="NAME",
                   help="only mutations whose name contains NAME (repeatable); default: all")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run (default: 1800)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the unmutated run of the selected tests (default: run it first)")  # fmt: skip
    p.add_argument("--markdown", metavar="PATH", help="also write the result table there (default: print only)")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.k or any(k in m.name for k in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.file:22} {m.what}\n{'':34} tests: {' '.join(map(short, m.tests))}")
        return 0
    if not chosen:
        print("mutation_check: no mutation matches", file=sys.stderr)
        return 2

    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="rethink-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        copy_tree(ROOT, copy)
        check_import_location(copy)
        baseline_failures: set[str] = set()
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            print(f"baseline: {' '.join(map(short, tests))} ...", flush=True)
            code, failed, tail = run_pytest(copy, tests, args.timeout * 2)
            if code != 0:
                baseline_failures = set(failed)
                print(f"baseline FAILS (exit {code}): {', '.join(failed) or tail}", flush=True)
        rows = []
        for m in chosen:
            path = copy / m.file
            pristine = path.read_text() if path.exists() else None
            count = pristine.count(m.original) if pristine is not None else 0
            if count != 1:
                verdict = "STALE: snippet not found" if count == 0 else f"STALE: snippet found {count} times"
                rows.append((m, verdict, [], 0.0))
                print(f"{m.name}: {verdict} in {m.file}", flush=True)
                continue
            path.write_text(pristine.replace(m.original, m.replacement))
            t0 = time.monotonic()
            try:
                code, failed, tail = run_pytest(copy, m.tests, args.timeout)
            finally:
                path.write_text(pristine)
            seconds = time.monotonic() - t0
            failed = [f for f in failed if f not in baseline_failures]
            if code is None:
                verdict = "caught (timeout)"
            elif code == 0:
                verdict = "NOT CAUGHT"
            elif failed:
                verdict = "caught"
            elif code == 1:
                verdict = "UNCLEAR: failures also fail unmutated"
            else:
                verdict = f"caught (pytest exit {code}: collection or usage error)"
            rows.append((m, verdict, failed, seconds))
            print(f"{m.name}: {verdict} ({seconds:.0f} s){': ' + ', '.join(map(short, failed)) if failed else ''}",
                  flush=True)  # fmt: skip
            if verdict.startswith("caught (pytest exit"):
                print(tail, flush=True)

    table = [f"Run {started} on {machine()}.", "",
             "| mutation | what | tests run | caught | failing tests |", "|---|---|---|---|---|"]  # fmt: skip
    for m, verdict, failed, _ in rows:
        shown = ", ".join(f"`{short(f)}`" for f in failed[:4]) + (f" (+{len(failed) - 4} more)" if len(failed) > 4 else "")
        table.append(f"| `{m.name}` (`{m.file}`) | {m.what} | {', '.join(short(t) for t in m.tests)} | {verdict} | "
                     f"{shown} |")  # fmt: skip
    print("\n" + "\n".join(table))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(table) + "\n")
    if baseline_failures:
        print(f"\nbaseline failures (ignored above): {', '.join(sorted(baseline_failures))}")
    bad = [m.name for m, verdict, _, _ in rows if not verdict.startswith("caught")]
    if bad:
        print(f"\nnot caught or stale: {', '.join(bad)}")
    return 1 if bad or baseline_failures else 0


if __name__ == "__main__":
    sys.exit(main())
