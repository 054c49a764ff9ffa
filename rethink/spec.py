"""One run, as a frozen JSON-serializable value; its id is a hash of its canonical JSON."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from dataclasses import dataclass, field

from rethink.errors import UserError
from rethink.paper import DEFAULT_LR, LR_DECAY, MODELS, MOMENTUM

# 2: weight decay acts on the kernels only, evaluation is float32, paper runs go to their cap (docs/protocol.md).
# A spec of another version describes another protocol: it is refused, never trained by this code.
SPEC_VERSION = 2
# The epoch cap of every run unless a suite or flag says otherwise [choice]: the paper reports accuracies "after
# convergence"; with the learning rate x0.95 per epoch, after 100 epochs it is 0.6% of its start.
EPOCH_CAP = 100


# The randomization tests a spec names (rethink/data/corruptions.py applies them).
PIXEL_MODES = ("none", "shuffled", "random", "gaussian")
# What the training steps compute in. bf16 (autocast) changes the numbers, so a bf16 run is its own run with its
# own id; float32, the default, is left out of the canonical JSON so that the ids of float32 runs never change.
PRECISIONS = ("float32", "bf16")


def parse_labels(mode: str) -> float:
    """'true' -> 0.0, 'random' -> 1.0, 'partial:P' -> P (the corruption probability)."""
    if mode == "true":
        return 0.0
    if mode == "random":
        return 1.0
    if mode.startswith("partial:"):
        try:
            p = float(mode.split(":", 1)[1])
        except ValueError:
            p = -1.0
        if 0.0 <= p <= 1.0:
            return p
    raise UserError(f"bad label mode {mode!r}: use true, random or partial:P with 0 <= P <= 1 (e.g. partial:0.4)")


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's result. Device and compile are how, not what: not here. The training
    steps' precision is here: a bf16 run gives other numbers than its float32 twin and is its own run."""

    model: str
    labels: str = "true"  # true | random | partial:P
    pixels: str = "none"  # none | shuffled | random | gaussian
    weight_decay: float = 0.0
    random_crop: bool = False
    dropout: float = 0.0
    lr: float | None = None  # None: the paper's per-model rate (0.1 Inception, 0.01 otherwise)
    momentum: float = MOMENTUM
    lr_decay: float = LR_DECAY  # multiplied into the learning rate after every epoch
    batch_size: int = 128
    epochs: int = EPOCH_CAP
    target_train_acc: float | None = None  # stop at the first epoch end with train accuracy >= this
    loss_thresholds: tuple[float, ...] = (0.1, 0.01)  # record the first step with epoch train loss below each
    seed: int = 0  # initialization, data order, crops, dropout
    data_seed: int | None = None  # label and pixel corruption; None: same as seed
    dataset: str = "cifar10"  # "cifar10", or a synthetic set's identity (see data.dataset_identity)
    train_subset: int | None = None  # use only the first n training images (smoke runs)
    test_subset: int | None = None
    track_norms: bool = False  # record weight/gradient norms and the effective learning rate per epoch
    precision: str = "float32"  # of the training steps: float32 | bf16 (autocast); evaluation is float32 either way
    version: int = SPEC_VERSION
    tags: tuple[str, ...] = field(default=(), compare=False)  # free-form labels for reports; not in the id

    def __post_init__(self):
        self._check_types()
        if self.version != SPEC_VERSION:
            raise UserError(
                f"bad run spec: version {self.version} is another protocol than this rethink's ({SPEC_VERSION}); "
                "its runs cannot be trained or counted by this version (docs/protocol.md)"
            )
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        parse_labels(self.labels)
        if self.precision not in PRECISIONS:
            raise UserError(f"bad precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.pixels not in PIXEL_MODES:
            raise UserError(f"bad pixel mode {self.pixels!r}: use one of {', '.join(PIXEL_MODES)}")
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.model])
        if self.data_seed is None:
            object.__setattr__(self, "data_seed", self.seed)
        object.__setattr__(self, "loss_thresholds", tuple(float(t) for t in self.loss_thresholds))
        object.__setattr__(self, "tags", tuple(self.tags))
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.weight_decay >= 0.0, "weight decay must be >= 0"),
            (self.lr > 0.0, "learning rate must be > 0"),
            (self.target_train_acc is None or 0.0 < self.target_train_acc <= 1.0, "target accuracy must be in (0, 1]"),
            (self.train_subset is None or self.train_subset >= 1, "train subset must be >= 1"),
            (self.test_subset is None or self.test_subset >= 1, "test subset must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"bad run spec: {message}")

    def _check_types(self) -> None:
        """Reject wrongly typed fields; store numbers canonically (5e-4 and 0.0005, 1 and 1.0 give one id)."""
        for name, (kind, optional) in _field_kinds().items():
            value = getattr(self, name)
            if optional and value is None:
                continue
            if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UserError(f"bad run spec: {name} must be {kind.__name__}, got {value!r}")
        thresholds = self.loss_thresholds
        if isinstance(thresholds, (str, bytes)) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in thresholds
        ):
            raise UserError(f"bad run spec: loss_thresholds must be a list of numbers, got {thresholds!r}")

    @property
    def synthetic(self) -> bool:
        return self.dataset.startswith("synthetic")

    @property
    def label_noise(self) -> float:
        return parse_labels(self.labels)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["loss_thresholds"] = list(self.loss_thresholds)
        d["tags"] = list(self.tags)
        return d

    def canonical_json(self) -> str:
        d = self.to_dict()
        d.pop("tags")
        if d["precision"] == "float32":  # the default leaves every float32 run's id as it was before the field
            d.pop("precision")
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @functools.cached_property
    def run_id(self) -> str:
        """A short hash of the canonical JSON: the same spec has the same id in every process. Computed once per
        spec (the spec is frozen): the engine looks runs up by id at every step."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]

    @property
    def amp(self) -> bool:
        """Whether the training steps run under bf16 autocast."""
        return self.precision == "bf16"

    def replace(self, **changes) -> RunSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"bad run spec: unknown field(s) {', '.join(sorted(unknown))}")
        if "model" not in d:
            raise UserError("bad run spec: 'model' is required")
        d = dict(d)
        for key in ("loss_thresholds", "tags"):
            if key in d:
                d[key] = tuple(d[key])
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"bad run spec: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"bad run spec: not JSON ({e})") from None
        if not isinstance(d, dict):
            raise UserError("bad run spec: expected a JSON object")
        return cls.from_dict(d)

    def label(self) -> str:
        """A short human description, e.g. 'mlp-1x512 labels=partial:0.4 wd=5e-4 crop'."""
        parts = [self.model]
        if self.labels != "true":
            parts.append(f"labels={self.labels}")
        if self.pixels != "none":
            parts.append(f"pixels={self.pixels}")
        if self.weight_decay:
            parts.append(f"wd={self.weight_decay:g}")
        if self.random_crop:
            parts.append("crop")
        if self.dropout:
            parts.append(f"dropout={self.dropout:g}")
        if self.lr != DEFAULT_LR[self.model]:
            parts.append(f"lr={self.lr:g}")
        if self.momentum != MOMENTUM:
            parts.append(f"momentum={self.momentum:g}")
        if self.lr_decay != LR_DECAY:
            parts.append(f"decay={self.lr_decay:g}")
        if self.train_subset:
            parts.append(f"n={self.train_subset}")
        if self.precision != "float32":
            parts.append(self.precision)
        parts.append(f"seed={self.seed}")
        return " ".join(parts)


@functools.cache
def _field_kinds() -> dict[str, tuple[type, bool]]:
    """Each scalar field's type and whether it may be None, read from RunSpec's own annotations."""
    kinds = {}
    for name, hint in typing.get_type_hints(RunSpec).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        kind = next((a for a in args if a is not type(None)), hint) if optional else hint
        if typing.get_origin(kind) is None:  # tuples (loss_thresholds, tags) are checked on their own
            kinds[name] = (kind, optional)
    return kinds
