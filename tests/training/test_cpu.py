"""oneDNN fully connected layers: the same parameters, outputs and gradients as nn.Linear, up to rounding."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from rethink.models import build_model
from rethink.training.cpu import OneDNNLinear, available, use_onednn_linears

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("name", ["mlp-1x512", "mlp-3x512", "alexnet"])
def test_same_function_and_gradients_as_nn_linear(name):
    torch.manual_seed(0)
    plain = build_model(name)
    fast = copy.deepcopy(plain)
    assert use_onednn_linears(fast) == sum(isinstance(m, torch.nn.Linear) for m in plain.modules())
    assert all(type(m) is not torch.nn.Linear for m in fast.modules())
    assert fast.state_dict().keys() == plain.state_dict().keys()  # checkpoints are interchangeable
    x = torch.randn(16, 3, 28, 28, requires_grad=True)
    y = torch.randint(0, 10, (16,))
    xf = x.detach().clone().requires_grad_(True)
    F.cross_entropy(plain(x), y).backward()
    F.cross_entropy(fast(xf), y).backward()
    for (name_, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name_
    assert torch.allclose(x.grad, xf.grad, rtol=1e-4, atol=1e-7)


def test_falls_back_outside_float32_2d():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    fast = copy.deepcopy(layer)
    fast.__class__ = OneDNNLinear
    x3 = torch.randn(2, 5, 8)  # 3-d input: plain F.linear
    assert torch.equal(fast(x3), layer(x3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(torch.randn(3, 8)).dtype == torch.bfloat16


def test_compiled_runs_leave_the_linears_to_inductor(train_data_dir, tmp_path, capsys):
    """Inductor cannot lower the oneDNN linear (its weight is not a graph constant): `--compile` on the CPU
    keeps PyTorch's own nn.Linear, and a compiled MLP run trains to its end."""
    from rethink.cli import main
    from rethink.training.options import ExecOptions

    assert ExecOptions(device="cpu").resolve().onednn == available()
    assert ExecOptions(device="cpu", compile=True).resolve().onednn is False
    assert ExecOptions(device="cpu", onednn=False).resolve().onednn is False
    args = ["train", "--model", "mlp-1x512", "--epochs", "1", "--train-subset", "256", "--compile", "--device", "cpu",
            "--data-dir", str(train_data_dir), "--store", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (result,) = tmp_path.glob("runs/*/result.json")
    assert json.loads(result.read_text())["environment"]["compile"] is True


def test_compile_mode_reaches_torch_compile_and_the_result(train_data_dir, tmp_path, capsys, monkeypatch):
    """`--compile-mode` is torch.compile's mode (reduce-overhead: CUDA graphs, for GPU steps bound by launches):
    the step compiles with it, the result records it, and it is refused without --compile."""
    from rethink.cli import main

    modes = []

    def fake_compile(model, mode=None, **kw):  # the mode, not inductor's minutes on a CPU, is what is tested
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    base = ["train", "--model", "mlp-1x512", "--epochs", "1", "--train-subset", "256", "--device", "cpu",
            "--data-dir", str(train_data_dir), "--store", str(tmp_path)]  # fmt: skip
    assert main([*base, "--compile", "--compile-mode", "reduce-overhead"]) == 0
    assert modes == ["reduce-overhead"]
    (result,) = tmp_path.glob("runs/*/result.json")
    env = json.loads(result.read_text())["environment"]
    assert env["compile"] is True and env["compile_mode"] == "reduce-overhead"
    capsys.readouterr()
    assert main([*base, "--seed", "1", "--compile-mode", "reduce-overhead"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rethink: error: --compile-mode needs --compile"]
    assert modes == ["reduce-overhead"]  # nothing compiled, nothing trained
    assert len(list(tmp_path.glob("runs/*/result.json"))) == 1
