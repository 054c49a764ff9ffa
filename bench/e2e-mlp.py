"""MLP 1x512, 3 epochs on real CIFAR-10, end to end: `rethink train` against the typical DataLoader pipeline
(rethink/perf/baseline.py), each as a whole process from its start to its exit, alternating A B A B after one
warm-up of each; the ratio is taken pair by pair (so a drift of the machine's speed cancels) and its median is
the figure (docs/performance.md).

    python bench/e2e-mlp.py DATA_DIR [--pairs 3] [--epochs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("data_dir", help="the folder holding cifar-10-batches-py/")
    p.add_argument("--pairs", type=int, default=3, help="timed A/B pairs after one warm-up pair")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each process")
    a = p.parse_args()
    store = tempfile.mkdtemp(prefix="rethink-e2e-")
    ours = [sys.executable, "-m", "rethink", "train", "--model", "mlp-1x512", "--epochs", str(a.epochs), "--data-dir",
            a.data_dir, "--no-verify-data", "--device", "cpu", "--store", store]  # fmt: skip
    typical = [sys.executable, "-m", "rethink.perf.baseline", "--model", "mlp-1x512", "--epochs", str(a.epochs),
               "--data-dir", a.data_dir, "--no-verify-data"]  # fmt: skip
    times = []
    try:
        for i in range(a.pairs + 1):
            shutil.rmtree(store, ignore_errors=True)  # every run of ours trains from scratch
            t_ours = wall(ours)
            t_typical = wall(typical)
            if i:  # the first pair is the warm-up (file cache, bytecode)
                times.append((t_ours, t_typical))
                print(f"pair {i}: rethink train {t_ours:.2f} s, typical pipeline {t_typical:.2f} s, "
                      f"ratio {t_typical / t_ours:.2f}x", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(store, ignore_errors=True)
    ours_s, typical_s = [t for t, _ in times], [t for _, t in times]
    ratio = statistics.median(b / o for o, b in times)
    print(f"rethink train: {min(ours_s):.2f} / {statistics.median(ours_s):.2f} / {max(ours_s):.2f} s (min / median / "
          f"max); typical pipeline: {min(typical_s):.2f} / {statistics.median(typical_s):.2f} / {max(typical_s):.2f} s; "
          f"ratio (median of pairs): {ratio:.2f}x")  # fmt: skip
    from rethink.training.options import cpu_capability, cpu_name  # after the timing: torch stays out of it

    print(f"on {cpu_name()}, {cpu_capability()} (docs/performance.md names the CPU of each row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
