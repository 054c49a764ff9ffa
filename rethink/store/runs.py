"""A run's files in a store, and its state: the one place that reads and writes them and decides whether a run
is finished, partial, failed or not started. Torch-free (checkpoints are bytes here; rethink/training reads
them)."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass

from rethink.spec import RunSpec
from rethink.store.base import Store

RECORD_FILES = ("spec.json", "metrics.jsonl", "result.json")  # what a finished run's record is (no checkpoints)
CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt")


def run_dir(run_id: str) -> str:
    """The one place a run's folder in a store is spelled: runs/<run id>."""
    return f"runs/{run_id}"


def run_key(run_id: str, name: str) -> str:
    """A file of a run: runs/<run id>/<name>."""
    return f"{run_dir(run_id)}/{name}"


# ---------------------------------------------------------------------------------------------- reading


def read_result(store: Store, run_id: str) -> dict | None:
    """The run's result record, or None while it has not finished.

    A damaged result.json (only damage from outside can make one: writes are atomic) raises DamagedRecord, so
    that every reader says the same thing about it.
    """
    key = run_key(run_id, "result.json")
    text = store.read_text(key)
    if text is None:
        return None
    try:
        result = json.loads(text)
    except ValueError as e:
        raise DamagedRecord(store.where(key), str(e)) from None
    if not isinstance(result, dict) or result.get("run_id") != run_id:
        raise DamagedRecord(store.where(key), "not this run's result record")
    return result


class DamagedRecord(ValueError):
    """A result.json that cannot be read: the message names it and says what to do."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where} is damaged ({why}); training the run again finishes it from its checkpoint")


def read_metrics(store: Store, run_id: str) -> list[dict]:
    """The run's per-epoch records (an unreadable line ends the list: it was never completely written)."""
    text = store.read_text(run_key(run_id, "metrics.jsonl")) or ""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def read_error(store: Store, run_id: str) -> str | None:
    """The message of the run's last failure, or None."""
    text = store.read_text(run_key(run_id, "error.json"))
    if text is None:
        return None
    try:
        return str(json.loads(text).get("error") or "unknown error")
    except (ValueError, AttributeError):
        return "unreadable error.json"


# ---------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class RunStatus:
    """What a store says about one run: 'finished', 'partial', 'failed', 'damaged' or 'not started'."""

    state: str
    detail: str = ""
    result: dict | None = None  # the result record when finished

    @property
    def finished(self) -> bool:
        return self.state == "finished"


def run_state(store: Store, spec: RunSpec) -> RunStatus:
    """The one reading of a run's state, used by train, run, status, export and the report."""
    rid = spec.run_id
    try:
        result = read_result(store, rid)
    except DamagedRecord as e:
        return RunStatus("damaged", str(e))
    if result is not None:
        detail = f"{result.get('epochs')} epochs, stopped at {result.get('stopped')}"
        if isinstance(result.get("final_test_acc"), (int, float)):
            detail += f", test acc {result['final_test_acc']:.4f}"
        return RunStatus("finished", detail, result)
    error = read_error(store, rid)
    if error is not None:
        return RunStatus("failed", error)
    metrics = read_metrics(store, rid)
    if metrics or store.exists(run_key(rid, "checkpoint.pt")):
        return RunStatus("partial", f"epoch {len(metrics)} of {spec.epochs}")
    return RunStatus("not started")


# ---------------------------------------------------------------------------------------------- writing


def write_spec(store: Store, spec: RunSpec) -> None:
    """spec.json, written first (once): the run's folder says what it is before anything else is in it."""
    key = run_key(spec.run_id, "spec.json")
    if not store.exists(key):
        store.write_text(key, json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")


def write_metrics(store: Store, run_id: str, metrics: list[dict]) -> None:
    store.write_text(run_key(run_id, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))


def write_result(store: Store, run_id: str, result: dict) -> None:
    """result.json, written last: from now on the run is finished for every reader."""
    store.write_text(run_key(run_id, "result.json"), json.dumps(result, indent=2) + "\n")
    store.delete(run_key(run_id, "error.json"))


def prune_checkpoints(store: Store, run_id: str, keep: str) -> None:
    """A finished run's checkpoints: keep 'all', the 'last' (checkpoint.pt) or 'none' (records only)."""
    drop = {"all": (), "last": ("checkpoint.prev.pt",), "none": CHECKPOINTS}[keep]
    for name in drop:
        store.delete(run_key(run_id, name))


def record_failure(store: Store, spec: RunSpec, exc: BaseException) -> str:
    """Write error.json for a failed run (best effort: the store may be what failed); returns the message."""
    message = f"{type(exc).__name__}: {exc}"
    payload = {
        "run_id": spec.run_id,
        "error": message,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        store.write_text(run_key(spec.run_id, "error.json"), json.dumps(payload, indent=2) + "\n")
    except Exception:
        pass
    return message
