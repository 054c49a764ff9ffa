"""What every experiment is built from: the options a suite is expanded with, one run of a suite, and a
component (an experiment's runs and its report section)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rethink.errors import UserError
from rethink.paper import MODELS
from rethink.spec import EPOCH_CAP, RunSpec

# Weight decay, when a run has it on [choice: the paper does not state the coefficient; docs/protocol.md].
WEIGHT_DECAY = 5e-4

# The smoke sizing (the smoke suite, --smoke): every path in minutes on a CPU.
SMOKE = dict(train_subset=256, test_subset=256, epochs=2)


@dataclass(frozen=True)
class Options:
    """What a suite is expanded with: the data set, seeds, the epoch cap, and the smoke-sizing overrides."""

    dataset: str = "cifar10"
    seeds: int = 1
    epochs: int | None = None  # overrides every run's cap (default: EPOCH_CAP)
    train_subset: int | None = None
    test_subset: int | None = None
    smoke: bool = False  # apply the smoke sizing to any suite, as the `smoke` suite does (--smoke)
    target_acc: float | None = None  # stop each run at this training accuracy (--stop-at-acc); None: to the cap
    precision: str = "float32"  # of every run's training steps (--amp: bf16, other runs than the float32 ones)

    @property
    def cap(self) -> int:
        return self.epochs or EPOCH_CAP


def suite_spec(o: Options, seed: int, tag: str, model: str, stop_at_target: bool = True, **kw) -> RunSpec:
    """One run of a suite; it stops early only when the user asked for it (o.target_acc) and `stop_at_target`."""
    return RunSpec(
        model=model,
        epochs=o.cap,
        target_train_acc=o.target_acc if stop_at_target else None,
        seed=seed,
        dataset=o.dataset,
        train_subset=o.train_subset,
        test_subset=o.test_subset,
        precision=o.precision,
        tags=(tag,),
        **kw,
    )


@dataclass(frozen=True)
class Component:
    """One figure or table: the runs it needs (a function of the suite's options) and how its report section is
    rendered from them (experiments/kit.py's Context -> Section, or None for no section)."""

    name: str
    runs: Callable[[Options], list[RunSpec]]
    render: Callable | None = None


@dataclass(frozen=True)
class Selection:
    """Part of a suite: only runs of these models, label modes and pixel modes (None: all). Run ids do not change:
    a selected run is the same run as in the whole suite."""

    models: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None  # true, random, partial (any p) or partial:P
    pixels: tuple[str, ...] | None = None

    def __post_init__(self):
        from rethink.spec import PIXEL_MODES

        for name, allowed in (("models", MODELS), ("pixels", PIXEL_MODES)):
            bad = [v for v in getattr(self, name) or () if v not in allowed]
            if bad:
                raise UserError(f"--only-{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        for v in self.labels or ():
            if v not in ("true", "random", "partial") and not v.startswith("partial:"):
                raise UserError(f"--only-labels: unknown {v!r}; use true, random, partial or partial:P")

    @property
    def everything(self) -> bool:
        return self.models is None and self.labels is None and self.pixels is None

    def __contains__(self, spec: RunSpec) -> bool:
        labels_ok = self.labels is None or spec.labels in self.labels or (
            "partial" in self.labels and spec.labels.startswith("partial:"))  # fmt: skip
        return ((self.models is None or spec.model in self.models) and labels_ok
                and (self.pixels is None or spec.pixels in self.pixels))  # fmt: skip

    def describe(self) -> str:
        parts = [f"--only-{k} {','.join(v)}" for k, v in (("models", self.models), ("labels", self.labels),
                                                        ("pixels", self.pixels)) if v is not None]  # fmt: skip
        return " ".join(parts) or "everything"


def select(specs: list[RunSpec], selection: Selection | None) -> list[RunSpec]:
    """The specs in `selection`, in their order."""
    return specs if selection is None or selection.everything else [s for s in specs if s in selection]
