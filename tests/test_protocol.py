"""The paper's protocol as this project reads it (docs/protocol.md): runs to convergence, thresholds every run
can reach, weight decay on the weights only, float32 accuracies, and specs of an older protocol refused."""

from __future__ import annotations

import json

import pytest
import torch

from rethink.data.cifar import load_cifar10
from rethink.errors import UserError
from rethink.experiments.kit import OVERFIT_THRESHOLD
from rethink.models import build_model
from rethink.spec import SPEC_VERSION, RunSpec
from rethink.store import LocalStore
from rethink.store.runs import read_metrics
from rethink.suites import Options, expand
from rethink.training.optim import make_sgd
from rethink.training.options import ExecOptions
from rethink.training.packed import PackedModel
from rethink.training.trainer import train_run

QUIET = ExecOptions(device="cpu", log=lambda m: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rethink.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("protocol-data")
    write_synthetic(out, 200, 50, seed=1)
    return load_cifar10(out, download=False)


# ---------------------------------------------------------------------------------------------- to the cap


def test_paper_suites_train_every_run_to_its_cap():
    for name in ("fig1a", "fig1bc", "table1", "fig2b", "regularizers", "full"):
        specs = expand(name)
        assert specs and all(s.target_train_acc is None for s in specs), name
        assert {s.epochs for s in specs} == {100}, name


def test_stopping_early_is_an_explicit_option_with_other_run_ids():
    paper = expand("table1")
    cheap = expand("table1", Options(target_acc=1.0))
    assert [s.target_train_acc for s in cheap] == [1.0] * len(paper)
    assert not {s.run_id for s in paper} & {s.run_id for s in cheap}


def test_a_run_that_fits_early_keeps_training_to_its_cap(data, tmp_path, one_thread):
    spec = RunSpec(model="mlp-1x512", dataset=data.identity, epochs=6, batch_size=20, lr=0.05)
    result = train_run(spec, LocalStore(tmp_path), data, QUIET)
    metrics = read_metrics(LocalStore(tmp_path), spec.run_id)
    first_fit = next(m["epoch"] for m in metrics if m["train_acc"] >= 1.0)
    assert first_fit < 6  # it fitted its 200 images early ...
    assert result["epochs"] == len(metrics) == 6 and result["stopped"] == "cap"  # ... and went on to the cap
    # Every accuracy and loss threshold is recorded, each the first epoch end that reached it.
    for t in ("0.9", "0.95", "0.99", "1"):
        hit = next((m for m in metrics if m["train_acc"] >= float(t)), None)
        assert result["train_acc_steps"][t] == (hit and hit["step"])
        assert result["train_acc_epochs"][t] == (hit and hit["epoch"])
    assert result["train_acc_epochs"]["1"] == first_fit
    for t in ("0.1", "0.01"):
        hit = next((m for m in metrics if m["train_loss"] < float(t)), None)
        assert result["loss_threshold_steps"][t] == (hit and hit["step"])
    # The result says where it came from.
    assert result["data"]["identity"] == data.identity and result["data"]["synthetic"] is True
    assert set(result["data"]["file_md5"]) == {*(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                                               "batches.meta"}  # fmt: skip
    assert result["environment"]["precision"] == "float32" and result["environment"]["git"]


def test_figure_2b_runs_are_the_table_1_inception_rows():
    table1 = {s.run_id: s for s in expand("table1")}
    fig2b = expand("fig2b")
    assert len(fig2b) == 2
    rows = {s.model: i for i, s in enumerate(expand("table1"))
            if not s.random_crop and not s.weight_decay and s.labels == "true"}  # fmt: skip
    for s in fig2b:
        assert s.run_id in table1, s.label()
        assert f"table1:{rows[s.model]}" in next(f for f in expand("full") if f.run_id == s.run_id).tags
    assert rows.keys() >= {"inception", "inception-nobn"}


def test_figure_1b_threshold_is_one_every_paper_run_reaches():
    # The paper's Table 1 train accuracies (%) of its random-label rows: every one is at least 99%.
    paper_random_label_train_acc = [100.0, 100.0, 99.82, 100.0, 99.34]
    assert OVERFIT_THRESHOLD == 0.99
    assert all(a >= 100 * OVERFIT_THRESHOLD for a in paper_random_label_train_acc)


# ---------------------------------------------------------------------------------------------- weight decay


@pytest.mark.parametrize("name", ["inception", "inception-nobn", "alexnet", "mlp-1x512"])
def test_weight_decay_shrinks_kernels_only(name):
    """With a zero loss gradient, a step is weight decay alone: kernels shrink by (1 - lr*wd), biases and
    BatchNorm offsets stay exactly where they are."""
    torch.manual_seed(0)
    model = build_model(name)
    for p in model.parameters():  # non-zero biases and offsets, so that decay on them would show
        torch.nn.init.uniform_(p, 0.5, 1.0)
    spec = RunSpec(model=name, weight_decay=0.1, lr=0.5, momentum=0.0)
    opt = make_sgd(model, spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    kernels = {f"{prefix}.weight" for prefix, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}  # fmt: skip
    assert kernels and set(before) - kernels  # both kinds exist in every model
    for n, p in model.named_parameters():
        if n in kernels:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.5 * 0.1), rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.detach(), before[n]), f"{name}: {n} was decayed"


def test_packed_weight_decay_leaves_biases_and_offsets_alone():
    """Two members with one state and one batch, weight decay 0 and 0.1: only their kernels may differ."""
    torch.manual_seed(0)
    template = build_model("inception")
    state = {k: v.clone() for k, v in template.state_dict().items()}
    pm = PackedModel("inception", 0.0, [state, state], torch.device("cpu"))
    x = torch.randn(1, 4, 3, 28, 28).expand(2, -1, -1, -1, -1).contiguous()
    y = torch.randint(0, 10, (1, 4)).expand(2, -1).contiguous()
    pm.train_step(x, y, lr=0.1, momentum=0.0, weight_decay=torch.tensor([0.0, 0.1]), amp=False)
    a, b = pm.member_state(0), pm.member_state(1)
    differ = {n for n in pm.param_names if not torch.equal(a[n], b[n])}
    kernels = {n for n in pm.param_names if n.endswith("weight")}  # Inception: conv kernels and the fc weight
    assert differ == kernels
    assert all(n.endswith("bias") for n in set(pm.param_names) - kernels)


# ---------------------------------------------------------------------------------------------- precision


def test_evaluation_logits_are_float32_under_autocast(data, tmp_path, one_thread):
    """bf16 autocast trains (the logits of training steps are bf16) but never evaluates: accuracies come from
    float32 logits."""
    seen: dict[bool, set] = {True: set(), False: set()}
    original = build_model

    def hooked(name, dropout=0.0):
        model = original(name, dropout)
        model[-1].register_forward_hook(lambda mod, inp, out: seen[mod.training].add(out.dtype))
        return model

    import rethink.training.trainer as train

    spec = RunSpec(model="mlp-1x512", dataset=data.identity, epochs=1, batch_size=50, precision="bf16")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_model", hooked)
        result = train_run(spec, LocalStore(tmp_path), data, ExecOptions(device="cpu", log=lambda m: None))
    assert seen[True] == {torch.bfloat16}  # training steps ran under autocast
    assert seen[False] == {torch.float32}  # evaluation did not
    assert result["environment"]["amp"] is True and "bf16" in result["environment"]["precision"]


def test_training_is_float32_unless_asked():
    assert RunSpec(model="alexnet").precision == "float32"
    assert ExecOptions().resolve("alexnet").amp is False


# ---------------------------------------------------------------------------------------------- old protocol


def test_a_spec_of_the_old_protocol_is_not_mistaken_for_the_new():
    new = RunSpec(model="mlp-1x512", labels="random")
    old = {**new.to_dict(), "version": 1, "loss_thresholds": [0.1], "target_train_acc": 1.0}
    old.pop("tags")
    # The old record's id is its own hash: never the new run's id ...
    old_id = __import__("hashlib").sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode())
    assert old_id.hexdigest()[:12] != new.run_id
    # ... and this code refuses to train or count it.
    with pytest.raises(UserError, match="version 1 is another protocol"):
        RunSpec.from_dict(old)
    assert new.version == SPEC_VERSION == 2
