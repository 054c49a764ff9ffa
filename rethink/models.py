"""The paper's five CIFAR-10 models (Appendix A, Figure 3), with exactly the parameter counts of Table 1."""

from __future__ import annotations

import torch
from torch import nn

from rethink.errors import UserError
from rethink.paper import CROP, DEFAULT_LR, DISPLAY, INPUT_DIM, MODELS, PAPER_PARAMS

INPUT_SHAPE = (3, CROP, CROP)


class Offset(nn.Module):
    """A learned per-channel offset: BatchNorm's beta without gamma (TF-slim's default scale=False)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x + self.bias.view(1, -1, 1, 1)


class ConvModule(nn.Sequential):
    """conv -> BatchNorm (no affine) -> offset -> ReLU; without BatchNorm the offset is the conv's bias."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, batchnorm: bool):
        pad = kernel // 2
        if batchnorm:
            super().__init__(
                nn.Conv2d(cin, cout, kernel, stride, pad, bias=False),
                nn.BatchNorm2d(cout, affine=False),
                Offset(cout),
                nn.ReLU(inplace=True),
            )
        else:
            super().__init__(nn.Conv2d(cin, cout, kernel, stride, pad, bias=True), nn.ReLU(inplace=True))


class Inception(nn.Module):
    """Concatenation of a 1x1 conv module (c1 channels) and a 3x3 conv module (c3 channels)."""

    def __init__(self, cin: int, c1: int, c3: int, batchnorm: bool):
        super().__init__()
        self.b1 = ConvModule(cin, c1, 1, 1, batchnorm)
        self.b3 = ConvModule(cin, c3, 3, 1, batchnorm)
        self.out_channels = c1 + c3

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x)], dim=1)


class Downsample(nn.Module):
    """Concatenation of a 3x3 stride-2 conv module (c3 channels) and a 3x3 stride-2 max-pool."""

    def __init__(self, cin: int, c3: int, batchnorm: bool):
        super().__init__()
        self.conv = ConvModule(cin, c3, 3, 2, batchnorm)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.out_channels = c3 + cin

    def forward(self, x):
        return torch.cat([self.conv(x), self.pool(x)], dim=1)


class SmallInception(nn.Module):
    """Small Inception of Figure 3: 28x28 -> 14x14 -> 7x7, global mean pool, linear 10."""

    def __init__(self, batchnorm: bool = True, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [ConvModule(3, 96, 3, 1, batchnorm)]
        c = 96
        plan = [
            ("inc", 32, 32), ("inc", 32, 48), ("down", 80),
            ("inc", 112, 48), ("inc", 96, 64), ("inc", 80, 80), ("inc", 48, 96), ("down", 96),
            ("inc", 176, 160), ("inc", 176, 160),
        ]  # fmt: skip
        for step in plan:
            block = Inception(c, step[1], step[2], batchnorm) if step[0] == "inc" else Downsample(c, step[1], batchnorm)
            layers.append(block)
            c = block.out_channels
        self.features = nn.Sequential(*layers)
        # Dropout (off by default) sits before the only fully connected layer.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.dropout(self.features(x).mean(dim=(2, 3))))


class SmallAlexNet(nn.Module):
    """Two (5x5 conv 64 -> ReLU -> 3x3/2 max-pool -> LRN) modules, then FC 384 -> 192 -> 10."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()

        def module(cin):
            return [
                nn.Conv2d(cin, 64, 5, padding=2),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, padding=1),
                # TF CIFAR-10 tutorial: depth_radius 4, bias 1, alpha 0.001/9, beta 0.75. PyTorch divides alpha by
                # the window size (9), so alpha=1e-3 here is TF's 0.001/9 per element.
                nn.LocalResponseNorm(size=9, alpha=1e-3, beta=0.75, k=1.0),
            ]

        self.features = nn.Sequential(*module(3), *module(64))

        def drop():
            return nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        # Dropout (off by default) sits before each fully connected layer.
        self.classifier = nn.Sequential(
            nn.Flatten(),
            drop(), nn.Linear(64 * 7 * 7, 384), nn.ReLU(inplace=True),
            drop(), nn.Linear(384, 192), nn.ReLU(inplace=True),
            drop(), nn.Linear(192, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Sequential):
    """`depth` hidden layers of 512 ReLU units on the flattened 2352-value input, then linear 10."""

    def __init__(self, depth: int, width: int = 512, dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Flatten()]
        d = INPUT_DIM
        for _ in range(depth):
            # Dropout (off by default) sits before each fully connected layer but the first (on raw pixels).
            if dropout > 0 and d != INPUT_DIM:
                layers.append(nn.Dropout(dropout))
            layers += [nn.Linear(d, width), nn.ReLU(inplace=True)]
            d = width
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(d, 10))
        super().__init__(*layers)


def build_model(name: str, dropout: float = 0.0) -> nn.Module:
    """A fresh model by its command-line name (initialized from torch's current RNG state)."""
    if name == "inception":
        return SmallInception(batchnorm=True, dropout=dropout)
    if name == "inception-nobn":
        return SmallInception(batchnorm=False, dropout=dropout)
    if name == "alexnet":
        return SmallAlexNet(dropout=dropout)
    if name == "mlp-1x512":
        return MLP(1, dropout=dropout)
    if name == "mlp-3x512":
        return MLP(3, dropout=dropout)
    raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")


def decayed_parameter_names(model: nn.Module) -> list[str]:
    """The parameters weight decay acts on: the kernels of convolutional and linear layers.

    "Equivalent to a l2 regularizer on the weights" (Appendix A): not biases, not the offsets after BatchNorm.
    """
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            names.append(f"{prefix}.weight" if prefix else "weight")
    return names


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_table() -> list[dict]:
    """One row per model: name, parameters (counted), the paper's count, input shape."""
    return [
        {
            "name": name,
            "display": DISPLAY[name],
            "params": count_params(build_model(name)),
            "paper_params": PAPER_PARAMS[name],
            "input_shape": list(INPUT_SHAPE),
            "default_lr": DEFAULT_LR[name],
        }
        for name in MODELS
    ]
