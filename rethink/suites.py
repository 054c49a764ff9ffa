"""The catalogue: named suites, each a list of components (figures and tables) that the experiments declare
(rethink/experiments/*, `COMPONENTS`), expanded with options into run specs.

`full` is the deduplicated union of the paper's components: a run shared by several figures (Inception on
true labels appears in Figure 1a, 1b/c, 2b and Table 1) is trained once. Torch-free: the plan, the workflow
builder and the report read the catalogue without importing the training engine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rethink.errors import UserError
from rethink.experiments import fig2b, periodic, quickstart, randomization, regularizers, table1
from rethink.experiments.base import SMOKE, WEIGHT_DECAY, Component, Options, Selection, select
from rethink.experiments.estimates import estimate_seconds
from rethink.spec import RunSpec

__all__ = ["COMPONENTS", "SUITES", "WEIGHT_DECAY", "Options", "Selection", "Suite", "components", "estimate_seconds",
           "expand", "get_suite", "options_for", "select"]  # fmt: skip

COMPONENTS: dict[str, Component] = {
    c.name: c
    for module in (quickstart, randomization, table1, fig2b, regularizers, periodic)
    for c in module.COMPONENTS
}
PAPER_COMPONENTS = ("fig1a", "fig1bc", "table1", "fig2b")


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    components: tuple[str, ...]
    smoke: bool = False  # tiny subset and two epochs: exercises every path in minutes on a CPU

    @property
    def in_full(self) -> bool:
        """Whether `full` trains this suite's runs (it has all its components)."""
        return set(self.components) <= set(SUITES["full"].components)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite("quickstart", "the paper's claim in minutes: MLP 1x512 fits random labels while its test accuracy "
              "stays at chance (10k training images, 30 epochs)", ("quickstart",)),
        Suite("fig1a", "Figure 1a: training loss of Small Inception under the five randomization tests", ("fig1a",)),
        Suite("fig1bc", "Figure 1b/c: time to overfit and test error against label corruption", ("fig1bc",)),
        Suite("table1", "Table 1: train/test accuracy with and without random crop and weight decay", ("table1",)),
        Suite("fig2b", "Figure 2b: learning curves of Small Inception with and without BatchNorm", ("fig2b",)),
        Suite("regularizers", "weight decay, random crop, dropout, all three or none; true and random labels "
              "(Inception, AlexNet, MLP 1x512)", ("regularizers",)),
        Suite("full", "everything above, each shared run trained once", (*PAPER_COMPONENTS, "regularizers")),
        Suite("smoke", "every figure and table path on a 256-image subset for 2 epochs (minutes on a CPU)",
              PAPER_COMPONENTS, smoke=True),
        Suite("periodic", "Lobacheva et al.: BatchNorm + weight decay at a constant lr, 1000 epochs; separate from "
              "full because of its cost", ("periodic",)),
        Suite("periodic-smoke", "periodic on 128 images with a 10^4x larger lr*wd: destabilizations in minutes on a "
              "CPU", ("periodic-smoke",)),
    ]
}  # fmt: skip


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}: choose one of {', '.join(SUITES)} (see rethink suites)")
    return SUITES[name]


def options_for(suite: Suite, o: Options) -> Options:
    """The options a suite is expanded with: the smoke sizing for the smoke suite, or any suite with --smoke."""
    if suite.smoke or o.smoke:
        return replace(o, epochs=o.epochs or SMOKE["epochs"], train_subset=o.train_subset or SMOKE["train_subset"],
                       test_subset=o.test_subset or SMOKE["test_subset"], smoke=True)  # fmt: skip
    return o


def components(name: str, o: Options) -> dict[str, list[RunSpec]]:
    """The suite's specs per component (figure/table), before deduplication."""
    suite = get_suite(name)
    o = options_for(suite, o)
    return {c: COMPONENTS[c].runs(o) for c in suite.components}


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
