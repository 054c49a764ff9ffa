"""The CIFAR-10 loader (official on-disk format, md5 checks, clear errors) and the paper's preprocessing."""

from __future__ import annotations

import hashlib
import math
import os
import pickle

import numpy as np
import pytest
import torch

from rethink.data import cifar as D
from rethink.data.cifar import DIRNAME, dataset_identity, is_synthetic, load_cifar10
from rethink.data.preprocess import crop, preprocess, preprocess_all, random_offsets, standardize
from rethink.data.synthetic import write_synthetic
from rethink.errors import UserError

FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]


# `synth_dir` (a fresh 100/20 synthetic set, free to damage) and `unmarked_dir` come from conftest.py.


# ---------------------------------------------------------------------------------------------- reading synthetic sets


def test_loader_reads_synthetic_set(synth_dir):
    root = synth_dir / DIRNAME
    assert sorted(p.name for p in root.iterdir()) == sorted(FILES)
    data = load_cifar10(synth_dir, download=False)
    assert data.train_x.shape == (100, 3, 32, 32) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (20, 3, 32, 32) and data.test_x.dtype == np.uint8
    assert data.train_y.shape == (100,) and data.test_y.shape == (20,)
    for y in (data.train_y, data.test_y):
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() <= 9
    assert len(np.unique(data.train_y)) > 1
    assert data.synthetic is True
    assert data.identity == "synthetic-n100-m20-s0"
    assert dataset_identity(synth_dir) == data.identity
    assert is_synthetic(synth_dir)
    assert "SYNTHETIC" in data.description and "100 train / 20 test" in data.description


