"""Finite-sample expressivity (Section 4, Theorem 1): a two-layer ReLU network with exactly 2n + d weights
that fits any labeling of n training images.

The network is f(x) = sum_j w_j * relu(<a, x> - b_j) with a in R^d (d = 2352), biases b in R^n and output
weights w in R^n: 2n + d parameters. Construction (the paper's proof):
  1. draw a ~ N(0, I_d) until the projections z_i = <a, x_i> are distinct (almost surely the first draw);
  2. sort them, z_1 < ... < z_n, and put one bias in each gap: b_1 < z_1 < b_2 < z_2 < ... < b_n < z_n;
  3. A_ij = relu(z_i - b_j) is lower triangular with a positive diagonal, so A w = y has one solution.

Labels are scalar targets: y_i is the class index (0..9) and the predicted class is round(f(x)) clipped to
0..9. Ten one-hot outputs sharing a and b would need n + d + 10n weights; the theorem's count 2n + d is for
one real-valued output, so that is what is built here.

Nothing of size n x n is formed. Row i of A w = y reads f(z_i) = y_i with f piecewise linear, kinks at the
b_j. Between z_{i-1} and z_i only neuron i switches on, so with the slope S_{i-1} = w_1 + ... + w_{i-1}:
    y_i = y_{i-1} + S_{i-1} (z_i - z_{i-1}) + w_i (z_i - b_i),
which gives every w_i in one O(n) pass. Evaluating f at any point z is a sort-based lookup: with k the
number of biases below z, f(z) = z * S_k - T_k where S, T are prefix sums of w and w * b.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from rethink.data.cifar import Cifar10
from rethink.data.corruptions import corrupt_labels
from rethink.data.preprocess import preprocess_all
from rethink.errors import UserError
from rethink.paper import INPUT_DIM, NUM_CLASSES

BIAS_POSITION = 0.1  # b_i = z_{i-1} + t (z_i - z_{i-1}); see place_biases for why t well below 1/2
MAX_DRAWS = 10
DENSE_CHECK_ROWS = 2000  # training rows re-evaluated with the literal n-unit ReLU layer


# ---------------------------------------------------------------------------------------------- construction


def project(x: torch.Tensor, a: np.ndarray, batch: int = 8192) -> np.ndarray:
    """First layer without biases: z_i = <a, x_i> in float64, for preprocessed images x [N, ...]."""
    at = torch.from_numpy(a)
    out = [
        x[i : i + batch].reshape(min(batch, len(x) - i), -1).double() @ at for i in range(0, len(x), batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


def place_biases(z: np.ndarray, t: float = BIAS_POSITION) -> np.ndarray:
    """Biases interleaved with the sorted projections z: b_i = z_{i-1} + t (z_i - z_{i-1}), b_1 = z_1 - mean gap.

    Why t <= 1/2: the slopes obey S_i = -t/(1-t) S_{i-1} + (y_i - y_{i-1}) / ((1-t)(z_i - z_{i-1})), so for
    t < 1/2 the past is forgotten geometrically, at t = 1/2 it alternates without growing, and for t > 1/2 it
    grows geometrically: the weights (and the rounding) explode.
    """
    if not 0.0 < t < 1.0:
        raise UserError(f"bias position must lie strictly between 0 and 1 (a fraction of each gap); got {t}")
    gaps = np.diff(z)
    first_gap = gaps.mean() if len(gaps) else 1.0
    return np.concatenate([[z[0] - first_gap], z[:-1] + t * gaps])


def solve(z: np.ndarray, b: np.ndarray, y: np.ndarray) -> np.ndarray:
    """w with A w = y for A_ij = relu(z_i - b_j) (sorted z, interleaved b), by O(n) forward substitution."""
    zs, bs, ys = z.tolist(), b.tolist(), np.asarray(y, dtype=np.float64).tolist()
    w = [0.0] * len(zs)
    slope = 0.0  # S_{i-1}
    prev_z = prev_y = 0.0
    for i, (zi, bi, yi) in enumerate(zip(zs, bs, ys, strict=True)):
        # f(z_i) before neuron i: 0 for i = 0, else y_{i-1} plus the straight continuation of the last piece.
        before = prev_y + slope * (zi - prev_z) if i else 0.0
        w[i] = (yi - before) / (zi - bi)
        slope += w[i]
        prev_z, prev_y = zi, yi
    return np.array(w)


def solve_transposed(z: np.ndarray, b: np.ndarray, v: np.ndarray) -> np.ndarray:
    """u with A^T u = v, by O(n) back substitution (only the condition estimate needs it).

    (A^T u)_j = sum_{i>=j} u_i (z_i - b_j), and sum_{i>j} u_i (z_i - b_j) = v_{j+1} + (b_{j+1} - b_j) U_{j+1}
    with U_{j+1} = u_{j+1} + ... + u_n.
    """
    zs, bs, vs = z.tolist(), b.tolist(), np.asarray(v, dtype=np.float64).tolist()
    n = len(zs)
    u = [0.0] * n
    tail = 0.0  # U_{j+1}
    for j in range(n - 1, -1, -1):
        later = vs[j + 1] + (bs[j + 1] - bs[j]) * tail if j < n - 1 else 0.0
        u[j] = (vs[j] - later) / (zs[j] - bs[j])
        tail += u[j]
    return np.array(u)


def evaluate(b: np.ndarray, w: np.ndarray, z: np.ndarray) -> np.ndarray:
    """f(z) = sum_{b_j < z} w_j (z - b_j) = z S_k - T_k for any projections z, sort-based, O((n + m) log n).

    The prefix sums are kept in extended precision (np.longdouble, 80-bit on x86) because z S_k and T_k are
    large and nearly cancel when the weights are large.
    """
    ld = np.longdouble
    s = np.concatenate([[0], np.cumsum(w.astype(ld))])
    t = np.concatenate([[0], np.cumsum(w.astype(ld) * b.astype(ld))])
    k = np.searchsorted(b, z, side="left")  # number of biases strictly below z
    return (z.astype(ld) * s[k] - t[k]).astype(np.float64)


def matvec(z: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A w, i.e. f at the training projections."""
    return evaluate(b, w, z)


