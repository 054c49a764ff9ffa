"""Packed training: K runs in one batched model give each run what it gets alone, and keep the store's contract.

CPU, float32, dropout off (with dropout a pack necessarily draws other masks than its unpacked twins).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import rethink.training.packed
from rethink.cli import main
from rethink.data.cifar import load_cifar10
from rethink.data.device import epoch_seed, prepare_data
from rethink.data.preprocess import preprocess
from rethink.data.synthetic import write_synthetic
from rethink.errors import UserError
from rethink.models import ConvModule
from rethink.runner import DataSource, run_specs
from rethink.spec import RunSpec
from rethink.store import LocalStore
from rethink.store.runs import read_metrics, read_result, run_key
from rethink.summary import TIMING_FIELDS
from rethink.training.grouping import group_packs, suite_pack
from rethink.training.options import ExecOptions
from rethink.training.packed import PackedModel, epoch_order, prepare_pack_data, train_batch, train_pack
from rethink.training.trainer import train_run

N_TRAIN, N_TEST = 300, 100
QUIET = ExecOptions(device="cpu", log=lambda m: None)


# Tiny batches: one thread beats two here, and by far on a shared, busy CPU (conftest's `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack-data")
    write_synthetic(root, N_TRAIN, N_TEST, seed=0)
    return root


@pytest.fixture(scope="module")
def data(data_dir):
    return load_cifar10(data_dir)


@pytest.fixture(scope="module")
def specs(data) -> list[RunSpec]:
    """Three compatible runs differing in seed, corruption, weight decay and crops; the first stops early."""
    base = RunSpec(model="mlp-1x512", dataset=data.identity, epochs=3, batch_size=64)
    return [
        base.replace(seed=0, target_train_acc=0.05),  # reached after epoch 1: leaves the pack there
        base.replace(seed=1, labels="partial:0.5", weight_decay=5e-4),
        base.replace(seed=2, pixels="shuffled", random_crop=True, weight_decay=1e-3),
    ]


@pytest.fixture(scope="module")
def twins(tmp_path_factory, specs, data):
    """Each spec trained alone by the unpacked trainer."""
    store = LocalStore(tmp_path_factory.mktemp("twins"))
    for s in specs:
        train_run(s, store, data, QUIET)
    return store


@pytest.fixture(scope="module")
def packed(tmp_path_factory, specs, data):
    """The three specs trained as one uninterrupted pack."""
    store = LocalStore(tmp_path_factory.mktemp("packed"))
    train_pack(specs, store, data, QUIET)
    return store


def _strip(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in metrics]


def assert_close_metrics(a: list[dict], b: list[dict], n: int = N_TRAIN, exact: bool = False) -> None:
    """Same epochs and steps; losses to float32 rounding; accuracies to at most one image."""
    a, b = _strip(a), _strip(b)
    if exact:
        assert a == b
        return
    assert [(m["epoch"], m["step"], m["lr"]) for m in a] == [(m["epoch"], m["step"], m["lr"]) for m in b]
    for x, y in zip(a, b):
        for key in x:
            if key.endswith("_acc"):
                assert x[key] == pytest.approx(y[key], abs=1.01 / min(n, N_TEST)), key
            else:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


# ---------------------------------------------------------------------------------------------- grouping


def test_grouping_is_deterministic_compatible_and_bounded(data):
    base = RunSpec(model="mlp-1x512", dataset=data.identity, epochs=2)
    specs = [base.replace(seed=s, labels=lab) for s in range(3) for lab in ("true", "random")]
    specs += [base.replace(model="mlp-3x512", lr=0.01), base.replace(seed=9, batch_size=64)]
    packs = group_packs(specs, 4)
    assert packs == group_packs(list(specs), 4)
    assert [len(p) for p in packs] == [4, 2, 1, 1]
    assert sorted(s.run_id for p in packs for s in p) == sorted(s.run_id for s in specs)
    for p in packs:
        assert len({(s.model, s.batch_size, s.lr, s.epochs) for s in p}) == 1
    assert suite_pack(specs, 4, 1) == packs[1]
    with pytest.raises(UserError, match="out of range"):
        suite_pack(specs, 4, 4)
    assert group_packs(specs, 1) == [[s] for s in specs]


def test_pack_data_is_each_members_prepare_data(specs, data):
    extra = [specs[0].replace(seed=4, labels="random", pixels="gaussian", random_crop=True, target_train_acc=None)]
    members = specs + extra
    pd = prepare_pack_data(members, data, torch.device("cpu"))
    perm, offsets = epoch_order(members, 1, pd.n, torch.device("cpu"))
    x, y = train_batch(pd, perm, offsets, 2, 64)
    for k, s in enumerate(members):
        dd = prepare_data(s, data, torch.device("cpu"))
        base = pd.train_base[k]
        assert torch.equal(pd.train_pre[base : base + pd.n], dd.train_pre)
        assert torch.equal(pd.train_y[k], dd.train_y)
        assert torch.equal(pd.test_pre[pd.test_base[k] : pd.test_base[k] + pd.m], dd.test_pre)
        assert torch.equal(pd.test_y, dd.test_y)
        # batch 2 of epoch 1, drawn as the trainer draws it
        g = torch.Generator()
        g.manual_seed(epoch_seed(s.seed, 1))
        order = torch.randperm(pd.n, generator=g)
        idx = order[128:192]
        if s.random_crop:
            want = preprocess(dd.train_raw[idx], torch.randint(0, 5, (pd.n, 2), generator=g)[idx])
        else:
            want = dd.train_pre[idx]
        assert torch.equal(x[k], want)
        assert torch.equal(y[k], dd.train_y[idx])


# ---------------------------------------------------------------------------------------------- equivalence


def test_pack_of_one_is_the_unpacked_trainer(specs, data, twins, tmp_path):
    store = LocalStore(tmp_path)
    spec = specs[1]
    train_pack([spec], store, data, QUIET)
    assert_close_metrics(read_metrics(store, spec.run_id), read_metrics(twins, spec.run_id), exact=True)


def test_pack_gives_each_run_its_twins_metrics(specs, packed, twins):
    for s in specs:
        assert_close_metrics(read_metrics(packed, s.run_id), read_metrics(twins, s.run_id))
        mine, theirs = read_result(packed, s.run_id), read_result(twins, s.run_id)
        assert mine["stopped"] == theirs["stopped"] and mine["epochs"] == theirs["epochs"]
        assert mine["spec"] == s.to_dict()
        assert mine["environment"]["pack"]["size"] == 3
    assert read_result(packed, specs[0].run_id)["stopped"] == "target"
    assert read_result(packed, specs[0].run_id)["epochs"] == 1
    assert read_result(packed, specs[1].run_id)["epochs"] == 3


def test_a_finished_pack_trains_nothing(specs, packed, data):
    before = {s.run_id: read_result(packed, s.run_id) for s in specs}
    assert train_pack(specs, packed, data, QUIET) == before


def _small_bn_net(name: str = "", dropout: float = 0.0) -> torch.nn.Module:
    """The Inception's conv module (conv -> BatchNorm -> offset -> ReLU) in a net small enough for float64."""
    return torch.nn.Sequential(ConvModule(3, 6, 3, 2, True), ConvModule(6, 8, 3, 2, True), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 7 * 7, 10))  # fmt: skip


