"""What training a list of runs costs, from measured or target epoch times (torch-free: the catalogue, the
report and the workflow summary use it)."""

from __future__ import annotations

from rethink.spec import RunSpec

# Seconds per 50,000-image epoch (training + full evaluation) by model. GPU: the speed work's targets on one
# H100 until `bench/gpu.sh` measures them (docs/performance.md); CPU: `rethink bench` on the 2-core development
# machine (docs/performance.md): the MLPs 2026-11-27 on two threads, Small AlexNet's fast path 2026-12-03 on two
# threads, Small Inception 2026-11-27 on one thread.
EPOCH_SECONDS = {
    "gpu": {"inception": 0.5, "inception-nobn": 0.45, "alexnet": 0.15, "mlp-1x512": 0.05, "mlp-3x512": 0.06},
    "cpu": {"inception": 858.0, "inception-nobn": 692.0, "alexnet": 66.4, "mlp-1x512": 1.2, "mlp-3x512": 2.2},
}
# Where each figure comes from, in the words a report uses.
SOURCE = {"gpu": "a target for one H100, not yet measured", "cpu": "measured on a 2-core CPU"}


def estimate_seconds(specs: list[RunSpec], kind: str = "gpu") -> float:
    """Upper bound of the wall time: every run to its cap, scaled by its subset size."""
    table = EPOCH_SECONDS[kind]
    return sum(table[s.model] * s.epochs * (s.train_subset or 50_000) / 50_000 for s in specs)
