"""The experiment catalogue: named suites, each a plain function of options returning run specs.

A suite is a list of components (one per figure or table); each component is a function returning specs
tagged with where they appear. `full` is the deduplicated union: a run shared by several figures (Inception
on true labels appears in Figure 1a, 1b/c and Table 1) is trained once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rethink.errors import UserError
from rethink.models import MODELS
from rethink.periodic import periodic, periodic_smoke
from rethink.regularizers import regularizers
from rethink.spec import RunSpec

# Epoch caps per model [choice]: the paper reports accuracies "after convergence"; with the learning rate x0.95
# per epoch, after 100 epochs it is 0.6% of its start, so later epochs barely move the weights. Every run of a
# paper suite trains to its cap; --stop-at-acc stops earlier, for little compute. Override with --epochs.
EPOCH_CAPS = {m: 100 for m in MODELS}
# Figure 1b's time to overfit [choice]: the first epoch end with training accuracy >= 99%, a level every run of
# the paper's Table 1 reaches (AlexNet and MLP 1x512 on random labels end at 99.82% and 99.34%). Every result
# records 90/95/99/100% (train.ACC_THRESHOLDS); `--overfit-threshold` draws the figure from another.
OVERFIT_THRESHOLD = 0.99
WEIGHT_DECAY = 5e-4  # when a run has weight decay on [choice: the paper does not state the coefficient]
CORRUPTION_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
FIG1A_MODES = (("true", "none"), ("random", "none"), ("true", "shuffled"), ("true", "random"), ("true", "gaussian"))
FIG1BC_MODELS = ("inception", "alexnet", "mlp-1x512")

# Table 1 of the paper (CIFAR-10 rows): model, random crop, weight decay, labels, paper train/test accuracy (%).
TABLE1_ROWS = [
    ("inception", True, True, "true", 100.0, 89.05),
    ("inception", True, False, "true", 100.0, 89.31),
    ("inception", False, True, "true", 100.0, 86.03),
    ("inception", False, False, "true", 100.0, 85.75),
    ("inception", False, False, "random", 100.0, 9.78),
    ("inception-nobn", False, True, "true", 100.0, 83.00),
    ("inception-nobn", False, False, "true", 100.0, 82.00),
    ("inception-nobn", False, False, "random", 100.0, 10.12),
    ("alexnet", True, True, "true", 99.90, 81.22),
    ("alexnet", True, False, "true", 99.82, 79.66),
    ("alexnet", False, True, "true", 100.0, 77.36),
    ("alexnet", False, False, "true", 100.0, 76.07),
    ("alexnet", False, False, "random", 99.82, 9.86),
    ("mlp-3x512", False, True, "true", 100.0, 53.35),
    ("mlp-3x512", False, False, "true", 100.0, 52.39),
    ("mlp-3x512", False, False, "random", 100.0, 10.48),
    ("mlp-1x512", False, True, "true", 99.80, 50.39),
    ("mlp-1x512", False, False, "true", 100.0, 50.51),
    ("mlp-1x512", False, False, "random", 99.34, 10.61),
]


@dataclass(frozen=True)
class Options:
    """What a suite is expanded with: the data set, seeds, caps, and the smoke-sizing overrides."""

    dataset: str = "cifar10"
    seeds: int = 1
    epochs: int | None = None  # overrides every model's cap
    caps: dict = field(default_factory=dict)  # per-model cap overrides
    train_subset: int | None = None
    test_subset: int | None = None
    smoke: bool = False  # apply the smoke sizing (SMOKE) to any suite, as the `smoke` suite does (--smoke)
    target_acc: float | None = None  # stop each run at this training accuracy (--stop-at-acc); None: to the cap

    def cap(self, model: str) -> int:
        return self.epochs or self.caps.get(model) or EPOCH_CAPS[model]


def _spec(o: Options, seed: int, tag: str, model: str, stop_at_target: bool = True, **kw) -> RunSpec:
    """One run of a suite; it stops early only when the user asked for it (o.target_acc) and `stop_at_target`."""
    return RunSpec(
        model=model,
        epochs=o.cap(model),
        target_train_acc=o.target_acc if stop_at_target else None,
        seed=seed,
        dataset=o.dataset,
        train_subset=o.train_subset,
        test_subset=o.test_subset,
        tags=(tag,),
        **kw,
    )


# The core runs share one stopping rule (the cap, or the user's --stop-at-acc), so that the same configuration
# appearing in several figures is one run: Figure 2b's runs are Table 1's Inception rows without regularizers.


def fig1a(o: Options) -> list[RunSpec]:
    """Small Inception under true labels, random labels, shuffled pixels, random pixels, gaussian."""
    return [
        _spec(o, s, "fig1a", "inception", labels=labels, pixels=pixels)
        for s in range(o.seeds)
        for labels, pixels in FIG1A_MODES
    ]


def fig1bc(o: Options) -> list[RunSpec]:
    """Inception, AlexNet, MLP 1x512 at label corruption p in 0..1: time to overfit and test error."""
    out = []
    for s in range(o.seeds):
        for model in FIG1BC_MODELS:
            for p in CORRUPTION_LEVELS:
                labels = "true" if p == 0 else "random" if p == 1 else f"partial:{p:g}"
                out.append(_spec(o, s, "fig1bc", model, labels=labels))
    return out


def table1(o: Options) -> list[RunSpec]:
    """Every CIFAR-10 row of Table 1 (tag 'table1:<row index>')."""
    out = []
    for s in range(o.seeds):
        for i, (model, crop, wd, labels, _, _) in enumerate(TABLE1_ROWS):
            out.append(
                _spec(o, s, f"table1:{i}", model, labels=labels, random_crop=crop,
                      weight_decay=WEIGHT_DECAY if wd else 0.0)
            )  # fmt: skip
    return out


def fig2b(o: Options) -> list[RunSpec]:
    """Learning curves of Small Inception with and without BatchNorm, regularizers off (Table 1's runs)."""
    return [
        _spec(o, s, "fig2b", model)
        for s in range(o.seeds)
        for model in ("inception", "inception-nobn")
    ]


# The quickstart [choice, measured in README.md]: MLP 1x512, the cheapest paper model, on the first QUICK_TRAIN
# training images (all test images) for QUICK_EPOCHS epochs, with the paper's optimizer and schedule. Sized so
# that random labels are fitted within minutes on a laptop CPU; not a paper suite (not in full).
QUICK_MODEL = "mlp-1x512"
QUICK_TRAIN = 10_000
QUICK_EPOCHS = 30
QUICK_MODES = (("true", "none"), ("random", "none"), ("partial:0.5", "none"), ("true", "shuffled"),
               ("true", "gaussian"))  # fmt: skip


def quickstart(o: Options) -> list[RunSpec]:
    """MLP 1x512 on true, random and half-corrupted labels, shuffled pixels and gaussian inputs, small and short."""
    return [
        _spec(o, s, "quickstart", QUICK_MODEL, labels=labels, pixels=pixels).replace(
            epochs=o.epochs or QUICK_EPOCHS, train_subset=o.train_subset or QUICK_TRAIN
        )
        for s in range(o.seeds)
        for labels, pixels in QUICK_MODES
    ]


COMPONENTS: dict[str, Callable[[Options], list[RunSpec]]] = {
    "quickstart": quickstart,
    "fig1a": fig1a,
    "fig1bc": fig1bc,
    "table1": table1,
    "fig2b": fig2b,
    "regularizers": regularizers,
    "periodic": periodic,
    "periodic-smoke": periodic_smoke,
}
PAPER_COMPONENTS = ["fig1a", "fig1bc", "table1", "fig2b"]


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    components: tuple[str, ...]
    smoke: bool = False  # tiny subset and two epochs: exercises every path in minutes on a CPU
    in_full: bool = True


SMOKE = dict(train_subset=256, test_subset=256, epochs=2)

SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite("quickstart", "the paper's claim in minutes: MLP 1x512 fits random labels while its test accuracy "
              "stays at chance (10k training images, 30 epochs)", ("quickstart",), in_full=False),
        Suite("fig1a", "Figure 1a: training loss of Small Inception under the five randomization tests", ("fig1a",)),
        Suite("fig1bc", "Figure 1b/c: time to overfit and test error against label corruption", ("fig1bc",)),
        Suite("table1", "Table 1: train/test accuracy with and without random crop and weight decay", ("table1",)),
        Suite("fig2b", "Figure 2b: learning curves of Small Inception with and without BatchNorm", ("fig2b",)),
        Suite("regularizers", "weight decay, random crop, dropout, all three or none; true and random labels "
              "(Inception, AlexNet, MLP 1x512)", ("regularizers",)),
        Suite("full", "everything above, each shared run trained once", (*PAPER_COMPONENTS, "regularizers")),
        Suite("smoke", "every figure and table path on a 256-image subset for 2 epochs (minutes on a CPU)",
              tuple(PAPER_COMPONENTS), smoke=True),
        Suite("periodic", "Lobacheva et al.: BatchNorm + weight decay at a constant lr, 1000 epochs; separate from "
              "full because of its cost", ("periodic",), in_full=False),
        Suite("periodic-smoke", "periodic on 128 images with a 10^4x larger lr*wd: destabilizations in minutes on a "
              "CPU", ("periodic-smoke",), in_full=False),
    ]
}  # fmt: skip


