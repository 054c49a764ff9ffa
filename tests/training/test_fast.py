"""The fast layers (training/fast.py) compute the reference modules' function and gradients to float32 rounding,
and a training step of the fast model equals one of the reference model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rethink.models import build_model
from rethink.spec import RunSpec
from rethink.training.fast import BandedLRN, use_fast_layers, window_matrix
from rethink.training.optim import make_sgd
from rethink.training.options import ExecOptions

CL = torch.channels_last


@pytest.mark.parametrize("channels", [64, 12, 5, 3])  # fewer channels than the window: every channel is an edge
@pytest.mark.parametrize("memory", [CL, torch.contiguous_format])
@pytest.mark.parametrize("size, alpha, beta, k", [(9, 1e-3, 0.75, 1.0), (5, 0.5, 0.6, 2.0)])
def test_banded_lrn_is_local_response_norm(channels, memory, size, alpha, beta, k):
    torch.manual_seed(channels)
    ref = nn.LocalResponseNorm(size, alpha, beta, k)
    fast = BandedLRN.like(ref)
    # large values make the normalization bite (with alpha 1e-3 and unit inputs d is ~1 and LRN is ~identity)
    x = (30 * torch.randn(4, channels, 6, 5)).contiguous(memory_format=memory).requires_grad_(True)
    xf = x.detach().clone().contiguous(memory_format=memory).requires_grad_(True)
    y, yf = ref(x), fast(xf)
    assert (y - x).abs().max() > 0.1 * x.abs().max()  # the test is not of an identity
    torch.testing.assert_close(yf, y, rtol=2e-6, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, x.grad, rtol=1e-5, atol=1e-5)


def test_edge_channels_see_zero_padding():
    """The first and last channels' windows are cut by the edge and still divided by the full window size."""
    x = torch.zeros(1, 6, 1, 1)
    x[0, 0] = 10.0  # only channel 0 is on: it reaches channels 0..4 (radius 4), not 5
    y = BandedLRN(9, 9.0, 1.0, 1.0)(x)  # alpha / size = 1: d = 1 + sum of squares in the window
    assert y[0, 0, 0, 0].item() == pytest.approx(10.0 / (1 + 100.0))
    assert y[0, 1:, 0, 0].abs().max() == 0
    w = window_matrix(6, 9)
    assert w[0].tolist() == [1, 1, 1, 1, 1, 0] and torch.equal(w, w.T)


def test_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: BandedLRN(5, 0.3, 0.75, 1.0)(3 * t), (x,))


def _pair(dropout=0.0):
    torch.manual_seed(0)
    ref = build_model("alexnet", dropout=dropout)
    fast = copy.deepcopy(ref)
    assert use_fast_layers(fast) == 2
    return ref, fast


def test_fast_alexnet_keeps_the_parameters_and_state_dict():
    ref, fast = _pair()
    assert fast.state_dict().keys() == ref.state_dict().keys()  # checkpoints are interchangeable
    for a, b in zip(ref.state_dict().values(), fast.state_dict().values()):
        assert torch.equal(a, b)
    assert [type(m) for m in fast.features] == [nn.Conv2d, nn.MaxPool2d, nn.ReLU, BandedLRN] * 2
    assert use_fast_layers(build_model("inception")) == 0 and use_fast_layers(build_model("mlp-1x512")) == 0


@pytest.mark.parametrize("memory", [CL, torch.contiguous_format])
def test_a_training_step_of_the_fast_model_is_the_reference_step(memory):
    ref, fast = _pair()
    fast = fast.to(memory_format=memory)
    spec = RunSpec(model="alexnet", weight_decay=5e-4)
    opt_r, opt_f = make_sgd(ref, spec), make_sgd(fast, spec)
    torch.manual_seed(1)
    for _ in range(3):  # momentum too
        x = 3 * torch.randn(32, 3, 28, 28)
        y = torch.randint(0, 10, (32,))
        for model, opt, xb in ((ref, opt_r, x), (fast, opt_f, x.contiguous(memory_format=memory))):
            loss = F.cross_entropy(model(xb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=2e-6, msg=name)
    ref.eval()
    fast.eval()
    with torch.no_grad():
        x = torch.randn(16, 3, 28, 28)
        torch.testing.assert_close(fast(x.contiguous(memory_format=memory)), ref(x), rtol=1e-4, atol=1e-5)


def test_cpu_defaults_for_convolutional_models_and_mlps():
    conv = ExecOptions(device="cpu").resolve("alexnet")
    assert conv.fast_layers and conv.channels_last and conv.eval_batch == 200
    mlp = ExecOptions(device="cpu").resolve("mlp-1x512")
    assert not mlp.fast_layers and not mlp.channels_last and mlp.eval_batch == 1000
    off = ExecOptions(device="cpu", fast_layers=False, channels_last=False, eval_batch=1000).resolve("alexnet")
    assert (off.fast_layers, off.channels_last, off.eval_batch) == (False, False, 1000)
    assert conv.environment()["fast_layers"] is True


def test_the_fast_model_trains_under_bf16_autocast():
    """--amp on the CPU: the banded LRN takes bf16 activations, and the fast model's bf16 gradients are as close
    to float32's as the reference model's bf16 gradients are (bf16 alone moves the first layer's by ~15%)."""
    ref, fast = _pair()
    ref_bf16 = copy.deepcopy(ref)
    torch.manual_seed(2)
    x = 3 * torch.randn(16, 3, 28, 28)
    y = torch.randint(0, 10, (16,))
    F.cross_entropy(ref(x), y).backward()
    for model in (ref_bf16, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        F.cross_entropy(out.float(), y).backward()
    for (name, p), q, r in zip(ref.named_parameters(), fast.parameters(), ref_bf16.parameters()):
        assert torch.isfinite(q.grad).all(), name
        off_fast, off_ref = ((g - p.grad).norm() / p.grad.norm() for g in (q.grad, r.grad))
        assert off_fast < 1.5 * off_ref + 0.01, (name, float(off_fast), float(off_ref))
