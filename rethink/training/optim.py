"""The optimizer: SGD with momentum and coupled weight decay on the kernels only (Appendix A)."""

from __future__ import annotations

import torch
from torch import nn

from rethink.models import decayed_parameter_names
from rethink.spec import RunSpec


class MomentumSGD:
    """SGD with momentum and coupled weight decay on some parameters: torch.optim.SGD's update, op for op.

    d = g + wd * w (decayed parameters only), buf = momentum * buf + d (buf = d at the first step),
    w -= lr * buf; dampening 0, no Nesterov: the same foreach kernels in the same order as torch.optim.SGD
    with foreach=True, so the numbers are bit-identical to it (a test compares them). Written out because
    torch.optim imports torch._dynamo on first use (about a second per process, a third of a short run's
    overhead), and so that packs (packed.PackedModel) and single runs share one definition of a step.
    """

    def __init__(self, named_params: list[tuple[str, torch.Tensor]], decayed: set[str], lr: float,
                 momentum: float, weight_decay: float):  # fmt: skip
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decayed = [i for i, n in enumerate(self.names) if n in decayed]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor] | None = None  # created at the first step (never with momentum 0)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.weight_decay != 0 and self.decayed:
            decayed = torch._foreach_add([grads[i] for i in self.decayed], [self.params[i] for i in self.decayed],
                                         alpha=self.weight_decay)  # fmt: skip
            for i, g in zip(self.decayed, decayed):
                grads[i] = g
        if self.momentum != 0:
            if self.buffers is None:
                self.buffers = [torch.clone(g).detach() for g in grads]
            else:
                torch._foreach_mul_(self.buffers, self.momentum)
                torch._foreach_add_(self.buffers, grads, alpha=1)
            grads = self.buffers
        torch._foreach_add_(self.params, grads, alpha=-self.lr)

    def state_dict(self) -> dict:
        """The checkpoint's optimizer entry: momentum buffers by parameter name (none before the first step)."""
        return {"momentum_buffers": {} if self.buffers is None else dict(zip(self.names, self.buffers))}

    def load_state_dict(self, state: dict) -> None:
        """Take over a checkpoint's buffers; ValueError when they do not fit these parameters."""
        bufs = state["momentum_buffers"]
        if not bufs:
            self.buffers = None
            return
        if list(bufs) != self.names or any(b.shape != p.shape for b, p in zip(bufs.values(), self.params)):
            raise ValueError("momentum buffers that do not fit the model")
        self.buffers = [b.to(device=p.device, dtype=p.dtype).clone() for b, p in zip(bufs.values(), self.params)]


def make_sgd(model: nn.Module, spec: RunSpec) -> MomentumSGD:
    """The run's optimizer: SGD with momentum; weight decay (coupled) on the kernels only.

    The decayed parameters are models.decayed_parameter_names: kernels of convolutional and linear layers,
    not biases or BatchNorm offsets.
    """
    return MomentumSGD(list(model.named_parameters()), set(decayed_parameter_names(model)), spec.lr, spec.momentum,
                       spec.weight_decay)  # fmt: skip
