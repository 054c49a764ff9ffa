"""float32 against bf16, from run records alone: every finished bf16 run in results/runs whose float32 twin (the
same spec, precision float32) is there too. Draws their curves side by side (results/precision/) and
writes the comparison into docs/protocol.md between its `<!-- precision:start -->` and `<!-- precision:end -->`
markers. Run by render.sh."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from rethink.spec import RunSpec  # noqa: E402

RUNS, OUT = HERE / "runs", HERE / "precision"
PROTOCOL = ROOT / "docs" / "protocol.md"
START, END = "<!-- precision:start -->", "<!-- precision:end -->"


def finished(run_dir: Path) -> tuple[RunSpec, dict, list[dict]] | None:
    if not (run_dir / "result.json").exists():
        return None
    spec = RunSpec.from_json((run_dir / "spec.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return spec, json.loads((run_dir / "result.json").read_text()), metrics


def pairs(runs_dir: Path = RUNS) -> list[tuple]:
    """[(float32 run, bf16 run)], each (spec, result, metrics)."""
    runs = {d.name: r for d in sorted(runs_dir.iterdir()) if (r := finished(d))}
    found = []
    for spec, result, metrics in runs.values():
        twin = spec.replace(precision="float32").run_id
        if spec.precision == "bf16" and twin in runs:
            found.append((runs[twin], (spec, result, metrics)))
    return found


def first(metrics: list[dict], key: str, threshold: float) -> int | None:
    return next((m["epoch"] for m in metrics if m[key] >= threshold), None)


def mean_epoch_seconds(metrics: list[dict]) -> float:
    return sum(m["epoch_seconds"] for m in metrics) / len(metrics)


def draw(name: str, a: tuple, b: tuple, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for (_, _, metrics), style, label in ((a, "-", "float32"), (b, "--", "bf16 autocast")):
        epochs = [m["epoch"] for m in metrics]
        axes[0].semilogy(epochs, [m["train_loss"] for m in metrics], style, label=label)
        axes[1].plot(epochs, [100 * m["train_acc"] for m in metrics], style, label=label)
        axes[2].plot(epochs, [100 * m["test_acc"] for m in metrics], style, label=label)
    for ax, title in zip(axes, ("training loss (epoch mean)", "training accuracy (%)", "test accuracy (%)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.suptitle(f"{a[0].label()}: float32 and its bf16 twin (real CIFAR-10)", fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        with plt.rc_context({"svg.hashsalt": name}):  # fixed element ids: the same records give the same bytes
            fig.savefig(out / f"{name}.{ext}", dpi=110, metadata={"Date": None} if ext == "svg" else None)
    plt.close(fig)


def row(a: tuple, b: tuple) -> list[str]:
    out = []
    for label, (s, r, m) in (("float32", a), ("bf16", b)):
        e = r["environment"]
        out.append(f"| {label} | `{s.run_id}` | {100 * r['final_train_acc']:.2f} | {100 * r['final_test_acc']:.2f} | "
                   f"{100 * r['best_test_acc']:.2f} (epoch {r['best_test_epoch']}) | {first(m, 'train_acc', 0.99)} | "
                   f"{first(m, 'train_acc', 1.0)} | {r['loss_threshold_steps'].get('0.01')} | "
                   f"{mean_epoch_seconds(m):.1f} | {e['device_name']}, {e['threads']} threads, torch {e['torch']}, "
                   f"git {e['git']} |")  # fmt: skip
    return out


def section(runs_dir: Path = RUNS, out: Path = OUT, link: str = "../results/precision") -> list[str]:
    found = pairs(runs_dir)
    if not found:
        return ["No bf16 run with its float32 twin in results/ yet."]
    lines = []
    for a, b in found:
        name = f"{a[0].model}-{a[0].run_id}-vs-{b[0].run_id}"
        draw(name, a, b, out)
        diff = 100 * (b[1]["final_test_acc"] - a[1]["final_test_acc"])
        lines += [
            f"**{a[0].label()}**, {a[0].epochs} epochs each, the same seed (initialization, data order, the same data: "
            f"{a[1]['data']['description']}): final test accuracy bf16 - float32 = **{diff:+.2f} points**.",
            "",
            f"![float32 and bf16 curves]({link}/{name}.svg)",
            "",
            "| precision | run | final train acc % | final test acc % | best test acc % | epoch to 99% train acc | "
            "epoch to 100% | step to loss < 0.01 | s per epoch | where |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *row(a, b),
            "",
        ]
    return lines


def main() -> None:
    text = PROTOCOL.read_text()
    if START not in text or END not in text:
        sys.exit(f"{PROTOCOL}: no {START} ... {END} markers")
    body = "\n".join(section())
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda m: f"{START}\n{body}\n{END}", text, flags=re.S)
    PROTOCOL.write_text(text)
    print(f"wrote the float32-vs-bf16 comparison into {PROTOCOL.relative_to(ROOT)} ({len(pairs())} pairs)")


if __name__ == "__main__":
    main()
