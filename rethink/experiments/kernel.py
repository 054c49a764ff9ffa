"""Linear models (Section 5): the minimum-norm interpolating solution by the kernel trick, K alpha = Y.

Y is the one-hot label matrix (n x 10); the prediction for x is argmax_c sum_i alpha_ic k(x_i, x). With an l2
term the system is (K + lambda I) alpha = Y. Two kernels on the paper's preprocessed images (central 28x28 crop,
per-image standardization; the same preprocessing as training):

- gaussian: k(x, x') = exp(-gamma ||x - x'||^2) on the 2352 pixel values, gamma = 1 / median of the squared
  pairwise distances among (up to) BANDWIDTH_SAMPLE training images: the median heuristic. Since every
  standardized image has ||x||^2 = 2352, this median is about 2 * 2352 * (1 - typical cosine).
- random-conv: F random 5x5x3 filters (i.i.d. Gaussian, each scaled to unit norm), a valid convolution
  (28 -> 24), ReLU, then average pooling onto a 2x2 grid of 12x12 quadrants (as in Coates & Ng's single-layer
  networks): F * 4 features per image. The kernel is linear on those features, scaled so its mean diagonal on
  the training set is 1, which keeps lambda comparable between the two kernels. With F * 4 < n the linear
  kernel has rank < n and cannot interpolate, so lambda = 0 is refused there.

The reported norm is the RKHS norm of the learned function, summed over the ten outputs:
    ||f|| = sqrt(trace(alpha^T K alpha)) = sqrt(sum_c alpha_c^T K alpha_c),
with the kernel K itself (not K + lambda I). Without l2 it is the smallest norm of any interpolant.

Memory: K (n x n) plus its Cholesky factor (in place of a copy) plus the test kernel (m x n). For the full
training set, n = 50,000, that is 2 x 20 GB + 4 GB in float64 or half that in float32: a large GPU, not a laptop.
Kernels are built block by block, so no intermediate is bigger than a block of features or distances.
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from rethink.data.cifar import Cifar10
from rethink.data.preprocess import preprocess_all
from rethink.errors import UserError
from rethink.paper import NUM_CLASSES, PAPER_KERNEL_TEST_ERROR

FEATURES = ("gaussian", "random-conv")
PATCH = 5
POOL_GRID = 2
BANDWIDTH_SAMPLE = 1000
FILTER_BLOCK = 256
BLOCK_BYTES = 256 << 20  # bound on one block of distances
CONV_BLOCK_BYTES = 32 << 20  # conv outputs: small blocks stay in cache (3x faster on a CPU than 256 MB ones)
# Section 5 on CIFAR-10 (full training set, 32,000 random filters): test error in % per (features, l2 > 0).
DTYPES = {"float32": torch.float32, "float64": torch.float64}
KEY = ["dataset", "features", "n_train", "n_test", "filters", "l2", "dtype", "seed"]
COLUMNS = [
    "features", "n_train", "n_test", "filters", "l2", "train_error_pct", "test_error_pct", "norm",
    "paper_test_error_pct", "synthetic", "dataset", "dtype", "device", "seed", "gamma", "residual", "solver",
    "kernel_seconds", "solve_seconds",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- kernels


def median_gamma(x: torch.Tensor, seed: int, sample: int = BANDWIDTH_SAMPLE) -> float:
    """1 / median squared pairwise distance among up to `sample` rows of x [N, D] (the median heuristic)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:sample].to(x.device)
    s = x[idx].double()
    d2 = torch.cdist(s, s).square()
    iu = torch.triu_indices(len(s), len(s), offset=1, device=x.device)
    med = float(d2[iu[0], iu[1]].median()) if len(s) > 1 else 1.0
    if not med > 0:
        raise UserError("all sampled training images are identical after preprocessing: no bandwidth to pick")
    return 1.0 / med


