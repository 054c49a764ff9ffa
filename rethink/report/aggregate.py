"""Aggregation: a suite's runs in the store -> every component's section (figures, tables, their data as CSV)
and a self-contained report, written to `reports/<suite>/` in the same store (local or S3).

Whatever runs exist are drawn; the missing, partial, failed and damaged ones are listed with what they need.
A section renderer is the experiment's own (experiments/*, Component.render); it gets an experiments.kit.Context.
"""

from __future__ import annotations

import json

from rethink import suites
from rethink.experiments.kit import OVERFIT_THRESHOLD, Context, Section, md_escape, md_table, needs
from rethink.paper import DEFAULT_LR, DISPLAY
from rethink.report.html import SYNTHETIC_BANNER, to_html
from rethink.spec import EPOCH_CAP, RunSpec
from rethink.store import Store
from rethink.store.runs import RunStatus, read_metrics, run_state

UNOFFICIAL_BANNER = "Data not verified against the official CIFAR-10 checksums."


def _load(store: Store, specs: list[RunSpec]) -> tuple[dict[str, RunStatus], dict, dict]:
    """Each run's state (the one reading: store.runs.run_state), its per-epoch metrics and its result."""
    states = {s.run_id: run_state(store, s) for s in specs}
    metrics = {s.run_id: read_metrics(store, s.run_id) for s in specs}
    results = {rid: st.result for rid, st in states.items()}
    return states, metrics, results


def _protocol(specs: list[RunSpec], o: suites.Options, overfit_threshold: float) -> str:
    def values(attr) -> str:
        return ", ".join(sorted({f"{getattr(s, attr):g}" if isinstance(getattr(s, attr), float)
                                 else str(getattr(s, attr)) for s in specs}))  # fmt: skip

    caps = {
        m: sorted({s.epochs for s in specs if s.model == m}) for m in dict.fromkeys(s.model for s in specs)
    }
    subsets = sorted({(s.train_subset, s.test_subset) for s in specs}, key=str)
    models = {s.model for s in specs}
    crop = "random crop: a 28x28 window per image per epoch; " if any(s.random_crop for s in specs) else ""
    items = [
        f"batch size {values('batch_size')}; SGD momentum {values('momentum')}",
        "initial learning rate "
        + ", ".join(f"{DISPLAY[m]} {DEFAULT_LR[m]:g}" for m in DEFAULT_LR if m in models or not models)
        + f"; multiplied by {values('lr_decay')} after every epoch",
        *([f"weight decay, when on: {suites.WEIGHT_DECAY:g} (coupled L2 added to the gradient) on the kernels of "
           "convolutional and linear layers only, not on biases or BatchNorm offsets"]
          if any(s.weight_decay for s in specs) or not specs else ["weight decay: none in these runs"]),
        f"preprocessing: central 28x28 crop and per-image standardization; {crop}evaluation always uses the "
        "central crop",
        "test labels: always the true labels (corruptions touch the training labels only)",
        f"time to overfit: the step count at the first epoch end with training accuracy >= "
        f"{100 * overfit_threshold:g}% (evaluated on the whole training set, float32 logits)",
        f"epoch cap of the paper suites: {EPOCH_CAP} for every model; in this report: "
        + "; ".join(f"{m} {', '.join(map(str, c))}" for m, c in caps.items()),
        "stopping: "
        + ("every run trains to its epoch cap (accuracies after convergence)"
           if all(s.target_train_acc is None for s in specs)
           else "runs with a target stop at the first epoch end reaching it ("
           + ", ".join(sorted({f"{100 * s.target_train_acc:g}%" for s in specs if s.target_train_acc}))
           + "), the others at their cap: accuracies are not all after convergence"),
        *(["Small AlexNet LRN: size 9, alpha 1e-3, beta 0.75, k 1"] if "alexnet" in models or not models else []),
        *(["Small Inception BatchNorm without scale (no affine parameters, a learned per-channel offset after it); "
           "PyTorch defaults momentum 0.1, eps 1e-5"] if "inception" in models or not models else []),
        f"seeds: {o.seeds}; data sets: {values('dataset')}",
    ]
    if subsets != [(None, None)]:
        items.append(
            "subsets (train/test images): " + ", ".join(f"{a or 'all'}/{b or 'all'}" for a, b in subsets)
        )
    return "".join(f"- {i}\n" for i in items) + "\nAll choices are listed in docs/protocol.md.\n"


