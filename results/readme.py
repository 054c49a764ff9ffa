"""Write the README's results block (between its `<!-- results:start -->` and `<!-- results:end -->` markers) from
the reports in results/reports/: Table 1 with every row, the figures, and what is missing. Run by render.sh."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from rethink.paper import DISPLAY, MODELS

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def cell(mean: str, std: str) -> str:
    if not mean:
        return ""
    return f"{float(mean):.2f}" + (f" ± {float(std):.2f}" if std else "")


def table1() -> list[str]:
    rows = list(csv.DictReader((HERE / "reports" / "table1" / "table1.csv").open()))
    out = ["| model | crop | wd | paper train / test | ours train | ours test | seeds | status |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        name = r["model"] + (", random labels" if r["labels"] == "random" else "")
        yes = {"True": "yes", "False": "no"}
        status = r["status"] if r["status"] != "ok" else "done"
        if status.startswith("missing"):
            status = "not run yet: " + status.split("needs ", 1)[-1]
        out.append(f"| {name} | {yes[r['random_crop']]} | {yes[r['weight_decay']]} | "
                   f"{float(r['paper_train_acc']):.2f} / {float(r['paper_test_acc']):.2f} | "
                   f"{cell(r['train_acc'], r['train_acc_std'])} | {cell(r['test_acc'], r['test_acc_std'])} | "
                   f"{r['n_seeds']} of {r['n_expected']} | {status} |")  # fmt: skip
    return out


def provenance() -> str:
    results = [json.loads(p.read_text()) for p in sorted((HERE / "runs").glob("*/result.json"))]
    devices = sorted({f"{r['environment'].get('device_name') or r['environment']['device']}" for r in results})
    torch = sorted({r["environment"]["torch"] for r in results})
    revs = sorted({r["environment"].get("git", "?") for r in results})
    official = {r["data"].get("official_md5") for r in results if isinstance(r.get("data"), dict)}
    files = ("the official files" if official == {True} else
             "the official images in files whose md5s differ from the release's: see results/README.md")
    return (f"{len(results)} finished runs on real CIFAR-10 ({files}), computed on {', '.join(devices)} with torch "
            f"{', '.join(torch)}, code at {', '.join(revs)}.")  # fmt: skip


def fig1bc_models() -> str:
    """The models Figure 1b/1c draw so far, in the paper's order (read from fig1b.csv, not assumed)."""
    drawn = {r["model"] for r in csv.DictReader((HERE / "reports" / "fig1bc" / "fig1b.csv").open())}
    return ", ".join(DISPLAY[m] for m in MODELS if m in drawn)


def block() -> str:
    models = fig1bc_models()
    return "\n".join([
        START,
        provenance(),
        "",
        "**Table 1** (train / test accuracy, %; ours: mean ± standard deviation over the seeds finished so far; "
        "rendered from `results/reports/table1/table1.csv`):",
        "",
        *table1(),
        "",
        f"| the quickstart on real CIFAR-10 | Figure 1b: time to overfit ({models}) | Figure 1c: test error ({models}) |",
        "|---|---|---|",
        "| ![quickstart](results/reports/quickstart/quickstart.png) | ![fig1b](results/reports/fig1bc/fig1b.png) | "
        "![fig1c](results/reports/fig1bc/fig1c.png) |",
        END,
    ])  # fmt: skip


def main() -> int:
    text = README.read_text()
    if START not in text or END not in text:
        print(f"readme.py: {README} has no {START} ... {END} block", file=sys.stderr)
        return 1
    new = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda m: block(), text, flags=re.S)
    README.write_text(new)
    print(f"updated the results block of {README.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
