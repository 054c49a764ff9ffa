"""The paper's numbers and the data's checksums, typed in here once, from the paper or from torchvision.

Everything below is copied from Zhang et al. 2017 (Table 1, Appendix A, Section 5) or from torchvision's own
CIFAR-10 tables, never from `rethink`'s constants: a changed number in the code fails here. Other test files
import these values rather than typing them again.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
import torchvision
from torch import nn

from rethink import models, paper, suites
from rethink.data import cifar as D
from rethink.data.preprocess import preprocess
from rethink.spec import RunSpec
from rethink.store import LocalStore
from rethink.store.runs import run_key
from rethink.summary import summarize

# Table 1 (CIFAR-10): model, random crop, weight decay, labels, train accuracy %, test accuracy %.
TABLE1 = [
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
# Table 1's parameter counts.
PARAMS = {
    "inception": 1_649_402,
    "inception-nobn": 1_649_402,
    "alexnet": 1_387_786,
    "mlp-3x512": 1_735_178,
    "mlp-1x512": 1_209_866,
}
# Appendix A: initial learning rates, their decay per epoch, momentum; the 28x28x3 central crop.
INITIAL_LR = {"inception": 0.1, "inception-nobn": 0.1, "alexnet": 0.01, "mlp-3x512": 0.01, "mlp-1x512": 0.01}
LR_DECAY, MOMENTUM = 0.95, 0.9
CROP, INPUT_VALUES = 28, 2352
# Section 5, CIFAR-10: test error (%) of the minimum-norm interpolant: Gaussian kernel on pixels; random
# convolutional features; random convolutional features with l2 regularization.
KERNEL_TEST_ERROR = {"gaussian": 46.0, "random-conv": 17.0, "random-conv, l2": 15.0}
# torchvision's CIFAR-10 tables (library constants, not rethink's), and the archive's md5 as the reference gives it.
TORCHVISION_FILE_MD5 = dict(
    [*torchvision.datasets.CIFAR10.train_list, *torchvision.datasets.CIFAR10.test_list,
     (torchvision.datasets.CIFAR10.meta["filename"], torchvision.datasets.CIFAR10.meta["md5"])]
)  # fmt: skip
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"


# ---------------------------------------------------------------------------------------------- Table 1


def test_table1_rows_are_the_papers():
    assert len(paper.TABLE1_ROWS) == 19
    for i, (ours, typed) in enumerate(zip(paper.TABLE1_ROWS, TABLE1, strict=True)):
        assert tuple(ours) == typed, f"Table 1 row {i}"


def test_each_table1_row_trains_the_rows_configuration():
    """The runs behind row i are the paper's configuration of row i, with Appendix A's optimizer."""
    specs = suites.expand("table1", suites.Options(seeds=2))
    for i, (model, crop, wd, labels, _, _) in enumerate(TABLE1):
        rows = [s for s in specs if f"table1:{i}" in s.tags]
        assert sorted(s.seed for s in rows) == [0, 1], i
        for s in rows:
            assert (s.model, s.random_crop, s.weight_decay > 0, s.labels) == (model, crop, wd, labels), i
            assert s.pixels == "none", i
            assert (s.lr, s.lr_decay, s.momentum, s.dropout) == (INITIAL_LR[model], LR_DECAY, MOMENTUM, 0.0), i


def _finished(store: LocalStore, spec: RunSpec, train_acc: float, test_acc: float) -> None:
    """A run of `spec` that ended (at its cap) with these accuracies, as the trainer would leave it."""
    metrics = [{"epoch": 1, "step": 2, "lr": spec.lr, "train_loss": 1.0, "train_acc": train_acc,
                "train_eval_loss": 1.0, "test_loss": 2.0, "test_acc": test_acc, "epoch_seconds": 1.0,
                "train_seconds": 0.8, "eval_seconds": 0.2, "images_per_second": 100.0}]  # fmt: skip
    env = {"device": "cpu", "device_name": "cpu", "torch": "x", "python": "x", "rethink": "x", "threads": 1}
    result = summarize(spec, metrics, "cap", env, "CIFAR-10: fabricated by tests/test_paper.py")
    store.write_text(run_key(spec.run_id, "spec.json"), json.dumps(spec.to_dict()))
    store.write_text(run_key(spec.run_id, "metrics.jsonl"), json.dumps(metrics[0]) + "\n")
    store.write_text(run_key(spec.run_id, "result.json"), json.dumps(result))


def test_the_reports_table1_shows_the_papers_numbers_beside_ours(tmp_path):
    from rethink.report import (
        aggregate as report,  # here, not above: other test files import this one's numbers
    )

    store = LocalStore(tmp_path)
    o = suites.Options(epochs=1)
    specs = suites.expand("table1", o)
    ours = {}  # row -> (train %, test %): distinct per row, so a row shifted or swapped shows
    for spec in specs:
        i = int(next(t for t in spec.tags if t.startswith("table1:")).split(":")[1])
        ours[i] = (50.0 + i, 20.0 + i)
        _finished(store, spec, ours[i][0] / 100, ours[i][1] / 100)
    report.aggregate(store, "table1", o, log=lambda m: None)
    rows = list(csv.DictReader(io.StringIO(store.read_text("reports/table1/table1.csv"))))
    assert len(rows) == len(TABLE1)
    for i, (row, (model, crop, wd, labels, train, test)) in enumerate(zip(rows, TABLE1)):
        assert row["model"] == paper.DISPLAY[model], i
        assert (row["random_crop"], row["weight_decay"], row["labels"]) == (str(crop), str(wd), labels), i
        assert (float(row["paper_train_acc"]), float(row["paper_test_acc"])) == (train, test), i
        assert (float(row["train_acc"]), float(row["test_acc"])) == pytest.approx(ours[i]), i
        assert float(row["train_diff"]) == pytest.approx(ours[i][0] - train, abs=1e-3), i
        assert float(row["test_diff"]) == pytest.approx(ours[i][1] - test, abs=1e-3), i
    md = store.read_text("reports/table1/table1.md")
    for _, _, _, _, train, test in TABLE1:
        assert f"{train:.2f}" in md and f"{test:.2f}" in md


# ---------------------------------------------------------------------------------------------- models


def test_parameter_counts_are_the_papers():
    assert paper.PAPER_PARAMS == PARAMS
    for name, count in PARAMS.items():
        assert sum(p.numel() for p in models.build_model(name).parameters()) == count, name


def test_appendix_a_optimizer_and_input():
    assert paper.DEFAULT_LR == INITIAL_LR
    for name, lr in INITIAL_LR.items():
        spec = RunSpec(model=name)
        assert (spec.lr, spec.lr_decay, spec.momentum) == (lr, LR_DECAY, MOMENTUM), name
    assert (paper.CROP, paper.INPUT_DIM) == (CROP, INPUT_VALUES)
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert preprocess(x).shape == (2, 3, CROP, CROP)


def test_alexnet_lrn_is_the_tensorflow_tutorials():
    """depth_radius 4, bias 1, alpha 0.001/9, beta 0.75 in TensorFlow's terms: a window of 9 channels."""
    lrns = [m for m in models.build_model("alexnet").modules() if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrns) == 2
    for m in lrns:
        # PyTorch divides alpha by the window size, TensorFlow does not: alpha_torch / size = 0.001 / 9.
        assert (m.size, m.alpha / m.size, m.beta, m.k) == (2 * 4 + 1, pytest.approx(0.001 / 9), 0.75, 1.0)


# ---------------------------------------------------------------------------------------------- Section 5


def test_kernel_test_errors_are_the_papers():
    assert paper.PAPER_KERNEL_TEST_ERROR == {
        ("gaussian", False): KERNEL_TEST_ERROR["gaussian"],
        ("random-conv", False): KERNEL_TEST_ERROR["random-conv"],
        ("random-conv", True): KERNEL_TEST_ERROR["random-conv, l2"],
    }


# ---------------------------------------------------------------------------------------------- data


def test_file_md5s_are_torchvisions():
    assert D.FILE_MD5 == TORCHVISION_FILE_MD5
    assert set(D.FILE_MD5) == {*D.TRAIN_FILES, D.TEST_FILE, D.META_FILE}


def test_archive_is_torchvisions():
    assert D.ARCHIVE_MD5 == ARCHIVE_MD5 == torchvision.datasets.CIFAR10.tgz_md5
    assert D.ARCHIVE_URL == torchvision.datasets.CIFAR10.url
    assert D.ARCHIVE_NAME == torchvision.datasets.CIFAR10.filename
    assert D.DIRNAME == torchvision.datasets.CIFAR10.base_folder