def test_batchnorm_statistics_and_updates_stay_per_run(monkeypatch):
    """Each member's step, running statistics and evaluation are its own (float64: exact to rounding)."""
    monkeypatch.setattr(rethink.training.packed, "build_model", _small_bn_net)
    states, models = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = _small_bn_net().double()
        models.append(m)
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    pm = PackedModel("small", 0.0, states, torch.device("cpu"), track_norms=True)
    assert pm.tracked == ["0.0.weight", "1.0.weight"]
    torch.manual_seed(7)
    x = torch.randn(2, 16, 3, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (2, 16))
    wd = torch.tensor([0.0, 0.01], dtype=torch.float64)
    for _ in range(3):
        losses, _ = pm.train_step(x, y, lr=0.1, momentum=0.9, weight_decay=wd, amp=False)
    for k, m in enumerate(models):
        kernels = [c.weight for c in m.modules() if isinstance(c, (torch.nn.Linear, torch.nn.Conv2d))]
        others = [p for p in m.parameters() if all(p is not c for c in kernels)]  # offsets and biases: no decay
        opt = torch.optim.SGD([{"params": kernels, "weight_decay": float(wd[k])}, {"params": others}], lr=0.1,
                              momentum=0.9)  # fmt: skip
        m.train()
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(m(x[k]), y[k])
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(losses[k]) == pytest.approx(loss.item(), rel=1e-9)
        mine = pm.member_state(k)
        assert mine.keys() == m.state_dict().keys()
        for name, value in m.state_dict().items():
            assert torch.allclose(mine[name].double(), value.double(), rtol=1e-8, atol=1e-10), name
        m.eval()
        pm.base.eval()
        with torch.no_grad():
            assert torch.allclose(pm.forward(x)[k], m(x[k]), rtol=1e-8, atol=1e-10)
    a, b = pm.member_state(0), pm.member_state(1)
    assert not torch.allclose(a["0.1.running_mean"], b["0.1.running_mean"])
    assert int(a["0.1.num_batches_tracked"]) == 3