def gaussian_kernel(xa: torch.Tensor, xb: torch.Tensor, gamma: float, dtype: torch.dtype) -> torch.Tensor:
    """exp(-gamma ||a_i - b_j||^2) for rows of xa [A, D] and xb [B, D], built in row blocks."""
    xb = xb.to(dtype)
    nb = (xb * xb).sum(1)
    out = torch.empty(len(xa), len(xb), dtype=dtype, device=xa.device)
    rows = max(1, BLOCK_BYTES // (max(len(xb), 1) * xb.element_size()))
    for i in range(0, len(xa), rows):
        a = xa[i : i + rows].to(dtype)
        d2 = (a * a).sum(1)[:, None] + nb[None, :] - 2 * (a @ xb.T)
        out[i : i + rows] = torch.exp(-gamma * d2.clamp_(min=0))
    return out


def random_filters(count: int, seed: int, device: torch.device) -> torch.Tensor:
    """`count` random 5x5x3 filters, i.i.d. Gaussian entries, each scaled to unit L2 norm."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(count, 3, PATCH, PATCH, generator=g)
    return (w / w.flatten(1).norm(dim=1)[:, None, None, None]).to(device)


def conv_features(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """relu(conv(x, filters)) average-pooled onto a POOL_GRID x POOL_GRID grid, flattened: [N, F * grid^2]."""
    side = x.shape[-1] - PATCH + 1
    per_image = len(filters) * side * side * 4
    rows = max(1, CONV_BLOCK_BYTES // per_image)
    out = [
        F.adaptive_avg_pool2d(F.conv2d(x[i : i + rows], filters).relu_(), POOL_GRID).flatten(1)
        for i in range(0, len(x), rows)
    ]
    return torch.cat(out)


def random_conv_kernels(
    train: torch.Tensor, test: torch.Tensor, filters: int, seed: int, dtype: torch.dtype, log
):
    """Linear kernels on random convolutional features, accumulated over filter blocks: (K_train, K_test)."""
    w = random_filters(filters, seed, train.device)
    k_train = torch.zeros(len(train), len(train), dtype=dtype, device=train.device)
    k_test = torch.zeros(len(test), len(train), dtype=dtype, device=train.device)
    for i in range(0, filters, FILTER_BLOCK):
        block = w[i : i + FILTER_BLOCK]
        f_train = conv_features(train, block).to(dtype)
        f_test = conv_features(test, block).to(dtype)
        k_train.addmm_(f_train, f_train.T)
        k_test.addmm_(f_test, f_train.T)
        done = min(i + FILTER_BLOCK, filters)
        if done < filters and (i // FILTER_BLOCK) % 8 == 7:
            log(f"  random-conv features: {done}/{filters} filters")
    scale = k_train.diagonal().mean()
    return k_train.div_(scale), k_test.div_(scale)


# ---------------------------------------------------------------------------------------------- solving


def solve(k: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, str]:
    """alpha with (K + l2 I) alpha = Y: Cholesky (factor in place of one copy of K), LU if that fails."""
    m = k.clone()
    m.diagonal().add_(l2)
    info = torch.empty((), dtype=torch.int32, device=k.device)
    torch.linalg.cholesky_ex(m, out=(m, info))
    if int(info) == 0:
        return torch.cholesky_solve(y, m), "cholesky"
    m.copy_(k).diagonal().add_(l2)
    alpha, info = torch.linalg.solve_ex(m, y)
    if int(info) != 0 or not torch.isfinite(alpha).all():
        raise UserError(
            f"the kernel system is singular in {str(k.dtype).removeprefix('torch.')} (l2 = {l2}); "
            "use --dtype float64, an --l2 > 0, or (random-conv) more --filters"
        )
    return alpha, "lu"


def fit_and_score(k_train, k_test, y_train, y_test, l2: float) -> dict:
    """Solve for alpha and report train/test error (%), the norm sqrt(trace(alpha^T K alpha)) and the residual."""
    y = F.one_hot(y_train, NUM_CLASSES).to(k_train.dtype)
    alpha, how = solve(k_train, y, l2)
    fitted = k_train @ alpha
    residual = float((fitted + l2 * alpha - y).norm() / y.norm())
    norm = math.sqrt(max(float((alpha * fitted).sum()), 0.0))
    return {
        "train_error_pct": 100 * float(fitted.argmax(1).ne(y_train).double().mean()),
        "test_error_pct": 100 * float((k_test @ alpha).argmax(1).ne(y_test).double().mean()),
        "norm": norm,
        "residual": residual,
        "solver": how,
    }


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(n_train: int, n_test: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, with the numbers, a kernel system that cannot fit: K, its factor and the test kernel."""
    size = torch.finfo(dtype).bits // 8
    need = (2 * n_train * n_train + n_test * n_train) * size
    free = _available_bytes(device)
    if free is not None and need > 0.9 * free:
        raise UserError(
            f"--n-train {n_train} in {str(dtype).removeprefix('torch.')} needs {need / 2**30:.1f} GiB for the kernel, "
            f"its factor and the test kernel; {device} has {free / 2**30:.1f} GiB free: use a smaller --n-train, "
            "--dtype float32, or a device with more memory"
        )


# ---------------------------------------------------------------------------------------------- experiment


def run_kernel(
    data: Cifar10,
    features: list[str],
    n_train: int,
    n_test: int,
    filters: int,
    l2s: list[float],
    dtype: str = "float64",
    device: str = "auto",
    seed: int = 0,
    log=print,
) -> list[dict]:
    """One row per (features, l2): the kernel is built once per feature kind and solved for every l2."""
    from rethink.training.options import resolve_device

    dev = resolve_device(device)
    tdtype = DTYPES[dtype]
    bad = [f for f in features if f not in FEATURES]
    if bad:
        raise UserError(f"unknown --features {bad[0]!r}: use {' or '.join(FEATURES)}")
    if not 1 <= n_train <= len(data.train_y) or not 1 <= n_test <= len(data.test_y):
        raise UserError(
            f"--n-train must be 1..{len(data.train_y)} and --n-test 1..{len(data.test_y)} for {data.path}; "
            f"got {n_train} and {n_test}"
        )
    if any(not (lam >= 0 and math.isfinite(lam)) for lam in l2s):
        raise UserError(f"--l2 values must be finite and >= 0; got {l2s}")
    if "random-conv" in features:
        if filters < 1:
            raise UserError(f"--filters must be at least 1; got {filters}")
        dim = filters * POOL_GRID**2
        if dim < n_train and 0.0 in l2s:
            raise UserError(
                f"{filters} filters give {dim} features < {n_train} training images: the linear kernel has rank "
                f"< n and cannot interpolate with --l2 0; use --filters >= {math.ceil(n_train / POOL_GRID**2)} "
                "or only --l2 values > 0"
            )
    check_memory(n_train, n_test, tdtype, dev)
    log(f"{data.description}; kernels on {dev} in {dtype}")

    train = preprocess_all(torch.from_numpy(data.train_x[:n_train]).to(dev))
    test = preprocess_all(torch.from_numpy(data.test_x[:n_test]).to(dev))
    y_train = torch.from_numpy(data.train_y[:n_train]).to(dev)
    y_test = torch.from_numpy(data.test_y[:n_test]).to(dev)
    rows = []
    for kind in features:
        t0 = time.perf_counter()
        gamma = math.nan
        if kind == "gaussian":
            flat_train, flat_test = train.flatten(1), test.flatten(1)
            gamma = median_gamma(flat_train, seed)
            k_train = gaussian_kernel(flat_train, flat_train, gamma, tdtype)
            k_test = gaussian_kernel(flat_test, flat_train, gamma, tdtype)
        else:
            k_train, k_test = random_conv_kernels(train, test, filters, seed, tdtype, log)
        built = time.perf_counter() - t0
        log(f"  {kind} kernel: {built:.1f} s")
        for lam in l2s:
            t1 = time.perf_counter()
            score = fit_and_score(k_train, k_test, y_train, y_test, lam)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            row = {
                "features": kind,
                "n_train": n_train,
                "n_test": n_test,
                "filters": filters if kind == "random-conv" else 0,
                "l2": float(lam),
                **score,
                "paper_test_error_pct": PAPER_KERNEL_TEST_ERROR.get((kind, lam > 0), math.nan),
                "synthetic": data.synthetic,
                "dataset": data.identity,
                "dtype": dtype,
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "seed": seed,
                "gamma": gamma,
                "kernel_seconds": round(built, 3),
                "solve_seconds": round(time.perf_counter() - t1, 3),
            }
            rows.append(row)
            log(f"  {label(row, False)}: train error {row['train_error_pct']:.2f}%, "
                f"test error {row['test_error_pct']:.2f}%, norm {row['norm']:.4g} (solve {row['solve_seconds']:.1f} s)")  # fmt: skip
        del k_train, k_test
    return rows


# ---------------------------------------------------------------------------------------------- reporting


def label(row: dict, multiline: bool = True, mark_synthetic: bool = True) -> str:
    """A short name for a configuration."""
    parts = [row["features"]]
    if row["features"] == "random-conv":
        parts.append(f"F={int(row['filters'])}")
    parts += [f"n={int(row['n_train'])}", f"l2={row['l2']:g}"]
    if row["synthetic"] and mark_synthetic:
        parts.append("SYNTHETIC")
    return ("\n" if multiline else ", ").join(parts)


def merge_rows(old_csv: str | None, rows: list[dict]):
    """Earlier rows of the store's kernel.csv with the same configuration replaced by the new ones."""
    import pandas as pd

    new = pd.DataFrame(rows, columns=COLUMNS)
    if old_csv:
        old = pd.read_csv(io.StringIO(old_csv))
        if set(KEY) <= set(old.columns):
            keys = set(new[KEY].astype(str).agg("|".join, axis=1))
            old = old[~old[KEY].astype(str).agg("|".join, axis=1).isin(keys)]
            new = pd.concat([old.reindex(columns=COLUMNS), new], ignore_index=True)
    return new.sort_values(
        ["synthetic", "dataset", "features", "n_train", "filters", "l2"], ignore_index=True
    )


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(table) -> str:
    """kernel.md: our errors and norms beside the paper's, and what the norms say about generalization."""
    rows = table.to_dict("records")
    synthetic = any(r["synthetic"] for r in rows)
    lines = ["# Minimum-norm kernel interpolation (Section 5)", ""]
    if synthetic:
        which = "in every row" if all(r["synthetic"] for r in rows) else "in the rows marked so"
        lines += [f"**SYNTHETIC DATA (not CIFAR-10) {which}: these errors say nothing about CIFAR-10 and are "
                  "not comparable with the paper's column.**", ""]  # fmt: skip
    lines += [
        "K alpha = Y with one-hot Y, or (K + l2 I) alpha = Y; norm = sqrt(trace(alpha^T K alpha)) over the ten "
        "outputs. Errors in %. The paper's numbers are for the full CIFAR-10 training set and 32,000 filters; "
        "its l2 strength is not stated.",
        "",
        "| data | features | n train | n test | filters | l2 | train error | test error | paper test error | norm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        data = "SYNTHETIC" if r["synthetic"] else r["dataset"]
        filters = str(int(r["filters"])) if r["features"] == "random-conv" else "-"
        lines.append(
            f"| {data} | {r['features']} | {int(r['n_train'])} | {int(r['n_test'])} | {filters} | {r['l2']:g} | "
            f"{_fmt(r['train_error_pct'], '.2f')} | {_fmt(r['test_error_pct'], '.2f')} | "
            f"{_fmt(r['paper_test_error_pct'], '.0f')} | {_fmt(r['norm'], '.4g')} |"
        )
    lines += ["", "## Does the norm predict generalization?", "",
              "The paper: the minimum-norm interpolant generalizes well for some kernels, but its norm does not "
              "predict how well. On MNIST the norm is about 220 on raw pixels and 390 after a Gabor wavelet "
              "transform, while the wavelet features halve the test error (1.2% -> 0.6%).", ""]  # fmt: skip
    for dataset, group in table.groupby("dataset", sort=False):
        g = group.dropna(subset=["test_error_pct", "norm"])
        if len(g) < 2:
            continue
        small, best = g.loc[g["norm"].idxmin()], g.loc[g["test_error_pct"].idxmin()]
        text = (f"Here ({'SYNTHETIC ' if g['synthetic'].any() else ''}{dataset}, {len(g)} configurations): the "
                f"smallest norm, {small['norm']:.4g}, belongs to {label(small, False)} with "
                f"{small['test_error_pct']:.2f}% test error; the lowest test error, {best['test_error_pct']:.2f}%, "
                f"to {label(best, False)} with norm {best['norm']:.4g}.")  # fmt: skip
        if len(g) >= 3:
            rho = g["norm"].rank().corr(g["test_error_pct"].rank())
            text += f" Rank correlation of norm and test error: {rho:+.2f}."
        lines += [text, ""]
    lines += ["Norms of different kernels live in different spaces: a smaller norm under one kernel is no "
              "promise of a smaller error than a larger norm under another, which is the paper's point.", ""]  # fmt: skip
    return "\n".join(lines)


def figure(table) -> bytes:
    """kernel.png: test error (ours, and the paper's where it has one) and the norm, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_dict("records")
    synthetic = [r["synthetic"] for r in rows]
    names = [label(r, mark_synthetic=not all(synthetic)) for r in rows]  # all synthetic: the title says so
    x = np.arange(len(rows))
    fig, (ax_err, ax_norm) = plt.subplots(
        2, 1, sharex=True, figsize=(max(6.0, 0.9 * len(rows) + 2.5), 7.5), constrained_layout=True
    )
    ax_err.bar(x, [r["test_error_pct"] for r in rows], color="tab:blue", label="test error (ours)")
    ax_err.scatter(
        x, [r["train_error_pct"] for r in rows], marker="_", s=300, color="black", label="train error (ours)"
    )
    paper = [r["paper_test_error_pct"] for r in rows]
    if any(not math.isnan(p) for p in paper):
        ax_err.scatter(x, paper, marker="D", color="tab:red", zorder=3, label="paper, full CIFAR-10")
    ax_err.axhline(90, color="gray", ls=":", lw=1, label="chance (90%)")
    ax_err.set_ylabel("error (%)")
    ax_err.set_ylim(0, 105)
    ax_err.set_title("test error per configuration")
    ax_err.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_norm.bar(x, [r["norm"] for r in rows], color="tab:green")
    ax_norm.set_yscale("log")
    ax_norm.set_ylabel("norm sqrt(trace(alpha^T K alpha))")
    ax_norm.set_title("norm of the solution")
    ax_norm.set_xticks(x, names, fontsize=8)
    if any(synthetic):
        which = "every row" if all(synthetic) else "rows marked so"
        fig.suptitle(f"SYNTHETIC DATA (not CIFAR-10): {which}", color="tab:red", fontweight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_reports(store, rows: list[dict]) -> list[str]:
    """Merge the rows into reports/kernel/kernel.csv and re-render kernel.md and kernel.png from the whole table."""
    table = merge_rows(store.read_text("reports/kernel/kernel.csv"), rows)
    outputs = {
        "reports/kernel/kernel.png": figure(table),
        "reports/kernel/kernel.md": markdown(table).encode(),
        "reports/kernel/kernel.csv": table.to_csv(index=False).encode(),  # last: the table the others show
    }
    for key, data in outputs.items():
        store.write_bytes(key, data)
    return [store.where(k) for k in outputs]


def format_rows(rows: list[dict]) -> str:
    """The terminal table."""
    out = []
    if any(r["synthetic"] for r in rows):
        out.append("SYNTHETIC DATA (not CIFAR-10): these errors say nothing about CIFAR-10")
    out.append(f"{'features':<12}{'filters':>8}{'n_train':>9}{'n_test':>8}{'l2':>9}{'train err':>11}"
               f"{'test err':>10}{'paper':>7}{'norm':>12}{'kernel s':>10}{'solve s':>9}")  # fmt: skip
    for r in rows:
        filters = str(r["filters"]) if r["features"] == "random-conv" else "-"
        paper = _fmt(r["paper_test_error_pct"], ".0f") + (
            "%" if not math.isnan(r["paper_test_error_pct"]) else ""
        )
        out.append(
            f"{r['features']:<12}{filters:>8}{r['n_train']:>9}{r['n_test']:>8}{r['l2']:>9.3g}"
            f"{r['train_error_pct']:>10.2f}%{r['test_error_pct']:>9.2f}%{paper:>7}{r['norm']:>12.4g}"
            f"{r['kernel_seconds']:>10.1f}{r['solve_seconds']:>9.1f}"
        )
    return "\n".join(out)


def run_and_report(data: Cifar10, store: str, as_json: bool, **config) -> int:
    """The `rethink kernel` command: run every configuration (`config`: run_kernel's arguments after the data),
    print the table (or JSON), update the store."""
    import json
    import sys

    from rethink.store import open_store

    store = open_store(store)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows = run_kernel(data, log=log, **config)
    written = write_reports(store, rows)
    log("wrote " + ", ".join(written))
    print(json.dumps(rows, indent=2) if as_json else format_rows(rows))
    return 0
