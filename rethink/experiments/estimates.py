"""What training a list of runs costs, from measured or target epoch times (torch-free: the catalogue, the
report and the workflow summary use it)."""

from __future__ import annotations

from rethink.spec import RunSpec

# Seconds per 50,000-image epoch (training + full evaluation) by model. GPU: the trainer's epoch (compiled,
# float32 with TF32) measured by `bench/gpu.sh` on one H200 on 2026-12-04 for Small Inception and Small AlexNet;
# Small Inception without BN is taken at Small Inception's rate and the MLPs at the speed work's targets, none of
# them measured yet (docs/performance.md). CPU: `rethink bench` on the 2-core development machine
# (docs/performance.md): the MLPs 2026-11-27 on two threads, Small AlexNet's fast path 2026-12-03 on two threads,
# Small Inception 2026-11-27 on one thread; that VM exposed AVX-512. A 2-core VM exposing AVX2 only ran the
# same code 2.5-3x slower (Small AlexNet 179.9 s, 2026-12-04), so the CPU figures say which CPU they are from.
EPOCH_SECONDS = {
    "gpu": {"inception": 4.68, "inception-nobn": 4.68, "alexnet": 1.04, "mlp-1x512": 0.05, "mlp-3x512": 0.06},
    "cpu": {"inception": 858.0, "inception-nobn": 692.0, "alexnet": 66.4, "mlp-1x512": 1.2, "mlp-3x512": 2.2},
}
GPU_MEASURED = frozenset({"inception", "alexnet"})  # the models whose GPU figure is a measurement


def source(kind: str, models=None) -> str:
    """Where the figures for `models` (None: every model) come from, in the words a report uses."""
    if kind == "cpu":
        return "measured on a 2-core AVX-512 CPU"
    models = set(EPOCH_SECONDS["gpu"] if models is None else models)
    if models <= GPU_MEASURED:
        return "measured on one H200"
    if models.isdisjoint(GPU_MEASURED):
        return "a target for one GPU, not yet measured"
    return "partly measured on one H200, partly targets not yet measured"


def estimate_seconds(specs: list[RunSpec], kind: str = "gpu") -> float:
    """Upper bound of the wall time: every run to its cap, scaled by its subset size."""
    table = EPOCH_SECONDS[kind]
    return sum(table[s.model] * s.epochs * (s.train_subset or 50_000) / 50_000 for s in specs)
