"""A run's data set resident on the training device: subset, corrupted (pure functions of the spec's data
seed), moved once and preprocessed there; batches are gathered by index, so an epoch needs no host sync.

An epoch's data order and random crops come from a generator seeded by (seed, epoch) alone, so a resumed run
recomputes them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rethink.data.cifar import Cifar10
from rethink.data.corruptions import apply_pixels, corrupt_labels
from rethink.data.preprocess import preprocess, preprocess_all, random_offsets, standardize_crops_
from rethink.errors import UserError
from rethink.spec import RunSpec


@dataclass
class DeviceData:
    """A run's (corrupted) data set, resident on the training device."""

    train_pre: torch.Tensor  # central crop, standardized: [N, 3, 28, 28] float32
    train_raw: torch.Tensor | None  # raw 32x32 images for random crops (uint8, or float32 for gaussian)
    train_y: torch.Tensor
    test_pre: torch.Tensor
    test_y: torch.Tensor

    @property
    def n_train(self) -> int:
        return self.train_y.shape[0]


def prepare_data(spec: RunSpec, data: Cifar10, device: torch.device) -> DeviceData:
    """Subset, corrupt (pure functions of the spec's data seed), move to the device and preprocess there.

    On the CPU, images left as they are (pixels "none") are preprocessed from `data.crops` when the loader made
    them (cifar.CentralCrops): the same numbers, without allocating and filling the crops here."""
    if data.identity != spec.dataset:
        raise UserError(
            f"the spec wants data set {spec.dataset!r} but {data.path} holds {data.identity!r}; "
            "point --data-dir at the right data (or pass --synthetic for synthetic specs)"
        )
    train_x, train_y = data.train_x[: spec.train_subset], data.train_y[: spec.train_subset]
    test_x, test_y = data.test_x[: spec.test_subset], data.test_y[: spec.test_subset]
    train_y = corrupt_labels(train_y, spec.label_noise, spec.data_seed)
    train_x, test_x = apply_pixels(spec.pixels, train_x, test_x, spec.data_seed)
    train_raw = torch.from_numpy(np.ascontiguousarray(train_x)).to(device)
    crops = data.crops.take() if data.crops is not None else None  # taken in any case: they are one run's
    if crops is not None and spec.pixels == "none" and device.type == "cpu":
        train_pre = standardize_crops_(torch.from_numpy(crops[0][: spec.train_subset]))
        test_pre = standardize_crops_(torch.from_numpy(crops[1][: spec.test_subset]))
    else:
        train_pre = preprocess_all(train_raw)
        test_pre = preprocess_all(torch.from_numpy(np.ascontiguousarray(test_x)).to(device))
    return DeviceData(
        train_pre=train_pre,
        train_raw=train_raw if spec.random_crop else None,
        train_y=torch.from_numpy(train_y).to(device),
        test_pre=test_pre,
        test_y=torch.from_numpy(np.asarray(test_y, dtype=np.int64)).to(device),
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s data order and crops: recomputable on resume, distinct across epochs."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63)


def epoch_order(seed: int, epoch: int, n: int, crop: bool, device: torch.device):
    """(the epoch's permutation of the n training images, their crop offsets or None), from (seed, epoch)."""
    g = torch.Generator(device=device)
    g.manual_seed(epoch_seed(seed, epoch))
    perm = torch.randperm(n, generator=g, device=device)
    return perm, (random_offsets(n, g, device) if crop else None)


def batch_inputs(dd: DeviceData, idx: torch.Tensor, offsets: torch.Tensor | None, channels_last: bool):
    """The preprocessed inputs and labels of the training images `idx` (random crops when offsets are given)."""
    # index_select, not x[idx]: the same rows, gathered ~2x faster on the CPU (2 ms of an MLP step's 8)
    if offsets is not None:
        x = preprocess(dd.train_raw.index_select(0, idx), offsets.index_select(0, idx))
    else:
        x = dd.train_pre.index_select(0, idx)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, dd.train_y.index_select(0, idx)
