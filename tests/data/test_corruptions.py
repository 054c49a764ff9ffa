"""The randomization tests of Section 2.1: determinism in the seed, the right amount of noise, the right scope."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rethink.data.cifar import load_cifar10
from rethink.data.corruptions import apply_pixels, corrupt_labels, parse_labels
from rethink.data.device import prepare_data
from rethink.data.preprocess import preprocess_all
from rethink.data.synthetic import write_synthetic
from rethink.errors import UserError
from rethink.spec import RunSpec

N_LABELS = 50_000


@pytest.fixture(scope="module")
def true_labels() -> np.ndarray:
    return np.random.default_rng(123).integers(0, 10, size=N_LABELS).astype(np.int64)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """A 100-train / 20-test synthetic data set of this module's own (read only)."""
    out = tmp_path_factory.mktemp("corruptions-data")
    write_synthetic(out, 100, 20, seed=0)
    return out


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _tracer(n: int) -> np.ndarray:
    """Images whose every value is unique and encodes (image, channel, row, column)."""
    i, c, r, k = np.meshgrid(np.arange(n), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return (i * 100_000 + c * 10_000 + r * 100 + k).astype(np.int64)


def _position_maps(out: np.ndarray) -> np.ndarray:
    """For each image and channel: which source position (row*32+col) landed at each position [n, 3, 1024]."""
    return (out % 10_000).reshape(out.shape[0], 3, -1) // 100 * 32 + (out % 100).reshape(out.shape[0], 3, -1)


def _check_permutes_centre_only(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Asserts the border is untouched, channels move together, values stay in their image; returns [n, 784] maps."""
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    np.testing.assert_array_equal(out[:, :, border], src[:, :, border])
    assert np.array_equal(out // 10_000, src // 10_000)  # same image, same channel
    maps = _position_maps(out)[:, :, ~border.reshape(-1)]
    assert (maps == maps[:, :1]).all()  # all three channels of a pixel move together
    maps = maps[:, 0]
    centre = np.flatnonzero(~border.reshape(-1))
    assert (np.sort(maps, axis=1) == centre).all()  # a permutation of the 784 centre positions
    return maps


def _same_multisets(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.sort(a.reshape(len(a), -1), axis=1), np.sort(b.reshape(len(b), -1), axis=1))


# ---------------------------------------------------------------------------------------------- labels


def test_parse_labels():
    assert parse_labels("true") == 0.0
    assert parse_labels("random") == 1.0
    assert parse_labels("partial:0.4") == 0.4
    assert parse_labels("partial:0") == 0.0 and parse_labels("partial:1") == 1.0
    for bad in ("partial:1.5", "partial:-0.1", "partial:x", "partial:", "noisy", ""):
        with pytest.raises(UserError, match="bad label mode .*partial:P"):
            parse_labels(bad)


def test_label_corruption_is_a_function_of_the_seed(true_labels):
    a = corrupt_labels(true_labels, 0.5, seed=7)
    b = corrupt_labels(true_labels, 0.5, seed=7)
    c = corrupt_labels(true_labels, 0.5, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.2
    assert a.dtype == np.int64 and a.shape == true_labels.shape


def test_label_corruption_does_not_touch_its_input(true_labels):
    before = true_labels.copy()
    corrupt_labels(true_labels, 1.0, seed=0)
    clean = corrupt_labels(true_labels, 0.0, seed=0)
    np.testing.assert_array_equal(true_labels, before)
    np.testing.assert_array_equal(clean, true_labels)
    clean[0] = (clean[0] + 1) % 10
    np.testing.assert_array_equal(true_labels, before)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.8, 1.0])
def test_partial_corruption_changes_about_0_9p(true_labels, p):
    changed = (corrupt_labels(true_labels, p, seed=1) != true_labels).mean()
    # binomial std on 50,000 labels is at most 0.0023: 0.01 is over 4 std
    assert abs(changed - 0.9 * p) < 0.01, (p, changed)


def test_random_labels_are_uniform_and_independent_of_the_truth(true_labels):
    p = parse_labels("random")
    assert p == 1.0
    noisy = corrupt_labels(true_labels, p, seed=2)
    assert abs((noisy == true_labels).mean() - 0.1) < 0.01
    counts = np.bincount(noisy, minlength=10)
    assert len(counts) == 10 and np.all(np.abs(counts - N_LABELS / 10) < 350)  # ~5 std
    # also uniform within each true class: no trace of the true label is left
    for cls in (0, 9):
        within = np.bincount(noisy[true_labels == cls], minlength=10) / (true_labels == cls).sum()
        assert np.all(np.abs(within - 0.1) < 0.03)


# ---------------------------------------------------------------------------------------------- shuffled pixels


def test_shuffled_pixels_is_one_permutation_for_train_and_test():
    train, test = _tracer(5), _tracer(3)
    out_train, out_test = apply_pixels("shuffled", train, test, seed=0)
    maps_train = _check_permutes_centre_only(train, out_train)
    maps_test = _check_permutes_centre_only(test, out_test)
    maps = np.concatenate([maps_train, maps_test])
    assert (maps == maps[0]).all()  # every image, train and test, gets the same permutation
    assert (maps[0] != np.sort(maps[0])).mean() > 0.9  # and it really moves pixels
    again, _ = apply_pixels("shuffled", train, test, seed=0)
    other, _ = apply_pixels("shuffled", train, test, seed=1)
    np.testing.assert_array_equal(again, out_train)
    assert (_position_maps(other)[0] != _position_maps(out_train)[0]).mean() > 0.5


def test_shuffled_pixels_keeps_each_images_values():
    train, test = _images(8, 0), _images(4, 1)
    out_train, out_test = apply_pixels("shuffled", train, test, seed=3)
    assert out_train.dtype == np.uint8 and out_train.shape == train.shape
    assert _same_multisets(out_train, train) and _same_multisets(out_test, test)
    assert not np.array_equal(out_train, train)
    np.testing.assert_array_equal(train, _images(8, 0))  # the input is not modified


# ---------------------------------------------------------------------------------------------- random pixels


def test_random_pixels_is_a_different_permutation_per_image():
    train = _tracer(6)
    test = train.copy()  # the same images: the test set must still get its own permutations
    out_train, out_test = apply_pixels("random", train, test, seed=0)
    maps = np.concatenate(
        [_check_permutes_centre_only(train, out_train), _check_permutes_centre_only(test, out_test)]
    )
    assert len({m.tobytes() for m in maps}) == len(maps)  # twelve images, twelve different permutations
    assert ((maps[:6] != maps[6:]).mean(axis=1) > 0.9).all()
    again_train, again_test = apply_pixels("random", train, test, seed=0)
    np.testing.assert_array_equal(again_train, out_train)  # drawn once: same seed, same permutations
    np.testing.assert_array_equal(again_test, out_test)
    other, _ = apply_pixels("random", train, test, seed=1)
    assert (_position_maps(other) != _position_maps(out_train)).mean() > 0.5


def test_random_pixels_keeps_each_images_values():
    train, test = _images(8, 0), _images(4, 1)
    out_train, out_test = apply_pixels("random", train, test, seed=5)
    assert out_train.dtype == np.uint8 and out_test.shape == test.shape
    assert _same_multisets(out_train, train) and _same_multisets(out_test, test)
    assert not np.array_equal(out_train, train)


# ---------------------------------------------------------------------------------------------- gaussian


def _channel_skewed_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means, sds = np.array([60.0, 128.0, 190.0]), np.array([10.0, 40.0, 25.0])
    x = rng.normal(means[None, :, None, None], sds[None, :, None, None], size=(n, 3, 32, 32))
    return np.clip(x, 0, 255).astype(np.uint8)


def test_gaussian_matches_training_channel_moments():
    train = _channel_skewed_images(200, 0)
    test = np.zeros(
        (100, 3, 32, 32), np.uint8
    )  # very different test images: the training moments must be used
    want_mean = train.astype(np.float64).mean(axis=(0, 2, 3))
    want_var = train.astype(np.float64).var(axis=(0, 2, 3))
    out_train, out_test = apply_pixels("gaussian", train, test, seed=0)
    assert out_train.shape == train.shape and out_test.shape == test.shape
    assert out_train.dtype == np.float32
    for out in (out_train, out_test):
        mean = out.astype(np.float64).mean(axis=(0, 2, 3))
        var = out.astype(np.float64).var(axis=(0, 2, 3))
        np.testing.assert_allclose(mean, want_mean, atol=1.0)  # std error of the mean is below 0.15
        np.testing.assert_allclose(var, want_var, rtol=0.03)
    # noise, not the images: no correlation with the originals, no repeat between train and test
    assert abs(np.corrcoef(out_train[:, 1].ravel(), train[:, 1].ravel())[0, 1]) < 0.02
    assert not np.allclose(out_train[:100], out_test)


def test_gaussian_is_a_function_of_the_seed():
    train, test = _channel_skewed_images(10, 1), _channel_skewed_images(5, 2)
    a = apply_pixels("gaussian", train, test, seed=4)
    b = apply_pixels("gaussian", train, test, seed=4)
    c = apply_pixels("gaussian", train, test, seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])


def test_pixel_mode_none_and_bad_mode():
    train, test = _images(2), _images(2, 1)
    out_train, out_test = apply_pixels("none", train, test, seed=0)
    np.testing.assert_array_equal(out_train, train)
    np.testing.assert_array_equal(out_test, test)
    with pytest.raises(UserError, match="bad pixel mode 'blur'.*shuffled"):
        apply_pixels("blur", train, test, seed=0)


# ---------------------------------------------------------------------------------------------- scope: train only


@pytest.mark.parametrize("labels", ["random", "partial:0.5"])
def test_prepare_data_corrupts_training_labels_only(tiny_set, labels):
    data = load_cifar10(tiny_set, download=False)
    spec = RunSpec(model="mlp-1x512", labels=labels, dataset=data.identity, seed=3)
    prepared = prepare_data(spec, data, torch.device("cpu"))
    np.testing.assert_array_equal(prepared.test_y.numpy(), data.test_y)
    np.testing.assert_array_equal(
        prepared.train_y.numpy(), corrupt_labels(data.train_y, parse_labels(labels), 3)
    )
    assert (prepared.train_y.numpy() != data.train_y).any()
    # labels only: the images are the clean, preprocessed ones
    torch.testing.assert_close(prepared.test_pre, preprocess_all(torch.from_numpy(data.test_x)))
    torch.testing.assert_close(prepared.train_pre, preprocess_all(torch.from_numpy(data.train_x)))


def test_prepare_data_pixel_corruption_reaches_train_and_test(tiny_set):
    data = load_cifar10(tiny_set, download=False)
    spec = RunSpec(model="mlp-1x512", pixels="shuffled", dataset=data.identity, seed=2)
    prepared = prepare_data(spec, data, torch.device("cpu"))
    train_x, test_x = apply_pixels("shuffled", data.train_x, data.test_x, 2)
    torch.testing.assert_close(prepared.test_pre, preprocess_all(torch.from_numpy(test_x)))
    torch.testing.assert_close(prepared.train_pre, preprocess_all(torch.from_numpy(train_x)))
    np.testing.assert_array_equal(prepared.train_y.numpy(), data.train_y)
    np.testing.assert_array_equal(prepared.test_y.numpy(), data.test_y)


def test_prepare_data_refuses_the_wrong_data_set(tiny_set):
    data = load_cifar10(tiny_set, download=False)
    with pytest.raises(UserError, match=f"spec wants data set 'cifar10' .* holds '{data.identity}'"):
        prepare_data(RunSpec(model="mlp-1x512"), data, torch.device("cpu"))


@pytest.mark.parametrize(
    ("pixels", "subsets"), [("none", (None, None)), ("none", (37, 9)), ("shuffled", (None, None))]
)
def test_prepare_data_from_the_loaders_crops_is_the_same_data(tiny_set, pixels, subsets):
    """A CPU run whose loader made the float32 crops (rethink train does) trains on exactly the same tensors."""
    spec = RunSpec(model="mlp-1x512", pixels=pixels, random_crop=True, dataset=load_cifar10(tiny_set).identity,
                   train_subset=subsets[0], test_subset=subsets[1], seed=1)  # fmt: skip
    plain = prepare_data(spec, load_cifar10(tiny_set), torch.device("cpu"))
    with_crops = load_cifar10(tiny_set, central_crops=True)
    fast = prepare_data(spec, with_crops, torch.device("cpu"))
    assert with_crops.crops.take() is None  # taken by the run, used or not
    for name in ("train_pre", "train_raw", "train_y", "test_pre", "test_y"):
        assert torch.equal(getattr(fast, name), getattr(plain, name)), name
    assert fast.train_pre.shape[0] == (subsets[0] or 100) and fast.test_pre.shape[0] == (subsets[1] or 20)
