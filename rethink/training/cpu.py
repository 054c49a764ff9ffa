"""CPU speed: fully connected layers through oneDNN, and a heap that keeps freed buffers.

PyTorch's CPU `addmm`/`mm` go through MKL, which on some x86 CPUs (AMD's among them) runs float32 products at
about half the speed of oneDNN's kernels, also shipped with PyTorch. The MLPs spend ~80% of a CPU step in the
2352x512 layer, so `use_onednn_linears(model)` routes the model's `nn.Linear` layers through oneDNN: the same
parameters and state dict, the same float32 function (results differ from MKL's only in rounding).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch
import torch.nn.functional as F
from torch import nn

_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def available() -> bool:
    return _linear is not None and torch.backends.mkldnn.is_available()


def _mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a @ b_t.T through oneDNN."""
    return _linear(a, b_t, None, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = _mm(grad, weight.t().contiguous()) if ctx.needs_input_grad[0] else None
        gw = _mm(grad.t().contiguous(), x.t()) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class OneDNNLinear(nn.Linear):
    """nn.Linear whose float32 CPU matrix products (forward and backward) run in oneDNN."""

    def forward(self, x):
        if (
            x.device.type == "cpu"
            and x.dim() == 2
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
        ):
            return _OneDNNLinearFunction.apply(x.contiguous(), self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Route every nn.Linear of `model` through oneDNN (in place); returns how many layers were switched."""
    if not available():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            n += 1
    return n


def keep_freed_memory() -> None:
    """On glibc, keep freed blocks up to 32 MB in the heap instead of returning them to the OS.

    Every CPU step allocates and frees the same activation and gradient buffers (megabytes each); by default
    glibc maps and unmaps them each time, and the page faults cost ~10% of an MLP step on the CPU.
    """
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: the largest glibc allows
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
