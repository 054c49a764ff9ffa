"""Which runs may train together as one pack (training/packed.py), without torch: the plan and the workflow
builder group a suite's runs exactly as the trainer does.

Runs share a pack when they agree on everything but the fields listed in PER_RUN_FIELDS, the ones a pack
keeps per member (labels and pixels and their seed, weight decay, random crop, the seed, the early stop).
Listing what may differ, not what must agree, fails safe: a field added to RunSpec later is shared by a
pack's members until someone makes it per-member on purpose.
"""

from __future__ import annotations

import dataclasses

from rethink.errors import UserError
from rethink.spec import RunSpec

PER_RUN_FIELDS = ("labels", "pixels", "weight_decay", "random_crop", "seed", "data_seed", "target_train_acc",
                  "loss_thresholds", "tags")  # fmt: skip
SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec) if f.name not in PER_RUN_FIELDS)


def pack_key(spec: RunSpec) -> tuple:
    return tuple(getattr(spec, f) for f in SHARED_FIELDS)


def group_packs(specs: list[RunSpec], k: int) -> list[list[RunSpec]]:
    """Split specs into packs of at most k compatible runs: by first appearance of each kind, in spec order."""
    if k < 1:
        raise UserError(f"--pack must be at least 1, got {k}")
    kinds: dict[tuple, list[RunSpec]] = {}
    for s in specs:
        kinds.setdefault(pack_key(s), []).append(s)
    return [group[i : i + k] for group in kinds.values() for i in range(0, len(group), k)]


def suite_pack(specs: list[RunSpec], k: int, index: int) -> list[RunSpec]:
    """Pack number `index` of `group_packs(specs, k)`, with a clear error when it does not exist."""
    packs = group_packs(specs, k)
    if not 0 <= index < len(packs):
        raise UserError(f"--pack-index {index} is out of range: the suite has {len(packs)} packs of <= {k} runs "
                        "(see rethink plan --pack K)")  # fmt: skip
    return packs[index]


def check_packable(specs: list[RunSpec]) -> None:
    if len({pack_key(s) for s in specs}) > 1:
        raise UserError("runs in one pack must share " + ", ".join(SHARED_FIELDS) + "; use group_packs to split them")
    if len({s.run_id for s in specs}) != len(specs):
        raise UserError("a pack lists the same run twice")