def register(component: str, build: Callable[[Options], list[RunSpec]], suite: Suite) -> None:
    """Add a component and its suite (used by modules that define further experiments)."""
    COMPONENTS[component] = build
    SUITES[suite.name] = suite


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}: choose one of {', '.join(SUITES)} (see rethink suites)")
    return SUITES[name]


def options_for(suite: Suite, o: Options) -> Options:
    if suite.smoke or o.smoke:
        return Options(dataset=o.dataset, seeds=o.seeds, epochs=o.epochs or SMOKE["epochs"], caps=o.caps,
                       train_subset=o.train_subset or SMOKE["train_subset"],
                       test_subset=o.test_subset or SMOKE["test_subset"], smoke=True,
                       target_acc=o.target_acc)  # fmt: skip
    return o


def components(name: str, o: Options) -> dict[str, list[RunSpec]]:
    """The suite's specs per component (figure/table), before deduplication."""
    suite = get_suite(name)
    o = options_for(suite, o)
    return {c: COMPONENTS[c](o) for c in suite.components}


def expand(name: str, o: Options | None = None) -> list[RunSpec]:
    """The suite's runs, deduplicated by run id (first occurrence kept, tags merged), in a stable order."""
    o = o or Options()
    if o.seeds < 1:
        raise UserError("--seeds must be at least 1")
    merged: dict[str, RunSpec] = {}
    for specs in components(name, o).values():
        for spec in specs:
            if spec.run_id in merged:
                old = merged[spec.run_id]
                merged[spec.run_id] = old.replace(tags=tuple(dict.fromkeys(old.tags + spec.tags)))
            else:
                merged[spec.run_id] = spec
    return list(merged.values())


