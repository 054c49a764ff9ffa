"""The run spec: one id per spec in every process, a JSON round trip, and clear errors for bad fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rethink.errors import UserError
from rethink.spec import RunSpec

SPEC = RunSpec(model="mlp-1x512", labels="partial:0.4", epochs=12, dataset="synthetic-n600-m200-s0", seed=3)


def _id_in_fresh_process(spec_json: str, hash_seed: str) -> str:
    code = "import sys; from rethink.spec import RunSpec; print(RunSpec.from_json(sys.stdin.read()).run_id)"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run(
        [sys.executable, "-c", code], input=spec_json, capture_output=True, text=True, env=env, check=True
    )
    return out.stdout.strip()


def test_same_spec_same_id_across_processes():
    text = json.dumps(SPEC.to_dict())
    # Different hash seeds: the id must not depend on anything like set or dict iteration order.
    ids = {_id_in_fresh_process(text, seed) for seed in ("1", "2")}
    assert ids == {SPEC.run_id}
    assert len(SPEC.run_id) == 12 and int(SPEC.run_id, 16) >= 0


def test_id_ignores_how_the_spec_was_written():
    d = SPEC.to_dict()
    assert RunSpec.from_dict(dict(reversed(list(d.items())))).run_id == SPEC.run_id
    # Defaults spelled out resolve to the same spec: the paper's rate, data seed = seed.
    assert SPEC.replace(lr=0.01, data_seed=3).run_id == SPEC.run_id
    # Tags are for reports, not part of what is computed.
    assert SPEC.replace(tags=("fig1b",)).run_id == SPEC.run_id


@pytest.mark.parametrize(
    "change",
    [
        {"model": "mlp-3x512"}, {"labels": "partial:0.5"}, {"labels": "random"}, {"pixels": "shuffled"},
        {"weight_decay": 5e-4}, {"random_crop": True}, {"dropout": 0.3}, {"lr": 0.02}, {"momentum": 0.8},
        {"lr_decay": 1.0}, {"batch_size": 64}, {"epochs": 13}, {"target_train_acc": 1.0},
        {"loss_thresholds": (0.1,)}, {"seed": 4}, {"data_seed": 4}, {"dataset": "cifar10"},
        {"train_subset": 100}, {"test_subset": 100}, {"track_norms": True}, {"precision": "bf16"},
    ],
)  # fmt: skip
def test_different_spec_different_id(change):
    assert SPEC.replace(**change).run_id != SPEC.run_id


def test_a_float32_run_keeps_the_id_it_had_before_precision_was_a_field():
    """Every run recorded before `precision` joined the spec (all float32) keeps its id, and its twin in bf16 is
    another run: the committed records' specs still hash to their folders' names."""
    runs = sorted((Path(__file__).parents[1] / "results" / "runs").glob("*/spec.json"))
    assert runs, "results/runs holds committed records"
    for path in runs:
        spec = RunSpec.from_json(path.read_text())
        if "precision" not in json.loads(path.read_text()):  # written before the field: float32
            assert spec.precision == "float32"
        assert spec.run_id == path.parent.name
        twin = spec.replace(precision="bf16" if spec.precision == "float32" else "float32")
        assert twin.run_id != spec.run_id and ("bf16" in twin.label()) != ("bf16" in spec.label())
        assert RunSpec.from_json(json.dumps(twin.to_dict())).run_id == twin.run_id
    assert any(RunSpec.from_json(p.read_text()).precision == "bf16" for p in runs)  # a bf16 twin is committed


def test_json_round_trip():
    spec = SPEC.replace(tags=("a", "b"), loss_thresholds=(0.1, 0.5), target_train_acc=0.99, weight_decay=5e-4)
    back = RunSpec.from_json(json.dumps(spec.to_dict()))
    assert back == spec and back.run_id == spec.run_id and back.tags == ("a", "b")
    assert json.loads(back.canonical_json()) == json.loads(spec.canonical_json())
    # the canonical form is itself a valid spec
    assert RunSpec.from_json(spec.canonical_json()) == spec


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"model": "resnet"}, ["unknown model", "resnet", "mlp-1x512"]),
        ({"model": "mlp-1x512", "labels": "partial:1.5"}, ["bad label mode", "partial:P"]),
        ({"model": "mlp-1x512", "labels": "noisy"}, ["bad label mode", "noisy"]),
        ({"model": "mlp-1x512", "pixels": "blurred"}, ["bad pixel mode", "shuffled"]),
        ({"model": "mlp-1x512", "precision": "fp16"}, ["bad precision", "fp16", "bf16"]),
        ({"model": "mlp-1x512", "epochs": 0}, ["epochs must be at least 1"]),
        ({"model": "mlp-1x512", "batch_size": 0}, ["batch size"]),
        ({"model": "mlp-1x512", "dropout": 1.0}, ["dropout must be in [0, 1)"]),
        ({"model": "mlp-1x512", "weight_decay": -1}, ["weight decay"]),
        ({"model": "mlp-1x512", "lr": 0}, ["learning rate"]),
        ({"model": "mlp-1x512", "target_train_acc": 1.5}, ["target accuracy"]),
        ({"model": "mlp-1x512", "train_subset": 0}, ["train subset"]),
        ({"model": "mlp-1x512", "learning_rate": 0.1}, ["unknown field", "learning_rate"]),
        ({"labels": "true"}, ["'model' is required"]),
    ],
)
def test_bad_fields_are_user_errors(fields, words):
    with pytest.raises(UserError) as e:
        RunSpec.from_json(json.dumps(fields))
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("text, words", [("{model: mlp}", ["not JSON"]), ('["mlp-1x512"]', ["JSON object"])])
def test_malformed_json_is_a_user_error(text, words):
    with pytest.raises(UserError, match="bad run spec") as e:
        RunSpec.from_json(text)
    assert all(w in str(e.value) for w in words)


def test_a_wrongly_typed_number_is_a_user_error():
    with pytest.raises(UserError, match="bad run spec"):
        RunSpec.from_json(json.dumps({"model": "mlp-1x512", "epochs": "ten"}))


# A string where a number belongs crashes with a traceback or, for a float batch size, passes until training.
@pytest.mark.parametrize("fields", [{"labels": 5}, {"loss_thresholds": "abc"}, {"batch_size": 32.5}])
def test_wrongly_typed_fields_are_user_errors(fields):
    with pytest.raises(UserError):
        RunSpec.from_json(json.dumps({"model": "mlp-1x512", **fields}))