def matvec_transposed(z: np.ndarray, b: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A^T u: (A^T u)_j = sum_{i>=j} u_i z_i - b_j sum_{i>=j} u_i, by suffix sums."""
    ld = np.longdouble
    su = np.cumsum(u.astype(ld)[::-1])[::-1]
    suz = np.cumsum((u.astype(ld) * z.astype(ld))[::-1])[::-1]
    return (suz - b.astype(ld) * su).astype(np.float64)


def dense_matrix(z: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A_ij = relu(z_i - b_j) as an n x n array (tests and small n only)."""
    return np.maximum(z[:, None] - b[None, :], 0.0)


def dense_forward(z: np.ndarray, b: np.ndarray, w: np.ndarray, batch: int = 256) -> np.ndarray:
    """The literal hidden layer: relu(z_i - b) @ w row block by row block, O(len(z) * n) time."""
    out = [np.maximum(z[i : i + batch, None] - b[None, :], 0.0) @ w for i in range(0, len(z), batch)]
    return np.concatenate(out) if out else np.zeros(0)


def norm1_A(z: np.ndarray, b: np.ndarray) -> float:
    """||A||_1, the largest column sum: sum_{i>=j} (z_i - b_j), exactly, by suffix sums."""
    n = len(z)
    tail_z = np.cumsum(z[::-1])[::-1]
    return float(np.max(tail_z - (n - np.arange(n)) * b))


def norm1_inverse_estimate(z: np.ndarray, b: np.ndarray, iters: int = 5) -> float:
    """A lower bound on ||A^-1||_1 that is usually exact: Hager's estimator with Higham's extra test vector."""
    n = len(z)
    x = np.full(n, 1.0 / n)
    est = 0.0
    for _ in range(iters):
        y = solve(z, b, x)
        est = max(est, float(np.abs(y).sum()))
        g = solve_transposed(z, b, np.where(y >= 0, 1.0, -1.0))
        j = int(np.argmax(np.abs(g)))
        if abs(g[j]) <= g @ x:
            break
        x = np.zeros(n)
        x[j] = 1.0
    alt = (-1.0) ** np.arange(n) * (1 + np.arange(n) / max(n - 1, 1))
    return max(est, 2 * float(np.abs(solve(z, b, alt)).sum()) / (3 * n))


def fit(z: np.ndarray, y: np.ndarray, t: float = BIAS_POSITION) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Biases and output weights interpolating y at projections z: (order, b, w), b and w in sorted order."""
    order = np.argsort(z, kind="stable")
    zs = z[order]
    if len(zs) > 1 and not np.all(np.diff(zs) > 0):
        raise UserError("projections are not distinct; draw another direction")
    b = place_biases(zs, t)
    return order, b, solve(zs, b, y[order])


def predict_class(f: np.ndarray) -> np.ndarray:
    """The scalar output read as a class: the nearest integer, clipped to 0..9."""
    return np.clip(np.rint(f), 0, NUM_CLASSES - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------- experiment


def _distinct_direction(x: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """A Gaussian direction whose projections of x are pairwise distinct, with the projections and #draws."""
    rng = np.random.default_rng([seed, 4])
    for draw in range(1, MAX_DRAWS + 1):
        a = rng.standard_normal(x[0].numel())
        z = project(x, a)
        order = np.argsort(z, kind="stable")
        ties = np.flatnonzero(np.diff(z[order]) <= 0)
        if not len(ties):
            return a, z, draw
    i, j = sorted(order[ties[0] : ties[0] + 2].tolist())
    same = bool(torch.equal(x[i], x[j]))
    why = f"training images {i} and {j} are identical after preprocessing" if same else "they keep colliding"
    raise UserError(
        f"no direction with distinct projections in {MAX_DRAWS} draws: {why}; "
        "no network of this form can separate identical inputs (use a different --n)"
    )


@dataclass(frozen=True)
class Network:
    """f(x) = sum_j w_j relu(<a, x> - b_j) with increasing biases b: a.size + b.size + w.size = d + 2n weights."""

    a: np.ndarray
    b: np.ndarray
    w: np.ndarray
    draws: int = 1  # directions drawn until the projections were distinct

    @property
    def n_params(self) -> int:
        return self.a.size + self.b.size + self.w.size

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """f on preprocessed images x [N, ...], sort-based."""
        return evaluate(self.b, self.w, project(x, self.a))


def build_network(x: torch.Tensor, y: np.ndarray, seed: int = 0, t: float = BIAS_POSITION) -> Network:
    """The network of Theorem 1 with f(x_i) = y_i for every row of x (targets y: class indices or any reals)."""
    a, z, draws = _distinct_direction(x, seed)
    _, b, w = fit(z, np.asarray(y, dtype=np.float64), t)
    return Network(a, b, w, draws)


def run_expressivity(
    data: Cifar10, n: int, labels: str = "random", seed: int = 0, t: float = BIAS_POSITION
) -> dict:
    """Build the 2n + d network on the first n training images and report counts, accuracies and conditioning."""
    if labels not in ("true", "random"):
        raise UserError(f"bad --labels {labels!r}: use true or random")
    if not 1 <= n <= len(data.train_y):
        raise UserError(
            f"--n must be between 1 and the {len(data.train_y)} training images of {data.path}; got {n}"
        )
    t0 = time.perf_counter()
    x = preprocess_all(torch.from_numpy(data.train_x[:n]))
    y = corrupt_labels(data.train_y[:n], 1.0 if labels == "random" else 0.0, seed)
    t_pre = time.perf_counter()

    net = build_network(x, y, seed, t)
    t_fit = time.perf_counter()

    z = project(x, net.a)
    f_train = evaluate(net.b, net.w, z)  # from the network's parameters alone, on the images again
    order = np.argsort(z, kind="stable")
    zs, ys, b, w = z[order], y[order].astype(np.float64), net.b, net.w
    residual = np.abs(matvec(zs, b, w) - ys)
    rows = np.random.default_rng([seed, 5]).permutation(n)[: min(n, DENSE_CHECK_ROWS)]
    dense = np.abs(dense_forward(zs[rows], b, w) - ys[rows])
    diag = zs - b
    cond = norm1_A(zs, b) * norm1_inverse_estimate(zs, b)
    t_check = time.perf_counter()

    test_x = preprocess_all(torch.from_numpy(data.test_x))
    f_test = net(test_x)
    t_test = time.perf_counter()

    params = net.n_params
    assert params == 2 * n + INPUT_DIM == 2 * n + x[0].numel()
    return {
        "experiment": "expressivity",
        "synthetic": data.synthetic,
        "dataset": data.identity,
        "data": data.description,
        "n": n,
        "d": int(net.a.size),
        "labels": labels,
        "seed": seed,
        "bias_position": t,
        "params": int(params),
        "params_formula": f"2n + d = 2*{n} + {net.a.size}",
        "direction_draws": net.draws,
        "train_acc": float(np.mean(predict_class(f_train) == y)),
        "test_acc": float(np.mean(predict_class(f_test) == data.test_y)) if len(data.test_y) else math.nan,
        "test_n": int(len(data.test_y)),
        "max_residual": float(residual.max()),
        "dense_check_rows": int(len(rows)),
        "dense_max_residual": float(dense.max()),
        "min_gap": float(np.diff(zs).min()) if n > 1 else math.nan,
        "diag_min": float(diag.min()),
        "diag_max": float(diag.max()),
        "diag_ratio": float(diag.max() / diag.min()),
        "cond1_estimate": float(cond),
        "max_abs_weight": float(np.abs(w).max()),
        "seconds": {
            "preprocess": round(t_pre - t0, 3),
            "fit": round(t_fit - t_pre, 3),
            "checks": round(t_check - t_fit, 3),
            "test": round(t_test - t_check, 3),
            "total": round(t_test - t0, 3),
        },
        "env": {"torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads()},
    }


# ---------------------------------------------------------------------------------------------- reporting


def _banner(r: dict) -> str:
    return (
        "SYNTHETIC DATA (not CIFAR-10): these numbers say nothing about CIFAR-10\n" if r["synthetic"] else ""
    )


def format_report(r: dict) -> str:
    """The terminal report."""
    return (
        f"{_banner(r)}"
        f"two-layer ReLU network of Theorem 1 on {r['n']} training images, {r['labels']} labels ({r['data']})\n"
        f"  parameters        {r['params']:,} = {r['params_formula']}\n"
        f"  train accuracy    {100 * r['train_acc']:.2f}%   (class = round(f(x)) clipped to 0..9)\n"
        f"  test accuracy     {100 * r['test_acc']:.2f}%   on {r['test_n']} test images (true labels; chance 10%)\n"
        f"  max |Aw - y|      {r['max_residual']:.3g}   (literal ReLU layer on {r['dense_check_rows']} rows: "
        f"{r['dense_max_residual']:.3g})\n"
        f"  conditioning      cond_1(A) ~ {r['cond1_estimate']:.3g}; diagonal z_i - b_i from {r['diag_min']:.3g} "
        f"to {r['diag_max']:.3g} (ratio {r['diag_ratio']:.3g}); max |w| {r['max_abs_weight']:.3g}\n"
        f"  direction draws   {r['direction_draws']}; bias position {r['bias_position']} of each gap; "
        f"{r['seconds']['total']:.1f} s"
    )


def markdown(r: dict) -> str:
    """The store's expressivity.md."""
    warn = f"**{_banner(r).strip()}**\n\n" if r["synthetic"] else ""
    rows = [
        ("data", r["data"]),
        ("labels", f"{r['labels']} (seed {r['seed']})"),
        ("parameters", f"{r['params']:,} = {r['params_formula']}"),
        ("train accuracy", f"{100 * r['train_acc']:.2f}%"),
        ("test accuracy", f"{100 * r['test_acc']:.2f}% on {r['test_n']} test images (true labels)"),
        ("max residual |Aw - y|", f"{r['max_residual']:.3g}"),
        (
            f"max residual, literal ReLU layer ({r['dense_check_rows']} rows)",
            f"{r['dense_max_residual']:.3g}",
        ),
        ("cond_1(A), estimated", f"{r['cond1_estimate']:.3g}"),
        ("diagonal z_i - b_i: min / max", f"{r['diag_min']:.3g} / {r['diag_max']:.3g}"),
        ("max abs output weight", f"{r['max_abs_weight']:.3g}"),
        ("bias position in each gap", f"{r['bias_position']}"),
        ("time", f"{r['seconds']['total']:.1f} s (torch {r['env']['torch']}, {r['env']['threads']} threads)"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"# Finite-sample expressivity (Theorem 1)\n\n{warn}"
        "A two-layer ReLU network f(x) = sum_j w_j relu(<a, x> - b_j) with 2n + d weights fits every label of the "
        "n training images; the class is round(f(x)) clipped to 0..9 (scalar targets: the theorem's count is for "
        "one output). Test accuracy shows it generalizes to nothing: fitting says nothing about generalizing.\n\n"
        f"| quantity | value |\n|---|---|\n{table}\n"
    )


def run_and_report(data: Cifar10, n: int, labels: str, seed: int, bias_position: float, store: str | None,
                   as_json: bool) -> int:  # fmt: skip
    """The `rethink expressivity` command: run, print the report (or JSON), write it into the store if asked."""
    import json
    import sys

    report = run_expressivity(data, n, labels, seed, bias_position)
    if store:
        from rethink.store import open_store

        store = open_store(store)
        store.write_text("reports/expressivity/expressivity.md", markdown(report))
        store.write_text("reports/expressivity/expressivity.json", json.dumps(report, indent=2) + "\n")
        print(f"wrote {store.where('reports/expressivity/')}expressivity.json and .md", file=sys.stderr)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0
