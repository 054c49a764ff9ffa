"""The pipeline a researcher would typically write for these experiments: the reference `rethink bench` beats.

A torchvision-style Dataset that yields PIL images, PIL transforms per image (crop, ToTensor, per-image
standardization), a DataLoader with two worker processes (pinned memory on CUDA), the model on the device in
eager float32, SGD with momentum, and the running loss read back with `.item()` after every step. Evaluation
goes through DataLoaders of 1000 images. It computes what the trainer computes (same preprocessing, same
model, same optimizer); only the way data reaches the model differs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from rethink.paper import CROP

TYPICAL_WORKERS = 2
EVAL_BATCH = 1000


class Cifar10Images(Dataset):
    """(PIL image, label) pairs, like torchvision.datasets.CIFAR10: images held as HWC uint8, converted per item.

    torchvision's own class insists on the official md5s (a synthetic set cannot match them), so this one
    reads the same files through rethink.data.cifar's loader; what happens per item is what torchvision does.
    """

    def __init__(self, images: np.ndarray, labels, transform=None):
        self.data = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # NCHW -> NHWC, as torchvision stores it
        self.targets = [int(t) for t in labels]
        self.transform = transform

    @classmethod
    def from_dir(cls, root: str | Path, train: bool = True, transform=None, limit: int | None = None):
        """Read `<root>/cifar-10-batches-py` (the official format; md5-checked unless it is a synthetic set)."""
        from rethink.data.cifar import load_cifar10

        data = load_cifar10(root, download=False)
        x, y = (data.train_x, data.train_y) if train else (data.test_x, data.test_y)
        return cls(x[:limit], y[:limit], transform)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.data[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


class PerImageStandardize:
    """TensorFlow's per_image_standardization of one [C, H, W] tensor: (x - mean) / max(std, 1/sqrt(N))."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        std = x.std(unbiased=False)
        return (x - x.mean()) / torch.clamp(std, min=1.0 / math.sqrt(x.numel()))


def transforms(random_crop: bool = False):
    from torchvision import transforms as T

    crop = T.RandomCrop(CROP) if random_crop else T.CenterCrop(CROP)
    return T.Compose([crop, T.ToTensor(), PerImageStandardize()])


def loaders(train_x, train_y, test_x, test_y, device: torch.device, batch_size: int = 128,
            workers: int = TYPICAL_WORKERS, random_crop: bool = False, sampler=None):  # fmt: skip
    """Train loader (shuffled, or in `sampler`'s order), and evaluation loaders over the train and test sets."""
    pin = device.type == "cuda"
    train = DataLoader(Cifar10Images(train_x, train_y, transforms(random_crop)), batch_size=batch_size,
                       shuffle=sampler is None, sampler=sampler, num_workers=workers, pin_memory=pin)  # fmt: skip
    evals = [
        DataLoader(Cifar10Images(x, y, transforms(False)), batch_size=EVAL_BATCH, num_workers=workers, pin_memory=pin)
        for x, y in ((train_x, train_y), (test_x, test_y))
    ]
    return train, evals[0], evals[1]


def train_epoch(model, optimizer, loader, device: torch.device, max_steps: int | None = None, losses=None):
    """One pass (or `max_steps` steps) over `loader`; returns the mean loss. Appends each step's loss to `losses`."""
    model.train()
    running, steps = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        running += loss.item()
        steps += 1
        if losses is not None:
            losses.append(loss.item())
        if max_steps is not None and steps >= max_steps:
            break
    return running / max(steps, 1)


@torch.no_grad()
def evaluate(model, loader, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy) over `loader`."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return loss / max(n, 1), correct / max(n, 1)


def model_and_optimizer(name: str, device: torch.device, lr: float | None = None, momentum: float = 0.9,
                        weight_decay: float = 0.0, seed: int = 0):  # fmt: skip
    from rethink.models import DEFAULT_LR, build_model

    torch.manual_seed(seed)
    model = build_model(name).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr or DEFAULT_LR[name], momentum=momentum, weight_decay=weight_decay)
    return model, opt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, train_x, train_y, test_x, test_y, device: torch.device, steps: int, warmup: int,
            batch_size: int = 128, workers: int = TYPICAL_WORKERS) -> dict:  # fmt: skip
    """Steady-state images/s of the typical pipeline: training (after `warmup` steps) and one evaluation pass."""
    model, opt = model_and_optimizer(name, device)
    train, train_eval, test = loaders(train_x, train_y, test_x, test_y, device, batch_size, workers)
    it = iter(train)
    model.train()
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:  # a new epoch: new workers, as a typical loop pays each epoch
            it = iter(train)
            x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
    t_train = time.perf_counter() - t0
    del it
    evaluate(model, train_eval, device)  # warm-up pass
    t0 = time.perf_counter()
    evaluate(model, train_eval, device)
    evaluate(model, test, device)
    t_eval = time.perf_counter() - t0
    n_eval = len(train_eval.dataset) + len(test.dataset)
    return {
        "num_workers": workers,
        "train_images_per_s": steps * batch_size / t_train,
        "eval_images_per_s": n_eval / t_eval,
    }


def run_epochs(name: str, train_x, train_y, test_x, test_y, device: torch.device, epochs: int,
               batch_size: int = 128, workers: int = TYPICAL_WORKERS) -> list[dict]:  # fmt: skip
    """Whole epochs as the trainer runs them (train, then evaluate the train and test sets); seconds of each."""
    model, opt = model_and_optimizer(name, device)
    train, train_eval, test = loaders(train_x, train_y, test_x, test_y, device, batch_size, workers)
    out = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, train, device)
        _sync(device)
        t_train = time.perf_counter() - t0
        _, train_acc = evaluate(model, train_eval, device)
        _, test_acc = evaluate(model, test, device)
        out.append({"train_seconds": t_train, "epoch_seconds": time.perf_counter() - t0, "train_loss": loss,
                    "train_acc": train_acc, "test_acc": test_acc})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    """The typical pipeline as a whole process, for end-to-end comparisons with `rethink train` (bench/e2e-mlp.py)."""
    import argparse

    from rethink.data.cifar import load_cifar10
    from rethink.models import MODELS

    p = argparse.ArgumentParser(prog="python -m rethink.perf.baseline", description=main.__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", choices=MODELS, default="mlp-1x512", help="model to train")
    p.add_argument("--data-dir", required=True, help="directory holding cifar-10-batches-py/ (required)")
    p.add_argument("--epochs", type=int, default=3, help="epochs, each trained then evaluated on train and test")
    p.add_argument("--workers", type=int, default=TYPICAL_WORKERS, help="DataLoader worker processes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-verify-data", action="store_true", help="skip the md5 check of the CIFAR-10 files")
    a = p.parse_args(argv)
    data = load_cifar10(a.data_dir, verify=not a.no_verify_data, download=False)
    for i, r in enumerate(run_epochs(a.model, data.train_x, data.train_y, data.test_x, data.test_y,
                                     torch.device(a.device), a.epochs, workers=a.workers)):  # fmt: skip
        print(f"epoch {i + 1}: loss {r['train_loss']:.4f} train acc {r['train_acc']:.4f} test acc {r['test_acc']:.4f} "
              f"({r['epoch_seconds']:.1f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