def test_inception_pack_matches_unpacked_runs(data, tmp_path):
    base = RunSpec(model="inception", dataset=data.identity, epochs=1, batch_size=16, train_subset=32,
                   test_subset=16)  # fmt: skip
    specs = [base.replace(seed=0), base.replace(seed=1, labels="random")]
    alone, together = LocalStore(tmp_path / "alone"), LocalStore(tmp_path / "together")
    for s in specs:
        train_run(s, alone, data, QUIET)
    train_pack(specs, together, data, QUIET)
    for s in specs:  # test accuracy and loss come from each member's own running statistics
        assert_close_metrics(read_metrics(together, s.run_id), read_metrics(alone, s.run_id), n=16)


# ---------------------------------------------------------------------------------------------- interruptions

_INTERRUPTED = """
import json, os, signal, sys
import rethink.training.packed as pack
import rethink.training.trainer as engine
from rethink.data.cifar import load_cifar10
from rethink.spec import RunSpec
from rethink.store import LocalStore
from rethink.training.loop import Preempted
from rethink.training.options import ExecOptions

data_dir, store, specs, sig, after = sys.argv[1:]
save, calls = engine.save_checkpoint, []  # one call per member's checkpoint

def save_then_signal(*args, **kwargs):  # the signal arrives right after checkpoint number `after`
    save(*args, **kwargs)
    calls.append(1)
    if len(calls) == int(after):
        os.kill(os.getpid(), getattr(signal, sig))

engine.save_checkpoint = save_then_signal
specs = [RunSpec.from_dict(d) for d in json.loads(specs)]
try:
    pack.train_pack(specs, LocalStore(store), load_cifar10(data_dir), ExecOptions(device="cpu", log=print))
except Preempted as e:
    print(e)
    sys.exit(143)
"""