def _environment(results: dict) -> str:
    envs: dict[str, list] = {}
    for r in results.values():
        if r is not None:
            env = r.get("environment") or {}
            envs.setdefault(json.dumps(env, sort_keys=True), []).append(r)
    if not envs:
        return "No finished runs yet.\n"
    keys = [
        "device",
        "device_name",
        "torch",
        "python",
        "rethink",
        "git",
        "threads",
        "cpu_capability",
        "precision",
        "channels_last",
        "compile",
    ]
    rows = []
    for text, rs in envs.items():
        env = json.loads(text)
        rows.append([env.get(k, "") for k in keys] + [len(rs)])
    data = sorted({data_line(r.get("data")) for r in results.values() if r is not None})
    text = md_table(keys + ["runs"], rows) + "\n\nData: " + "; ".join(data) + "\n"
    resumed = [r for r in results.values() if r is not None and len(r.get("environments") or []) > 1]
    if resumed:  # the table shows where each finished; these trained in more than one environment
        text += "\nResumed in another environment (the table shows the last):\n\n" + "".join(
            f"- {r['run_id']}: " + "; then ".join(_segment(e, keys) for e in r["environments"]) + "\n"
            for r in resumed)  # fmt: skip
    return text


def _segment(env: dict, keys: list[str]) -> str:
    """One environment a run trained in, from the step it took over at."""
    what = ", ".join(f"{k} {env[k]}" for k in keys if k in env and k != "device_name")
    return f"from step {env.get('from_step', 0)}: {env.get('device_name', env.get('device', '?'))} ({what})"


def data_line(data) -> str:
    """A result's data provenance in one line: what it was and the md5 of each file read."""
    if not isinstance(data, dict):
        return str(data or "")
    md5 = data.get("file_md5") or {}
    files = ", ".join(f"{name} {digest}" for name, digest in md5.items())
    return data.get("description", data.get("identity", "")) + (f" (md5: {files})" if files else "")


def _status(specs: list[RunSpec], states: dict[str, RunStatus], selection=None) -> tuple[str, dict]:
    counts: dict[str, int] = {}
    lines, unselected = [], []
    for s in specs:
        state, detail = states[s.run_id].state, states[s.run_id].detail
        if state == "not started" and selection is not None and s not in selection:
            unselected.append(s)
            state = "not selected"
        counts[state] = counts.get(state, 0) + 1
        if state not in ("finished", "not selected"):
            lines.append(f"- `{s.run_id}` **{state}**: {s.label()} ({', '.join(s.tags)})"
                         + (f": {md_escape(detail)}" if detail else ""))  # fmt: skip
    summary = ", ".join(f"{n} {st}" for st, n in counts.items())
    if not lines and not unselected:
        return f"All {len(specs)} runs finished.\n", counts
    text = f"{summary} of {len(specs)} runs. Figures and tables use the finished runs only."
    if unselected:
        by_model: dict[str, list[RunSpec]] = {}
        for s in unselected:
            by_model.setdefault(s.model, []).append(s)
        text += (f"\n\nNot selected for this store ({selection.describe()}), so not run: "
                 + "; ".join(f"{len(v)} runs of {DISPLAY[m]}, {needs(v)}" for m, v in by_model.items()) + ".")
    if lines:
        text += " These are not finished:\n\n" + "\n".join(lines)
    return text + "\n", counts  # fmt: skip


