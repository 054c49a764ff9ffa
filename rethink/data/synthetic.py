"""Synthetic look-alikes of CIFAR-10, written in the official on-disk format, so that the tests and offline
runs exercise the real loader. Learnable (images scattered around a smooth prototype per class), and marked
as synthetic in `batches.meta`: nothing computed from them passes for CIFAR-10.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np

from rethink.data.cifar import (
    DIRNAME,
    LABEL_NAMES,
    META_FILE,
    SYNTHETIC_KEY,
    TEST_FILE,
    TRAIN_FILES,
    synthetic_identity,
)
from rethink.errors import UserError
from rethink.paper import IMAGE

DEFAULT_SIZE = (10_000, 2_000)  # the set --synthetic creates (train, test images; seed 0) when none exists yet


def default_identity() -> str:
    """The identity of the default synthetic set (`--synthetic`), without creating it."""
    return synthetic_identity(*DEFAULT_SIZE, seed=0)


def synthetic_images(n: int, rng: np.random.Generator, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images scattered around one smooth prototype per class: learnable, but not trivially separable."""
    labels = rng.integers(0, 10, size=n)
    noise = rng.normal(0.0, 1.0, size=(n, 3, IMAGE // 4, IMAGE // 4))
    noise = noise.repeat(4, axis=2).repeat(4, axis=3)  # blocky, image-like noise
    fine = rng.normal(0.0, 0.35, size=(n, 3, IMAGE, IMAGE))
    brightness = rng.normal(0.0, 0.3, size=(n, 1, 1, 1))
    x = 0.12 * prototypes[labels] + 0.9 * noise + fine + brightness
    img = np.clip(128 + 40 * x, 0, 255).astype(np.uint8)
    return img.reshape(n, -1), labels


class _Py2Pickler(pickle._Pickler):
    """Pickles like the official files (written by Python 2): bytes as py2 `str`, numpy under numpy.core.

    Python 2 strings load as bytes with encoding='bytes' and as str with encoding='latin1', so any CIFAR-10
    reader (this one, torchvision's) reads a synthetic file exactly as it reads the official one.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            module = "numpy.core" + module[len("numpy._core") :]
            self.write(pickle.GLOBAL + module.encode() + b"\n" + (name or obj.__name__).encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _write_pickle(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)
    os.replace(tmp, path)


def write_synthetic(out: str | os.PathLike, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write a synthetic data set in the official on-disk format under `<out>/cifar-10-batches-py/`."""
    if n_train < 5 or n_test < 1:
        raise UserError(f"--train must be at least 5 (one per batch file) and --test at least 1; got {n_train}, {n_test}")
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 1.0, size=(10, 3, 4, 4))
    prototypes = coarse.repeat(IMAGE // 4, axis=2).repeat(IMAGE // 4, axis=3)
    root = Path(out) / DIRNAME
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_synthetic_files(root, n_train, n_test, seed, rng, prototypes)
    except OSError as e:
        raise UserError(f"cannot write a synthetic data set to {out}: {e.strerror} ({e.filename})") from None
    return root


def _write_synthetic_files(root: Path, n_train: int, n_test: int, seed: int, rng, prototypes) -> None:
    data, labels = synthetic_images(n_train, rng, prototypes)
    for i, idx in enumerate(np.array_split(np.arange(n_train), 5)):
        _write_pickle(
            root / TRAIN_FILES[i],
            {
                b"batch_label": f"synthetic training batch {i + 1} of 5".encode(),
                b"labels": labels[idx].tolist(),
                b"data": data[idx],
                b"filenames": [f"synthetic_{j:06d}.png".encode() for j in idx],
            },
        )
    test_data, test_labels = synthetic_images(n_test, rng, prototypes)
    _write_pickle(
        root / TEST_FILE,
        {
            b"batch_label": b"synthetic testing batch 1 of 1",
            b"labels": test_labels.tolist(),
            b"data": test_data,
            b"filenames": [f"synthetic_test_{j:06d}.png".encode() for j in range(n_test)],
        },
    )
    # Written last: a directory without it is not a complete data set.
    _write_pickle(
        root / META_FILE,
        {
            b"num_cases_per_batch": int(np.ceil(n_train / 5)),
            b"label_names": [n.encode() for n in LABEL_NAMES],
            b"num_vis": 3 * IMAGE * IMAGE,
            SYNTHETIC_KEY: json.dumps({"train": n_train, "test": n_test, "seed": seed, "format": 1}).encode(),
        },
    )