def _interrupted(data_dir, store, specs, sig: str, after: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _INTERRUPTED, str(data_dir), str(store), json.dumps([s.to_dict() for s in specs]),
           sig, str(after)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _position(root, spec: RunSpec) -> tuple[int, int]:
    ckpt = torch.load(root / "runs" / spec.run_id / "checkpoint.pt", weights_only=True)
    return int(ckpt["epoch"]), int(ckpt["batch"])


def test_killed_pack_resumes_to_the_same_end(specs, data_dir, data, packed, twins, tmp_path):
    # Checkpoints 1 and 2: members 1 and 2 at the end of epoch 1 (member 0 has finished there); checkpoint 3:
    # member 1 at the end of epoch 2, and the kill comes before member 2's. One member is now an epoch ahead.
    proc = _interrupted(data_dir, tmp_path, specs, "SIGKILL", 3)
    assert proc.returncode == -9, proc.stderr
    store = LocalStore(tmp_path)
    assert read_result(store, specs[0].run_id) is not None  # finished before the kill: stays finished
    assert [len(read_metrics(store, s.run_id)) for s in specs[1:]] == [2, 2]  # both epoch 2 records written
    assert [_position(tmp_path, s) for s in specs[1:]] == [(2, 0), (1, 0)], proc.stdout
    log: list[str] = []
    train_pack(specs, store, data, ExecOptions(device="cpu", log=log.append))
    assert any(f"run {specs[1].run_id}: resuming at epoch 3, batch 0" in line for line in log), log
    assert any(f"run {specs[2].run_id}: resuming at epoch 2, batch 0" in line for line in log), log
    assert any("members at 2 different positions" in line for line in log), log
    assert not any("ignoring unusable" in line for line in log), log
    for s in specs:
        assert_close_metrics(read_metrics(store, s.run_id), read_metrics(packed, s.run_id))
        assert_close_metrics(read_metrics(store, s.run_id), read_metrics(twins, s.run_id))


def test_sigterm_writes_every_members_checkpoint_and_exits_143(specs, data_dir, data, packed, tmp_path):
    proc = _interrupted(data_dir, tmp_path, specs, "SIGTERM", 1)
    assert proc.returncode == 143, proc.stderr
    assert "SIGTERM" in proc.stdout
    store = LocalStore(tmp_path)
    for s in specs[1:]:
        ckpt = torch.load(tmp_path / "runs" / s.run_id / "checkpoint.pt", weights_only=True)
        assert (ckpt["epoch"], ckpt["batch"]) == (1, 1)  # mid-epoch: one step after the signal
    # The unpacked trainer takes over one member from the pack's checkpoint; the pack resumes the other.
    train_run(specs[1], store, data, QUIET)
    train_pack(specs, store, data, QUIET)
    for s in specs:
        assert_close_metrics(read_metrics(store, s.run_id), read_metrics(packed, s.run_id))


# ---------------------------------------------------------------------------------------------- CLI and runner


def test_plan_and_train_one_pack_of_a_suite(data_dir, tmp_path, capsys):
    common = ["--suite", "smoke", "--epochs", "1", "--data-dir", str(data_dir)]
    assert main(["plan", *common, "--pack", "8", "--json"]) == 0
    packs = json.loads(capsys.readouterr().out)
    assert [p["pack_index"] for p in packs] == list(range(len(packs)))
    j = next(p["pack_index"] for p in packs if p["model"] == "mlp-1x512")
    assert packs[j]["size"] > 1
    store = tmp_path / "store"
    argv = ["train", *common, "--pack", "8", "--pack-index", str(j), "--store", str(store), "--device", "cpu"]
    assert main(argv) == 0
    finished = sorted(p.parent.name for p in store.glob("runs/*/result.json"))
    assert finished == sorted(packs[j]["run_ids"])
    capsys.readouterr()
    assert main(argv) == 0
    assert f"{len(finished)} already finished" in capsys.readouterr().out
    assert main(["train", *common, "--pack", "8", "--pack-index", str(len(packs)), "--store", str(store)]) == 2
    assert main(["train", *common, "--pack", "8", "--index", "0", "--store", str(store)]) == 2


def test_runner_trains_packs(data, data_dir, specs, packed, tmp_path):
    other = RunSpec(model="mlp-3x512", dataset=data.identity, epochs=1, batch_size=64)  # a pack of its own
    failures = run_specs([*specs, other], str(tmp_path), DataSource(str(data_dir)), QUIET, pack=4)
    assert failures == {}
    store = LocalStore(tmp_path)
    for s in specs:
        assert_close_metrics(read_metrics(store, s.run_id), read_metrics(packed, s.run_id), exact=True)
    assert store.exists(run_key(other.run_id, "result.json"))


# ---------------------------------------------------------------------------------------------- GPU (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["mlp-1x512", "alexnet"])
def test_pack_matches_unpacked_twins_on_cuda(data, tmp_path, model):
    """On the GPU in float32 a pack gives each run its twin's metrics; in bf16 it follows them closely."""
    base = RunSpec(model=model, dataset=data.identity, epochs=2, batch_size=32)
    specs = [base.replace(seed=0), base.replace(seed=1, labels="random", weight_decay=5e-4)]
    opts = ExecOptions(device="cuda", log=lambda m: None)
    for precision, rel in (("float32", 1e-3), ("bf16", 0.05)):
        twins = [s.replace(precision=precision) for s in specs]
        alone, together = LocalStore(tmp_path / f"alone-{precision}"), LocalStore(tmp_path / f"together-{precision}")
        for s in twins:
            train_run(s, alone, data, opts)
        train_pack(twins, together, data, opts)
        for s in twins:
            a, b = read_metrics(together, s.run_id)[-1], read_metrics(alone, s.run_id)[-1]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=rel)
            assert a["test_loss"] == pytest.approx(b["test_loss"], rel=rel)
