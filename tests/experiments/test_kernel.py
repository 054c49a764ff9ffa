"""Minimum-norm kernel interpolation: it interpolates, its norm is sqrt(trace(alpha^T K alpha)), l2 shrinks it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from rethink.cli import main
from rethink.data.synthetic import write_synthetic
from rethink.errors import UserError
from rethink.experiments import kernel as kr


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel-data")
    write_synthetic(out, 300, 100, seed=0)
    return out


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 30, generator=g, dtype=torch.float64)
    x_test = torch.randn(40, 30, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (80,), generator=g)
    y_test = torch.randint(0, 10, (40,), generator=g)
    gamma = kr.median_gamma(x, seed=0)
    return (
        kr.gaussian_kernel(x, x, gamma, torch.float64),
        kr.gaussian_kernel(x_test, x, gamma, torch.float64),
        y,
        y_test,
    )


def test_gaussian_kernel_matches_a_direct_computation():
    x, z = torch.randn(50, 7, dtype=torch.float64), torch.randn(20, 7, dtype=torch.float64)
    d2 = ((z[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    assert torch.allclose(kr.gaussian_kernel(z, x, 0.3, torch.float64), torch.exp(-0.3 * d2))
    assert 1 / kr.median_gamma(x, seed=0) == pytest.approx(float(torch.pdist(x).square().median()))


def test_interpolates_and_the_norm_is_sqrt_trace_alpha_k_alpha(problem):
    k, k_test, y, y_test = problem
    score = kr.fit_and_score(k, k_test, y, y_test, l2=0.0)
    assert score["train_error_pct"] == 0.0 and score["residual"] < 1e-8
    kn, yn = k.numpy(), np.eye(10)[y.numpy()]
    alpha = np.linalg.solve(kn, yn)
    assert score["norm"] == pytest.approx(np.sqrt(np.trace(alpha.T @ kn @ alpha)), rel=1e-8)
    expected = 100 * np.mean((k_test.numpy() @ alpha).argmax(1) != y_test.numpy())
    assert score["test_error_pct"] == pytest.approx(expected)


def test_l2_regularization_lowers_the_norm(problem):
    k, k_test, y, y_test = problem
    norms = [kr.fit_and_score(k, k_test, y, y_test, l2)["norm"] for l2 in (0.0, 0.01, 0.1, 1.0)]
    assert all(a > b for a, b in zip(norms, norms[1:], strict=False)), norms


def test_random_conv_kernel_is_the_gram_matrix_of_its_features_whatever_the_filter_block(monkeypatch):
    x = torch.randn(12, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    k, k_test = kr.random_conv_kernels(x[:8], x[8:], 10, seed=0, dtype=torch.float64, log=print)
    feats = kr.conv_features(x, kr.random_filters(10, 0, x.device)).double()
    assert feats.shape == (12, 10 * kr.POOL_GRID**2)
    gram = feats @ feats[:8].T
    scale = gram[:8].diagonal().mean()
    assert torch.allclose(k, gram[:8] / scale) and torch.allclose(k_test, gram[8:] / scale)
    assert k.diagonal().mean() == pytest.approx(1.0)
    monkeypatch.setattr(kr, "FILTER_BLOCK", 3)
    k3, _ = kr.random_conv_kernels(x[:8], x[8:], 10, seed=0, dtype=torch.float64, log=print)
    assert torch.allclose(k, k3)


def test_memory_check_refuses_a_kernel_that_cannot_fit(monkeypatch):
    monkeypatch.setattr(kr, "_available_bytes", lambda device: 16 << 30)
    kr.check_memory(20_000, 10_000, torch.float64, torch.device("cpu"))  # 7.5 GiB: fits
    with pytest.raises(UserError, match="needs 41.0 GiB"):
        kr.check_memory(50_000, 10_000, torch.float64, torch.device("cpu"))


def test_cli_writes_csv_markdown_and_figure_and_merges_reruns(tiny_data, tmp_path, capsys):
    store = tmp_path / "store"
    args = ["kernel", "--data-dir", str(tiny_data), "--store", str(store), "--n-train", "200", "--n-test", "100",
            "--filters", "64", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--l2", "0", "0.1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["features"], r["l2"]) for r in rows] == [
        ("gaussian", 0.0), ("gaussian", 0.1), ("random-conv", 0.0), ("random-conv", 0.1)
    ]  # fmt: skip
    for r in rows:
        assert r["synthetic"] is True
        if r["l2"] == 0.0:
            assert r["train_error_pct"] == 0.0  # it interpolates
    by = {(r["features"], r["l2"]): r for r in rows}
    assert by[("gaussian", 0.1)]["norm"] < by[("gaussian", 0.0)]["norm"]
    assert by[("random-conv", 0.1)]["norm"] < by[("random-conv", 0.0)]["norm"]
    assert by[("random-conv", 0.0)]["paper_test_error_pct"] == 17.0
    assert by[("random-conv", 0.1)]["paper_test_error_pct"] == 15.0

    report = store / "reports/kernel"
    table = pd.read_csv(report / "kernel.csv")
    assert len(table) == 4 and set(kr.COLUMNS) <= set(table.columns)
    assert (report / "kernel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report / "kernel.md").read_text()
    assert "SYNTHETIC" in md and "| 46 |" in md and "norm" in md

    # The same configuration again replaces its row; a new one is added beside the others.
    assert main([*args, "--features", "gaussian", "--l2", "0"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert len(pd.read_csv(report / "kernel.csv")) == 4
    assert main([*args, "--features", "gaussian", "--l2", "1"]) == 0
    assert len(pd.read_csv(report / "kernel.csv")) == 5


def test_cli_refuses_too_few_features_to_interpolate(tiny_data, tmp_path, capsys):
    code = main(["kernel", "--data-dir", str(tiny_data), "--store", str(tmp_path), "--features", "random-conv",
                 "--n-train", "200", "--n-test", "50", "--filters", "10", "--l2", "0"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot interpolate with --l2 0" in err[0]
    assert not (tmp_path / "reports").exists()