def test_loader_keeps_file_order_and_channel_major_layout(synth_dir):
    """Images come out in file order, and row k of b'data' is [R plane, G plane, B plane], each row-major."""
    root = synth_dir / DIRNAME
    rows, labels = [], []
    for name in FILES[:5]:
        with open(root / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        rows.append(d[b"data"])
        labels += d[b"labels"]
    raw = np.concatenate(rows)
    data = load_cifar10(synth_dir, download=False)
    np.testing.assert_array_equal(data.train_y, labels)
    # pixel (channel c, row r, column k) of image i is raw[i, c*1024 + r*32 + k]
    for i, c, r, k in [(0, 0, 0, 0), (7, 1, 5, 30), (99, 2, 31, 31), (42, 2, 0, 17)]:
        assert data.train_x[i, c, r, k] == raw[i, c * 1024 + r * 32 + k]


def test_synthetic_is_deterministic_in_seed(tmp_path):
    a = load_cifar10(write_synthetic(tmp_path / "a", 50, 10, seed=3).parent, download=False)
    b = load_cifar10(write_synthetic(tmp_path / "b", 50, 10, seed=3).parent, download=False)
    c = load_cifar10(write_synthetic(tmp_path / "c", 50, 10, seed=4).parent, download=False)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert a.identity == b.identity != c.identity
    assert not np.array_equal(a.train_x, c.train_x)


def test_synthetic_files_are_official_pickles(synth_dir):
    """Plain pickle reads them like the Python-2-written originals: bytes keys, or str keys with latin1."""
    root = synth_dir / DIRNAME
    for name in FILES[:6]:
        with open(root / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        assert isinstance(d, dict)
        assert isinstance(d[b"data"], np.ndarray) and d[b"data"].dtype == np.uint8
        assert d[b"data"].ndim == 2 and d[b"data"].shape[1] == 3072
        assert len(d[b"labels"]) == len(d[b"data"])
        assert all(isinstance(v, int) and 0 <= v <= 9 for v in d[b"labels"])
        with open(root / name, "rb") as f:
            s = pickle.load(f, encoding="latin1")
        assert {"data", "labels", "batch_label", "filenames"} <= set(s)
        assert all(isinstance(k, str) for k in s)
        np.testing.assert_array_equal(s["data"], d[b"data"])
    assert (
        sum(len(pickle.loads((root / n).read_bytes(), encoding="bytes")[b"data"]) for n in FILES[:5]) == 100
    )
    with open(root / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert meta["label_names"][:2] == ["airplane", "automobile"] and len(meta["label_names"]) == 10
    assert meta["num_vis"] == 3072


def test_write_synthetic_rejects_bad_sizes(tmp_path):
    with pytest.raises(UserError, match="at least 5"):
        write_synthetic(tmp_path / "x", 4, 10)
    with pytest.raises(UserError, match="at least 1"):
        write_synthetic(tmp_path / "y", 10, 0)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------------------- md5 checks


def test_md5_mismatch_is_a_clear_error(unmarked_dir):
    assert not is_synthetic(unmarked_dir)
    assert dataset_identity(unmarked_dir) == "cifar10"
    with pytest.raises(UserError) as e:
        load_cifar10(unmarked_dir, download=False)
    msg = str(e.value)
    assert "md5 mismatch" in msg and "--no-verify-data" in msg
    assert str(unmarked_dir / DIRNAME) in msg


def test_no_verify_accepts_unofficial_files_with_a_warning(unmarked_dir):
    with pytest.warns(UserWarning, match="not verifying md5"):
        data = load_cifar10(unmarked_dir, verify=False, download=False)
    assert data.synthetic is False and data.identity == "cifar10"
    assert data.train_x.shape == (100, 3, 32, 32)
    assert "SYNTHETIC" not in data.description


def test_matching_md5_is_accepted(unmarked_dir, monkeypatch, recwarn):
    """The check compares against the table: files whose md5s match it load with verify on and no warning."""
    root = unmarked_dir / DIRNAME
    table = {name: hashlib.md5((root / name).read_bytes()).hexdigest() for name in FILES}
    monkeypatch.setattr(D, "FILE_MD5", table)
    data = load_cifar10(unmarked_dir, download=False)
    assert data.identity == "cifar10" and len(data.train_y) == 100
    assert not [w for w in recwarn if "md5" in str(w.message)]


def test_missing_file_of_real_set(unmarked_dir, monkeypatch):
    root = unmarked_dir / DIRNAME
    monkeypatch.setattr(
        D, "FILE_MD5", {name: hashlib.md5((root / name).read_bytes()).hexdigest() for name in FILES}
    )
    os.remove(root / "data_batch_4")
    with pytest.raises(UserError, match=r"missing file .*data_batch_4: the data set is incomplete"):
        load_cifar10(unmarked_dir, download=False)
    with pytest.warns(UserWarning), pytest.raises(UserError, match=r"missing file .*data_batch_4"):
        load_cifar10(unmarked_dir, verify=False, download=False)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_batches_repickled_by_python3_load(synth_dir, protocol):
    """A valid batch file written by Python 3 (any protocol) is data, not a corrupt file."""
    root = synth_dir / DIRNAME
    before = load_cifar10(synth_dir, download=False)
    for name in FILES:
        obj = pickle.loads((root / name).read_bytes(), encoding="bytes")
        (root / name).write_bytes(pickle.dumps(obj, protocol=protocol))
    after = load_cifar10(synth_dir, download=False)
    np.testing.assert_array_equal(after.train_x, before.train_x)
    np.testing.assert_array_equal(after.test_y, before.test_y)
    assert after.identity == before.identity


# ---------------------------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_file_names_the_file(synth_dir, verify):
    path = synth_dir / DIRNAME / "data_batch_3"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError) as e:
        load_cifar10(synth_dir, verify=verify, download=False)
    assert str(path) in str(e.value) and "truncated or corrupt" in str(e.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["data_batch_1", "batches.meta"])
def test_pickle_with_code_is_refused(synth_dir, tmp_path, name):
    marker = tmp_path / "pwned"
    path = synth_dir / DIRNAME / name
    with open(path, "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(UserError) as e:
        load_cifar10(synth_dir, download=False)
    assert str(path) in str(e.value) and "system" in str(e.value)
    assert not marker.exists()


def test_wrong_shapes_and_labels_are_refused(synth_dir):
    path = synth_dir / DIRNAME / "data_batch_2"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(UserError, match=r"data_batch_2 .*expected \[n, 3072\]"):
        load_cifar10(synth_dir, download=False)
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, f)
    with pytest.raises(UserError, match=r"data_batch_2 has labels outside 0\.\.9"):
        load_cifar10(synth_dir, download=False)
    with open(path, "wb") as f:
        pickle.dump({b"labels": [0]}, f)
    with pytest.raises(UserError, match=r"data_batch_2 lacks the key b'data'"):
        load_cifar10(synth_dir, download=False)


# ---------------------------------------------------------------------------------------------- missing data


def test_missing_directory_without_download(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar10(tmp_path / "nowhere", download=False)
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / DIRNAME) in msg
    assert "cifar-10-python.tar.gz" in msg and "--synthetic" in msg


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"
    monkeypatch.setenv("RETHINK_CIFAR10_URL", url)
    with pytest.raises(UserError) as e:
        load_cifar10(tmp_path / "d")
    msg = str(e.value)
    assert url in msg and str(tmp_path / "d" / DIRNAME) in msg
    assert "RETHINK_CIFAR10_URL" in msg and "--synthetic" in msg
    assert not (tmp_path / "d" / DIRNAME).exists()


# ---------------------------------------------------------------------------------------------- preprocessing

N_VALUES = 3 * 28 * 28  # 2352


def _reference(images: np.ndarray, top: int = 2, left: int = 2) -> np.ndarray:
    """The paper's preprocessing written out directly in NumPy (float64)."""
    x = images[:, :, top : top + 28, left : left + 28].astype(np.float64) / 255.0
    flat = x.reshape(len(x), -1)
    mean = flat.mean(axis=1, keepdims=True)
    std = np.sqrt(((flat - mean) ** 2).mean(axis=1, keepdims=True))
    return ((flat - mean) / np.maximum(std, 1.0 / math.sqrt(N_VALUES))).reshape(x.shape)


def test_preprocess_matches_direct_computation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 3, 32, 32), dtype=np.uint8)
    images[1] //= 8  # a low-contrast image
    images[2, :, 2:30, 2:30] = 0  # border pixels must not count
    images[2, 0, 10, 10] = 1  # a near-constant crop: std below 1/sqrt(2352), the guard is active
    out = preprocess(torch.from_numpy(images))
    assert out.shape == (6, 3, 28, 28) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _reference(images), rtol=1e-5, atol=1e-5)
    flat = out.reshape(6, -1).double()
    assert torch.allclose(flat[[0, 1, 3]].mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        flat[[0, 1, 3]].std(1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4
    )
    assert flat[2].abs().max() > 0  # guarded, but not zero: (x - mean) / (1/sqrt(2352))


def test_standardize_matches_direct_computation():
    x = torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    ref = x.double().reshape(4, -1)
    ref = (ref - ref.mean(1, keepdim=True)) / ref.std(1, unbiased=False, keepdim=True).clamp(
        min=N_VALUES**-0.5
    )
    torch.testing.assert_close(standardize(x), ref.reshape(x.shape).float(), rtol=1e-5, atol=1e-5)


def test_constant_image_standardizes_to_zeros():
    """std is 0, so the guard 1/sqrt(2352) divides: zeros up to float32 rounding of the mean, never inf/nan."""
    for value in (0, 77, 255):
        x = torch.full((2, 3, 32, 32), value, dtype=torch.uint8)
        out = preprocess(x)
        assert out.shape == (2, 3, 28, 28) and torch.isfinite(out).all()
        assert out.abs().max() < 1e-5
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[0, :, :2] = 255  # the border is cropped away: the crop is still constant
    assert preprocess(x).abs().max() < 1e-5


def test_preprocess_all_equals_preprocess():
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(10, 3, 32, 32), dtype=np.uint8))
    torch.testing.assert_close(preprocess_all(x, batch=3), preprocess(x))


