"""The paper's preprocessing, on the device: divide by 255, crop 28x28 (central, or random per image), and
standardize each image on its own like TensorFlow's `per_image_standardization`."""

from __future__ import annotations

import torch

from rethink.paper import BORDER, CROP, IMAGE


def standardize(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-image standardization (TensorFlow's): (x - mean) / max(std, 1/sqrt(N)) over each image's N values.

    `scale`: x is on the 0..scale range and is standardized as x / scale would be; the division cancels but
    for the guard, which becomes scale/sqrt(N) (one pass over the data fewer).
    """
    return _standardize_(x.to(torch.float32, copy=True), scale)


def _standardize_(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`standardize`, in place on a contiguous float32 tensor the caller owns.

    Two passes (center, then the norm of the centered values): as accurate as a textbook variance and several
    times faster than torch.var_mean's one-pass (Welford) kernel on the CPU.
    """
    n = x[0].numel()
    flat = x.view(x.shape[0], -1)
    flat.sub_(flat.mean(dim=1, keepdim=True))
    std = torch.linalg.vector_norm(flat, dim=1, keepdim=True).div_(n**0.5)  # population std
    return flat.mul_(std.clamp_(min=scale / n**0.5).reciprocal_()).view(x.shape)


def crop(x: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """28x28 windows of [B, 3, 32, 32] images: the central one, or one per image at `offsets` [B, 2] (row, col)."""
    if offsets is None:
        return x[:, :, BORDER : BORDER + CROP, BORDER : BORDER + CROP]
    ar = torch.arange(CROP, device=x.device)
    rows = (offsets[:, 0:1] + ar)[:, None, :, None]
    cols = (offsets[:, 1:2] + ar)[:, None, None, :]
    b = torch.arange(x.shape[0], device=x.device)[:, None, None, None]
    c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return x[b, c, rows, cols]


def random_offsets(n: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """One random crop window per image: [n, 2] offsets in 0..4 (every 28x28 window of a 32x32 image)."""
    return torch.randint(0, IMAGE - CROP + 1, (n, 2), generator=generator, device=device)


def preprocess(x: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Raw images on the 0..255 scale [B, 3, 32, 32] -> standardized float32 [B, 3, 28, 28] (paper, Appendix A):
    divide by 255, crop, standardize each image (the division folded into the standardization's guard)."""
    return _standardize_(crop(x, offsets).to(torch.float32, memory_format=torch.contiguous_format, copy=True), 255.0)


def preprocess_all(x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Central-crop preprocessing of a whole resident data set, chunk by chunk straight into the output (no
    temporaries; chunks small enough to stay in cache)."""
    out = torch.empty((x.shape[0], x.shape[1], CROP, CROP), dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], batch):
        chunk = out[i : i + batch]
        chunk.copy_(crop(x[i : i + batch]))
        _standardize_(chunk, 255.0)
    return out


def standardize_crops_(crops: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """`preprocess_all` of images whose central crops are already float32 [N, 3, 28, 28] (contiguous, 0..255):
    the same standardization, chunk for chunk, in place, so the result is bit for bit preprocess_all's."""
    for i in range(0, crops.shape[0], batch):
        _standardize_(crops[i : i + batch], 255.0)
    return crops
