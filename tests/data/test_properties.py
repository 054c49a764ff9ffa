"""Rules that hold for every input, checked as properties (hypothesis): the pixel corruptions permute each image's
values, shuffled pixels use one permutation for all images, partial corruption replaces about p of the training
labels and never a test label, a spec survives JSON with a stable id, and per-image standardization gives mean 0
and standard deviation min(1, std * sqrt(N))."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rethink.data.corruptions import apply_pixels, corrupt_labels, shuffle_pixels, shuffled_permutation
from rethink.data.preprocess import standardize
from rethink.paper import BORDER, CROP, NUM_CLASSES
from rethink.spec import PIXEL_MODES, RunSpec

# Few examples each: CI's budget is minutes, and each example is a full data transformation.
FEW = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _center(x):
    return x[:, :, BORDER : BORDER + CROP, BORDER : BORDER + CROP].reshape(x.shape[0], 3, -1)


@FEW
@given(seed=seeds, data_seed=seeds, n=st.integers(1, 6), mode=st.sampled_from(["shuffled", "random"]))
def test_pixel_corruptions_permute_each_images_pixels(seed, data_seed, n, mode):
    """Shuffled and random pixels move whole pixels (all channels together) inside the central crop: each image
    keeps its multiset of pixel values, and the border is untouched."""
    train, test = _images(n, seed), _images(n, seed + 1)
    got_train, got_test = apply_pixels(mode, train, test, data_seed)
    for before, after in ((train, got_train), (test, got_test)):
        for a, b in zip(_center(before), _center(after)):
            pixels = lambda c: sorted(map(tuple, c.T.tolist()))  # noqa: E731  one (r, g, b) per position
            assert pixels(a) == pixels(b)
        outside = np.ones((32, 32), bool)
        outside[BORDER : BORDER + CROP, BORDER : BORDER + CROP] = False
        assert np.array_equal(before[:, :, outside], after[:, :, outside])


@FEW
@given(seed=seeds, data_seed=seeds, n=st.integers(1, 5), m=st.integers(1, 5))
def test_shuffled_pixels_is_one_permutation_for_train_and_test(seed, data_seed, n, m):
    """Every image, training and test alike, is permuted by the same permutation of positions."""
    train, test = _images(n, seed), _images(m, seed + 7)
    got_train, got_test = apply_pixels("shuffled", train, test, data_seed)
    perm = shuffled_permutation(data_seed)
    assert sorted(perm.tolist()) == list(range(CROP * CROP))
    for before, after in ((train, got_train), (test, got_test)):
        assert np.array_equal(_center(after), _center(before)[:, :, perm])
    assert np.array_equal(shuffle_pixels(train, data_seed), got_train)


@FEW
@given(p=st.floats(0.05, 1.0), seed=seeds)
def test_partial_corruption_replaces_about_p_of_the_training_labels_only(p, seed):
    """With probability p a label is redrawn uniformly: about p(1 - 1/10) of them change (binomial, 5 sigma);
    test labels are never touched (the corruption is of the training set: apply_pixels / prepare_data pass
    test labels through)."""
    n = 4000
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, n).astype(np.int64)
    test = labels.copy()
    got = corrupt_labels(labels, p, seed)
    assert np.array_equal(labels, test)  # the input (as the test labels would be) is not modified in place
    q = p * (1 - 1 / NUM_CLASSES)
    changed = int((got != labels).sum())
    assert abs(changed - q * n) <= 5 * (n * q * (1 - q)) ** 0.5 + 1
    assert got.min() >= 0 and got.max() < NUM_CLASSES


def test_partial_labels_are_drawn_from_all_ten_classes_near_uniformly():
    """At p = 0.3 over many seeds, the replaced labels cover every class with frequency near 1/10."""
    counts = np.zeros(NUM_CLASSES)
    labels = np.zeros(5000, dtype=np.int64)  # all class 0: every changed label shows the class it was drawn as
    for seed in range(20):
        got = corrupt_labels(labels, 0.3, seed)
        counts += np.bincount(got[got != 0], minlength=NUM_CLASSES)
    assert counts[0] == 0 and (counts[1:] > 0).all()
    freq = counts[1:] / counts[1:].sum()
    total = counts[1:].sum()  # ~ 20 * 5000 * 0.3 * 0.9 = 27,000 draws over 9 classes
    assert np.abs(freq - 1 / 9).max() < 5 * (1 / 9 * 8 / 9 / total) ** 0.5


def test_prepared_test_labels_stay_true_under_every_corruption(tmp_path):
    from rethink.data.cifar import load_cifar10
    from rethink.data.device import prepare_data
    from rethink.data.synthetic import write_synthetic

    write_synthetic(tmp_path, 200, 100, seed=0)
    data = load_cifar10(tmp_path, download=False)
    for labels in ("random", "partial:0.5"):
        for pixels in PIXEL_MODES:
            dd = prepare_data(RunSpec(model="mlp-1x512", labels=labels, pixels=pixels, dataset=data.identity), data,
                              torch.device("cpu"))  # fmt: skip
            assert dd.test_y.tolist() == list(data.test_y)
            assert not np.array_equal(dd.train_y.numpy(), data.train_y)


spec_fields = st.fixed_dictionaries(
    {"model": st.sampled_from(["mlp-1x512", "mlp-3x512", "alexnet", "inception", "inception-nobn"])},
    optional={
        "labels": st.sampled_from(["true", "random", "partial:0.2", "partial:0.8"]),
        "pixels": st.sampled_from(list(PIXEL_MODES)),
        "weight_decay": st.sampled_from([0.0, 5e-4, 0.0005]),
        "random_crop": st.booleans(),
        "dropout": st.sampled_from([0.0, 0.5]),
        "epochs": st.integers(1, 200),
        "seed": st.integers(0, 10),
        "batch_size": st.sampled_from([64, 128]),
        "train_subset": st.none() | st.integers(1, 50000),
        "tags": st.lists(st.sampled_from(["table1:3", "fig1a", "x"]), max_size=2),
    },
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(d=spec_fields, order=st.randoms(use_true_random=False))
def test_a_spec_survives_json_and_its_id_is_stable(d, order):
    spec = RunSpec.from_dict(d)
    back = RunSpec.from_json(json.dumps(spec.to_dict()))
    assert back == spec and back.run_id == spec.run_id
    items = list(spec.to_dict().items())
    order.shuffle(items)
    assert RunSpec.from_dict(dict(items)).run_id == spec.run_id  # key order does not matter
    # Defaults filled in explicitly (the paper's rate, data seed = seed) name the same run; tags do not count.
    filled = {**d, "lr": spec.lr, "data_seed": spec.seed, "tags": ["other"]}
    assert RunSpec.from_dict(filled).run_id == spec.run_id
    assert spec.replace(seed=spec.seed + 1).run_id != spec.run_id


@FEW
@given(
    seed=seeds,
    n=st.integers(1, 4),
    scale=st.sampled_from([0.0, 1e-4, 1e-2, 1.0, 255.0]),
    offset=st.floats(-100, 100),
)
def test_per_image_standardization_mean_zero_and_guarded_std(seed, n, scale, offset):
    """TensorFlow's per_image_standardization: (x - mean) / max(std, 1/sqrt(N)), so each image ends with mean 0
    and standard deviation min(1, std * sqrt(N)); a constant image (std 0) becomes all zeros."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 28, 28, generator=g, dtype=torch.float64) * scale + offset).float()
    y = standardize(x).double().view(n, -1)
    N = 3 * 28 * 28
    std = x.double().view(n, -1).std(dim=1, unbiased=False)
    # float32: the mean of N values of size |offset| is rounded to ~|offset| * 2^-24, scaled up by sqrt(N) at most
    tol = 1e-5 * (1 + abs(offset))
    assert y.mean(dim=1).abs().max() < tol
    expected = torch.minimum(torch.ones_like(std), std * N**0.5)
    torch.testing.assert_close(y.std(dim=1, unbiased=False), expected, rtol=2e-3, atol=tol)
    if scale == 0.0:
        assert y.abs().max() < tol  # a constant image: zeros, up to that rounding


def test_standardization_matches_the_closed_form_on_one_image():
    x = torch.arange(12, dtype=torch.float32).view(1, 3, 2, 2)
    m, s = x.mean(), x.std(unbiased=False)
    assert torch.allclose(standardize(x), (x - m) / max(s, 1 / 12**0.5))


@pytest.mark.parametrize("mode", ["shuffled", "random"])
def test_pixel_corruption_is_a_pure_function_of_the_seed(mode):
    train, test = _images(3, 0), _images(2, 1)
    a, b = apply_pixels(mode, train, test, 5), apply_pixels(mode, train, test, 5)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(apply_pixels(mode, train, test, 6)[0], a[0])
