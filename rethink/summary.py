"""What a run's records say, as pure functions of them (no torch): one epoch's line of metrics.jsonl, the
stopping rule, the first epoch reaching a training accuracy, and the result record."""

from __future__ import annotations

import math
import time

from rethink.spec import RunSpec

# Every result records the first step at which the epoch-end training accuracy reached each of these
# (Figure 1b's time to overfit reads one of them; 99% by default, OVERFIT_THRESHOLD).
ACC_THRESHOLDS = (0.9, 0.95, 0.99, 1.0)

# When a run counts as having fitted its training set, in every section (Figure 1b's time to overfit) [choice]:
# the first epoch end with training accuracy >= 99%, a level every run of the paper's Table 1 reaches (AlexNet
# and MLP 1x512 on random labels end at 99.82% and 99.34%). Every result records 90/95/99/100%
# (ACC_THRESHOLDS); `--overfit-threshold` draws the report from another.
OVERFIT_THRESHOLD = 0.99

TIMING_FIELDS = ("epoch_seconds", "train_seconds", "eval_seconds", "images_per_second")


def epoch_record(epoch: int, step: int, lr: float, vals: list[float], n_train: int, n_test: int,
                 seconds: float, train_seconds: float) -> dict:  # fmt: skip
    """One line of metrics.jsonl from an epoch's host-side numbers.

    vals: [mean train loss, summed train eval loss, train correct, summed test loss, test correct] and, with
    tracked norms, [squared weight norm, mean squared gradient norm].
    """
    rec = {
        "epoch": epoch,
        "step": step,
        "lr": lr,
        "train_loss": vals[0],
        "train_acc": vals[2] / n_train,
        "train_eval_loss": vals[1] / n_train,
        "test_loss": vals[3] / n_test,
        "test_acc": vals[4] / n_test,
        "epoch_seconds": seconds,
        "train_seconds": train_seconds,
        "eval_seconds": seconds - train_seconds,
        "images_per_second": n_train / max(train_seconds, 1e-9),
    }
    if len(vals) > 5:
        rec["weight_norm"] = math.sqrt(vals[5])
        rec["effective_lr"] = lr / vals[5] if vals[5] > 0 else float("inf")
        rec["grad_norm"] = math.sqrt(vals[6])
    return rec


def stop_reason(spec: RunSpec, rec: dict) -> str:
    """'diverged' (non-finite loss), 'target' (training accuracy reached the spec's target), else 'cap'."""
    if not math.isfinite(rec["train_loss"]):
        return "diverged"
    if spec.target_train_acc is not None and rec["train_acc"] >= spec.target_train_acc:
        return "target"
    return "cap"


def first_reached(metrics: list[dict], threshold: float) -> dict | None:
    """The first epoch record whose (epoch-end, whole training set) accuracy is >= threshold, else None."""
    return next((m for m in metrics if m["train_acc"] >= threshold), None)


def summarize(spec: RunSpec, metrics: list[dict], stopped: str, env: dict, data: dict | str,
              environments: list[dict] | None = None) -> dict:  # fmt: skip
    """The result record: final and best accuracies, time to each accuracy and loss threshold, provenance.

    `env` is where the run finished; `environments`, where it trained segment by segment (each environment with
    the step it took over at), is recorded when the run was resumed somewhere else (another machine, thread
    count or commit): its numbers then come from more than one environment."""
    last = metrics[-1]
    best = max(metrics, key=lambda m: m["test_acc"])
    target_step = target_epoch = None
    if spec.target_train_acc is not None:
        hit = first_reached(metrics, spec.target_train_acc)
        if hit:
            target_step, target_epoch = hit["step"], hit["epoch"]
    acc_steps, acc_epochs = {}, {}
    for t in ACC_THRESHOLDS:
        hit = first_reached(metrics, t)
        acc_steps[f"{t:g}"] = hit["step"] if hit else None
        acc_epochs[f"{t:g}"] = hit["epoch"] if hit else None
    thresholds = {}
    for t in spec.loss_thresholds:
        hit = next((m for m in metrics if m["train_loss"] < t), None)
        thresholds[f"{t:g}"] = hit["step"] if hit else None
    return {
        "run_id": spec.run_id,
        "spec": spec.to_dict(),
        "status": "finished",
        "stopped": stopped,  # "target", "cap" or "diverged"
        "epochs": last["epoch"],
        "steps": last["step"],
        "final_train_acc": last["train_acc"],
        "final_train_loss": last["train_loss"],
        "final_test_acc": last["test_acc"],
        "best_test_acc": best["test_acc"],
        "best_test_epoch": best["epoch"],
        "target_train_acc": spec.target_train_acc,
        "target_step": target_step,
        "target_epoch": target_epoch,
        "train_acc_steps": acc_steps,  # threshold -> first step with epoch-end train accuracy >= it
        "train_acc_epochs": acc_epochs,
        "loss_threshold_steps": thresholds,
        "train_seconds": sum(m["train_seconds"] for m in metrics),
        "total_seconds": sum(m["epoch_seconds"] for m in metrics),
        "synthetic": spec.synthetic,
        "data": data,
        "environment": env,
        **({"environments": environments} if environments and len(environments) > 1 else {}),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