def report_prefix(suite: str, dataset: str) -> str:
    """Where a suite's report goes in the store: reports/<suite>/ for CIFAR-10, reports/synthetic/<suite>/ for
    the synthetic set (the two never overwrite each other)."""
    return f"reports/synthetic/{suite}/" if dataset.startswith("synthetic") else f"reports/{suite}/"


def aggregate(store: Store, suite: str, o: suites.Options, log=print,
              overfit_threshold: float = OVERFIT_THRESHOLD, selection=None) -> list[str]:  # fmt: skip
    """Render the suite's report (`report_prefix`) from its runs in `store`; returns the keys written."""
    specs_by_component = suites.components(suite, o)
    all_specs = suites.expand(suite, o)
    info = suites.get_suite(suite)
    out = report_prefix(suite, o.dataset)
    states, metrics, results = _load(store, all_specs)
    for st in states.values():
        if st.state == "damaged":
            log(f"warning: {st.detail}")
    errors = {rid: st.detail for rid, st in states.items() if st.state in ("failed", "damaged")}
    written: list[str] = []
    images: dict[str, bytes] = {}
    sections: list[Section] = []
    for component, specs in specs_by_component.items():
        render = suites.COMPONENTS[component].render
        if render is None:
            log(f"note: no report section for component {component!r}; its runs are listed under run status")
            continue
        ids = [s.run_id for s in specs]
        ctx = Context(store=store, suite=suite, out=out, component=component, specs=specs,
                      results={i: results[i] for i in ids}, metrics={i: metrics[i] for i in ids},
                      errors={i: errors[i] for i in ids if i in errors}, log=log,
                      overfit_threshold=overfit_threshold, written=written, images=images)  # fmt: skip
        section = render(ctx)
        if section is not None:
            sections.append(section)

    synthetic = any(s.synthetic for s in all_specs) or any(r and r.get("synthetic") for r in results.values())
    status, counts = _status(all_specs, states, selection)
    n_done = counts.get("finished", 0)
    # No clock: the same records render to the same bytes (results/ is re-rendered and diffed).
    last = max((r["finished_at"] for r in results.values() if r and r.get("finished_at")), default=None)
    head = [f"# Rethinking generalization: suite `{suite}`", ""]
    if synthetic:
        head += [f"> **{SYNTHETIC_BANNER}**", ""]
    unofficial = sum(1 for r in results.values() if r and not r.get("synthetic") and isinstance(r.get("data"), dict)
                     and r["data"].get("official_md5") is False)  # fmt: skip
    if unofficial:
        head += [f"> **{UNOFFICIAL_BANNER}** {unofficial} of the runs read data files whose md5 checksums are not "
                 "the official release's (their check was skipped, `--no-verify-data`); each file's md5 is under "
                 "Environment.", ""]  # fmt: skip
    head += [
        f"{info.description[:1].upper() + info.description[1:]}. {n_done} of {len(all_specs)} runs finished"
        f"{f' (the last at {last})' if last else ''}; rendered from {store.where()}.",
        "",
        "Reproduction of Zhang, Bengio, Hardt, Recht and Vinyals, *Understanding Deep Learning Requires "
        "Rethinking Generalization* (ICLR 2017), CIFAR-10 experiments.",
        "",
    ]
    parts = list(head)
    for sec in sections:
        parts += [f"## {sec.title}", ""]
        parts += [f"![{name.rsplit('.', 1)[0]}]({name})\n" for name in sec.figures]
        parts += [sec.body.rstrip(), ""]
    parts += ["## Protocol choices", "", _protocol(all_specs, suites.options_for(info, o), overfit_threshold).rstrip(), ""]
    parts += ["## Environment", "", _environment(results).rstrip(), ""]
    parts += ["## Run status", "", status.rstrip(), ""]
    markdown = "\n".join(parts)

    def write(name: str, text: str) -> None:
        key = out + name
        store.write_text(key, text)
        written.append(key)
        log(f"wrote {store.where(key)}")

    write("report.md", markdown)
    write("report.html", to_html(markdown, images, title=f"rethink report: {suite}"))
    return written
