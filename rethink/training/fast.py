"""Exact rewrites of the convolutional models' layers, for speed (`use_fast_layers`): the same parameters,
state dict and function; results differ from the reference modules only in float32 rounding.

- **ReLU after the max-pool.** Both are monotone, so max(relu(a)) = relu(max(a)) and the gradients agree too;
  every 3x3/2 window with padding 1 holds at least one real value. The ReLU then touches a quarter of the values.
- **LRN as a banded matrix product.** `nn.LocalResponseNorm` sums x^2 over a window of channels with an
  average pool over a padded 5-d view (slow on the CPU, forward and backward). Here the window sum is one
  product with a banded C x C matrix (zero outside the window: the edge channels see zero padding, as the
  reference does), and the backward is written out: with d = k + (alpha/n) W x^2 and y = x d^-beta,
  dL/dx = g d^-beta - (2 alpha beta / n) x W (g x d^(-beta-1)) (W is symmetric).
  d^-beta for beta = 3/4 is rsqrt(d) * sqrt(rsqrt(d)), a third of the cost of `pow` on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from rethink.models import SmallAlexNet


def window_matrix(channels: int, size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The C x C 0/1 matrix whose column c marks the channels in c's LRN window (size // 2 either side)."""
    i = torch.arange(channels, device=device)
    return ((i[:, None] - i[None, :]).abs() <= size // 2).to(dtype)


def _inverse_power(d: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.75:
        r = torch.rsqrt(d)
        return r.mul_(torch.sqrt(r))
    return d.pow(-beta)


class _BandedLRNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, window, scale, beta, k):
        n, c, h, w = x.shape
        xm = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view when x is channels_last
        d = torch.mm(xm * xm, window).mul_(scale).add_(k)
        p = _inverse_power(d, beta)
        y = xm * p
        ctx.save_for_backward(xm, p, d, window)
        ctx.scale, ctx.beta, ctx.shape = scale, beta, (n, h, w, c)
        return y.view(n, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, g):
        xm, p, d, window = ctx.saved_tensors
        n, h, w, c = ctx.shape
        gm = g.permute(0, 2, 3, 1).reshape(-1, c)
        gp = gm * p
        s = torch.mm(gp * xm / d, window)
        gx = gp.sub_(s.mul_(xm).mul_(2 * ctx.scale * ctx.beta))
        return gx.view(n, h, w, c).permute(0, 3, 1, 2), None, None, None, None


class BandedLRN(nn.Module):
    """`nn.LocalResponseNorm(size, alpha, beta, k)` over 4-d inputs, as a banded matrix product."""

    def __init__(self, size: int, alpha: float, beta: float, k: float):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self._window: dict[tuple, torch.Tensor] = {}  # per (channels, dtype, device): not part of the state

    @classmethod
    def like(cls, lrn: nn.LocalResponseNorm) -> BandedLRN:
        return cls(lrn.size, lrn.alpha, lrn.beta, lrn.k)

    def forward(self, x):
        key = (x.shape[1], x.dtype, x.device)
        if key not in self._window:
            self._window[key] = window_matrix(x.shape[1], self.size, x.dtype, x.device)
        # PyTorch's LRN divides alpha by the window size whatever the padding, as TensorFlow's alpha is per element
        return _BandedLRNFunction.apply(x, self._window[key], self.alpha / self.size, self.beta, self.k)

    def extra_repr(self):
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


def use_fast_layers(model: nn.Module) -> int:
    """Rewrite `model`'s layers in place into their fast exact forms; returns how many were rewritten.

    Small AlexNet's (conv, ReLU, max-pool, LRN) modules become (conv, max-pool, ReLU, banded LRN); parameters and
    state-dict keys do not change (only the convolutions hold any). Other models are left as they are.
    """
    if not isinstance(model, SmallAlexNet):
        return 0
    f, n = model.features, 0
    for i in range(0, len(f), 4):
        conv, relu, pool, lrn = f[i : i + 4]
        if isinstance(relu, nn.ReLU) and isinstance(pool, nn.MaxPool2d) and isinstance(lrn, nn.LocalResponseNorm):
            f[i + 1], f[i + 2], f[i + 3] = pool, relu, BandedLRN.like(lrn)
            n += 1
    return n