# ---------------------------------------------------------------------------------------------- crops


def _position_images(n: int) -> torch.Tensor:
    """Images whose value encodes (image, channel, row, column): a crop's origin can be read off its pixels."""
    i, c, r, k = np.meshgrid(np.arange(n), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return torch.from_numpy(i * 100_000 + c * 10_000 + r * 100 + k)


def test_central_crop_is_rows_and_columns_2_to_29():
    x = _position_images(2)
    out = crop(x)
    assert out.shape == (2, 3, 28, 28)
    assert out[1, 2, 0, 0] == 1 * 100_000 + 2 * 10_000 + 2 * 100 + 2
    assert out[0, 1, 27, 27] == 1 * 10_000 + 29 * 100 + 29
    torch.testing.assert_close(out, x[:, :, 2:30, 2:30])


def test_random_crops_stay_inside_and_match_slices():
    n = 400
    gen = torch.Generator().manual_seed(0)
    offsets = random_offsets(n, gen, "cpu")
    assert offsets.shape == (n, 2)
    assert offsets.min() == 0 and offsets.max() == 4  # every 28x28 window of a 32x32 image, and only those
    assert len({tuple(o) for o in offsets.tolist()}) == 25  # all 5x5 windows occur
    x = _position_images(n)
    out = crop(x, offsets)
    assert out.shape == (n, 3, 28, 28)
    for i in range(n):
        r, c = offsets[i].tolist()
        assert torch.equal(out[i], x[i, :, r : r + 28, c : c + 28])
    # the crop's top-left pixel reveals the window each image got: they differ per image
    origins = {(int(v) // 100 % 100, int(v) % 100) for v in out[:, 0, 0, 0]}
    assert len(origins) == 25
    again = random_offsets(n, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(offsets, again)
    assert not torch.equal(offsets, random_offsets(n, torch.Generator().manual_seed(1), "cpu"))


def test_centre_offsets_give_the_central_crop_and_preprocess_uses_offsets():
    images = np.random.default_rng(3).integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    x = torch.from_numpy(images)
    centre = torch.full((3, 2), 2, dtype=torch.int64)
    torch.testing.assert_close(crop(x, centre), crop(x))
    offsets = torch.tensor([[0, 4], [4, 0], [1, 3]])
    out = preprocess(x, offsets).numpy()
    for i, (r, c) in enumerate(offsets.tolist()):
        np.testing.assert_allclose(out[i], _reference(images[i : i + 1], r, c)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- central crops made by the loader


def test_loader_central_crops_are_the_float_windows_and_are_taken_once(synth_dir):
    data = load_cifar10(synth_dir, central_crops=True)
    assert load_cifar10(synth_dir).crops is None  # only when asked
    train, test = data.crops.take()
    assert train.dtype == np.float32 and train.flags.c_contiguous and train.shape == (100, 3, 28, 28)
    np.testing.assert_array_equal(train, data.train_x[:, :, 2:30, 2:30].astype(np.float32))
    np.testing.assert_array_equal(test, data.test_x[:, :, 2:30, 2:30].astype(np.float32))
    assert data.crops.take() is None  # one run's: a second taker preprocesses for itself


def test_standardize_crops_is_preprocess_all_bit_for_bit():
    from rethink.data.cifar import central_crop_float
    from rethink.data.preprocess import standardize_crops_

    x = np.random.default_rng(5).integers(0, 256, size=(11, 3, 32, 32), dtype=np.uint8)
    x[3] = 17  # a constant image: the guard of the standardization
    out = standardize_crops_(torch.from_numpy(central_crop_float(x)), batch=4)
    assert torch.equal(out, preprocess_all(torch.from_numpy(x), batch=4))
    assert torch.equal(out, preprocess_all(torch.from_numpy(x)))  # chunking changes no bit either
