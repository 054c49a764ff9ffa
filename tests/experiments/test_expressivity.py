"""Theorem 1's network: exactly 2n + d weights, fits any labeling, and its O(n) solver equals a dense solve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rethink.cli import main
from rethink.data.synthetic import write_synthetic
from rethink.errors import UserError
from rethink.experiments import expressivity as ex
from rethink.paper import INPUT_DIM


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("expressivity-data")
    write_synthetic(out, 600, 200, seed=0)
    return out


def _sorted_problem(n: int, seed: int, t: float = ex.BIAS_POSITION):
    rng = np.random.default_rng(seed)
    z = np.sort(rng.normal(0.0, 48.0, n))
    return z, ex.place_biases(z, t), rng.integers(0, 10, n).astype(np.float64)


def test_random_labels_on_500_points_fit_exactly_with_2n_plus_d_weights():
    n = 500
    x = torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    y = np.random.default_rng(1).integers(0, 10, n)
    net = ex.build_network(x, y, seed=0)
    assert net.a.size == INPUT_DIM and net.b.size == n and net.w.size == n
    assert net.n_params == 2 * n + INPUT_DIM == 3352
    assert np.all(np.diff(net.b) > 0)
    assert np.array_equal(ex.predict_class(net(x)), y)  # 100% training accuracy
    # The literal ReLU layer (no sort-based shortcut) gives the labels too.
    hidden = np.maximum((x.reshape(n, -1).double().numpy() @ net.a)[:, None] - net.b[None, :], 0.0)
    assert np.abs(hidden @ net.w - y).max() < 1e-6


@pytest.mark.parametrize("t", [0.05, 0.1, 0.5])
def test_linear_time_solvers_agree_with_dense_triangular_solves(t):
    z, b, y = _sorted_problem(60, seed=2, t=t)
    a = ex.dense_matrix(z, b)
    assert np.array_equal(a, np.tril(a)) and np.all(np.diag(a) > 0)  # lower triangular, positive diagonal
    w = torch.linalg.solve_triangular(torch.from_numpy(a), torch.from_numpy(y)[:, None], upper=False)[
        :, 0
    ].numpy()
    scale = np.abs(w).max()
    assert np.abs(ex.solve(z, b, y) - w).max() < 1e-9 * scale
    u = np.linalg.solve(a.T, y)
    assert np.abs(ex.solve_transposed(z, b, y) - u).max() < 1e-9 * np.abs(u).max()
    assert np.allclose(ex.matvec(z, b, w), a @ w, rtol=0, atol=1e-9 * scale * np.abs(z).max())
    assert np.allclose(ex.matvec_transposed(z, b, y), a.T @ y)
    assert ex.norm1_A(z, b) == pytest.approx(np.abs(a).sum(0).max())
    exact = np.abs(np.linalg.inv(a)).sum(0).max()
    assert exact / 10 <= ex.norm1_inverse_estimate(z, b) <= exact * (1 + 1e-9)


def test_biases_past_mid_gap_make_the_weights_explode():
    z, _, y = _sorted_problem(60, seed=2)
    big = {t: np.abs(ex.solve(z, ex.place_biases(z, t), y)).max() for t in (0.1, 0.5, 0.9)}
    assert big[0.1] < big[0.5] < 1e-40 * big[0.9]


def test_sort_based_evaluation_equals_the_hidden_layer_everywhere():
    z, b, y = _sorted_problem(80, seed=3)
    w = ex.solve(z, b, y)
    points = np.concatenate([np.random.default_rng(4).normal(0.0, 80.0, 300), z, b, [b[0] - 1.0]])
    assert np.allclose(ex.evaluate(b, w, points), ex.dense_forward(points, b, w), rtol=1e-9, atol=1e-6)


def test_identical_images_are_refused_with_a_clear_error():
    x = torch.randn(5, 3, 28, 28)
    x[3] = x[1]
    with pytest.raises(UserError, match="images 1 and 3 are identical"):
        ex.build_network(x, np.arange(5), seed=0)


def test_cli_reports_full_training_accuracy_and_writes_the_store(tiny_data, tmp_path, capsys):
    store = tmp_path / "store"
    args = ["expressivity", "--n", "500", "--data-dir", str(tiny_data), "--store", str(store)]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == 2 * 500 + INPUT_DIM and report["train_acc"] == 1.0
    assert report["synthetic"] is True and report["labels"] == "random"
    assert 0.0 <= report["test_acc"] <= 1.0 and report["max_residual"] < 1e-3
    saved = json.loads((store / "reports/expressivity/expressivity.json").read_text())
    assert saved["params"] == report["params"]
    assert "SYNTHETIC" in (store / "reports/expressivity/expressivity.md").read_text()

    assert main([*args, "--labels", "true"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("SYNTHETIC DATA") and "100.00%" in text and "3,352 = 2n + d" in text


def test_cli_refuses_more_images_than_the_data_set_has(tiny_data, capsys):
    assert main(["expressivity", "--n", "601", "--data-dir", str(tiny_data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rethink: error: --n must be between 1 and the 600")