# Estimated seconds per 50,000-image epoch (training + full evaluation) by model. GPU: the targets of the speed
# work on one H100 in bf16 until `rethink bench` measures them (docs/performance.md); CPU: `rethink bench` on the
# 2-core development machine, 2026-11-27 (docs/performance.md: Inception on one thread, the others on two).
EPOCH_SECONDS = {
    "gpu": {"inception": 0.5, "inception-nobn": 0.45, "alexnet": 0.15, "mlp-1x512": 0.05, "mlp-3x512": 0.06},
    "cpu": {"inception": 858.0, "inception-nobn": 692.0, "alexnet": 80.0, "mlp-1x512": 1.2, "mlp-3x512": 2.2},
}


@dataclass(frozen=True)
class Selection:
    """Part of a suite: only runs of these models, label modes and pixel modes (None: all). Run ids do not change:
    a selected run is the same run as in the whole suite."""

    models: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None  # true, random, partial (any p) or partial:P
    pixels: tuple[str, ...] | None = None

    def __post_init__(self):
        from rethink.corruptions import PIXEL_MODES

        for name, allowed in (("models", MODELS), ("pixels", PIXEL_MODES)):
            bad = [v for v in getattr(self, name) or () if v not in allowed]
            if bad:
                raise UserError(f"--{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        for v in self.labels or ():
            if v not in ("true", "random", "partial") and not v.startswith("partial:"):
                raise UserError(f"--labels: unknown {v!r}; use true, random, partial or partial:P")

    @property
    def everything(self) -> bool:
        return self.models is None and self.labels is None and self.pixels is None

    def __contains__(self, spec: RunSpec) -> bool:
        labels_ok = self.labels is None or spec.labels in self.labels or (
            "partial" in self.labels and spec.labels.startswith("partial:"))  # fmt: skip
        return ((self.models is None or spec.model in self.models) and labels_ok
                and (self.pixels is None or spec.pixels in self.pixels))  # fmt: skip

    def describe(self) -> str:
        parts = [f"--{k} {','.join(v)}" for k, v in (("models", self.models), ("labels", self.labels),
                                                        ("pixels", self.pixels)) if v is not None]  # fmt: skip
        return " ".join(parts) or "everything"


def select(specs: list[RunSpec], selection: Selection | None) -> list[RunSpec]:
    """The specs in `selection`, in their order."""
    return specs if selection is None or selection.everything else [s for s in specs if s in selection]


def estimate_seconds(specs: list[RunSpec], kind: str = "gpu") -> float:
    """Upper bound of the wall time: every run to its cap, scaled by its subset size."""
    table = EPOCH_SECONDS[kind]
    return sum(table[s.model] * s.epochs * (s.train_subset or 50_000) / 50_000 for s in specs)
