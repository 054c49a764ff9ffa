"""The randomization tests of Section 2.1: pure functions of (data, seed) on host arrays.

Labels are corrupted on the training set only; test labels stay true, so test accuracy measures the real task.
Pixel corruptions act on the 28x28 positions the central crop sees (rows and columns 2..29), so a permutation
of "the pixels" is exactly a permutation of the network's input positions; the 2-pixel border is left alone.
"""

from __future__ import annotations

import numpy as np

from rethink.errors import UserError
from rethink.paper import BORDER, CROP, NUM_CLASSES
from rethink.spec import PIXEL_MODES, parse_labels

__all__ = ["PIXEL_MODES", "apply_pixels", "corrupt_labels", "parse_labels"]

def corrupt_labels(labels: np.ndarray, p: float, seed: int) -> np.ndarray:
    """With probability p each label becomes a uniformly random class (possibly the same one: ~0.9p change)."""
    if p == 0.0:
        return labels.copy()
    rng = np.random.default_rng([seed, 1])
    replace = rng.random(len(labels)) < p
    random = rng.integers(0, NUM_CLASSES, size=len(labels))
    return np.where(replace, random, labels).astype(np.int64)


def _center(x: np.ndarray) -> np.ndarray:
    """The central 28x28 region as [N, 3, 784] (a copy)."""
    return x[:, :, BORDER : BORDER + CROP, BORDER : BORDER + CROP].reshape(x.shape[0], x.shape[1], -1).copy()


def _put_center(x: np.ndarray, center: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, :, BORDER : BORDER + CROP, BORDER : BORDER + CROP] = center.reshape(x.shape[0], x.shape[1], CROP, CROP)
    return out


def shuffled_permutation(seed: int) -> np.ndarray:
    """The one permutation of the 784 pixel positions that 'shuffled pixels' applies to every image."""
    return np.random.default_rng([seed, 2]).permutation(CROP * CROP)


def shuffle_pixels(x: np.ndarray, seed: int) -> np.ndarray:
    """Apply one fixed permutation of pixel positions (all channels together) to every image."""
    return _put_center(x, _center(x)[:, :, shuffled_permutation(seed)])


def random_pixels(x: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """Apply an independent random permutation of pixel positions to each image (stream: 0 train, 1 test)."""
    rng = np.random.default_rng([seed, 3, stream])
    perms = np.argsort(rng.random((x.shape[0], CROP * CROP)), axis=1)
    center = _center(x)
    return _put_center(x, np.take_along_axis(center, perms[:, None, :], axis=2))


def channel_moments(train_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of the training images (0..255 scale, before whitening)."""
    xf = train_x.astype(np.float64)
    return xf.mean(axis=(0, 2, 3)), xf.var(axis=(0, 2, 3))


def gaussian_images(shape: tuple, mean: np.ndarray, var: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """Gaussian noise images with the given per-channel mean and variance, float32 on the 0..255 scale."""
    rng = np.random.default_rng([seed, 4, stream])
    z = rng.standard_normal(shape, dtype=np.float32)
    return (z * np.sqrt(var).astype(np.float32)[None, :, None, None] + mean.astype(np.float32)[None, :, None, None])


def apply_pixels(mode: str, train_x: np.ndarray, test_x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt train and test images as the spec says; returns uint8 images, or float32 for 'gaussian'."""
    if mode == "none":
        return train_x, test_x
    if mode == "shuffled":
        return shuffle_pixels(train_x, seed), shuffle_pixels(test_x, seed)
    if mode == "random":
        return random_pixels(train_x, seed, 0), random_pixels(test_x, seed, 1)
    if mode == "gaussian":
        mean, var = channel_moments(train_x)
        return (gaussian_images(train_x.shape, mean, var, seed, 0), gaussian_images(test_x.shape, mean, var, seed, 1))
    raise UserError(f"bad pixel mode {mode!r}: use one of {', '.join(PIXEL_MODES)}")
