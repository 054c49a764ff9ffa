"""CIFAR-10 on disk (official "python version" layout), synthetic look-alikes, and the paper's preprocessing.

The loader reads `<data-dir>/cifar-10-batches-py/` exactly as the official archive unpacks. Synthetic data sets
are written in the same format (so tests exercise this loader) and carry a marker in `batches.meta` that makes
the loader accept them without md5 checks and label everything computed from them "synthetic".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rethink.errors import UserError

DIRNAME = "cifar-10-batches-py"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
# md5 of each file of the official archive (published with it; the same table torchvision checks).
FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SYNTHETIC_KEY = b"rethink_synthetic"
URL_ENV = "RETHINK_CIFAR10_URL"  # a mirror of the official archive, e.g. inside an air-gapped network

IMAGE = 32
CROP = 28
BORDER = (IMAGE - CROP) // 2  # the central crop takes rows and columns 2..29
INPUT_DIM = 3 * CROP * CROP  # 2352 values per preprocessed image


@dataclass(frozen=True)
class Cifar10:
    """CIFAR-10 (or a synthetic look-alike) as host arrays: images uint8 [N, 3, 32, 32], labels int64 [N]."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    synthetic: bool
    identity: str  # "cifar10", or "synthetic-..." naming the generator's parameters
    path: str
    digests: _Digests | None = field(default=None, repr=False, compare=False)  # md5s of the files as read

    @property
    def file_md5(self) -> dict:
        """md5 of each file read, from the bytes read (waits for the background hashing to finish)."""
        return {} if self.digests is None else self.digests.get()

    @property
    def description(self) -> str:
        kind = "SYNTHETIC data (not CIFAR-10)" if self.synthetic else "CIFAR-10"
        return f"{kind}: {len(self.train_y)} train / {len(self.test_y)} test images from {self.path}"

    @property
    def official(self) -> bool:
        """Whether every data file read is byte for byte the official release's (its published md5)."""
        return bool(self.file_md5) and all(FILE_MD5.get(n) == m for n, m in self.file_md5.items())

    def provenance(self) -> dict:
        """What a result records of its data: identity, each file's md5 and whether they are the official ones.

        No machine path: a result is committed and compared across machines.
        """
        return {
            "identity": self.identity,
            "synthetic": self.synthetic,
            "train_images": int(len(self.train_y)),
            "test_images": int(len(self.test_y)),
            "file_md5": dict(sorted(self.file_md5.items())),
            "official_md5": self.official,
            "description": f"{'SYNTHETIC data (not CIFAR-10)' if self.synthetic else 'CIFAR-10'}: "
                           f"{len(self.train_y)} train / {len(self.test_y)} test images"
                           + ("" if self.synthetic else
                              " (official files)" if self.official else " (md5s differ from the official files)"),
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------- reading


class _Digests:
    """The md5 of each file's bytes, computed in a background thread: a run does not wait for its provenance
    (0.25 s for CIFAR-10) unless it verifies the files before using them. hashlib releases the GIL."""

    def __init__(self, blobs: dict[str, bytes]):
        self._md5: dict[str, str] = {}
        self._thread = threading.Thread(target=self._hash, args=(dict(blobs),), daemon=True)
        self._thread.start()

    def _hash(self, blobs: dict[str, bytes]) -> None:
        for name in sorted(blobs):
            self._md5[name] = hashlib.md5(blobs[name]).hexdigest()

    def get(self) -> dict[str, str]:
        self._thread.join()
        return dict(self._md5)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts and nothing else: a data file must not be able to run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # what Python 3 writes for bytes under protocol 2 and for arrays under protocol 5: data, not code
        ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"missing file {path}: the data set is incomplete; re-download or re-create it") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _unpickle(path: Path, blob: bytes | None = None) -> dict:
    """The pickled dict in `path` (or in `blob`, the bytes already read from it)."""
    if blob is None:
        blob = _read(path)
    try:
        obj = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # truncated or not a pickle at all
        raise UserError(
            f"cannot read {path} ({type(e).__name__}: {e}); the file is truncated or corrupt: "
            "delete the directory and download the archive again"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR-10 batch file (expected a dict, found {type(obj).__name__})")
    return obj


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _batch_arrays(path: Path, blob: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path, blob)
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except KeyError as e:
        raise UserError(f"{path} lacks the key {e}; it is not a CIFAR-10 python-version batch file") from None
    if data.ndim != 2 or data.shape[1] != 3 * IMAGE * IMAGE or len(labels) != len(data):
        raise UserError(f"{path} has data of shape {data.shape} and {len(labels)} labels; expected [n, 3072] and n")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{path} has labels outside 0..9")
    return data.reshape(-1, 3, IMAGE, IMAGE), labels


def read_meta(root: Path) -> dict:
    return _unpickle(root / META_FILE)


def is_synthetic(data_dir: str | os.PathLike) -> bool:
    """True when `data_dir` holds a data set written by `write_synthetic`."""
    root = Path(data_dir) / DIRNAME
    return (root / META_FILE).exists() and SYNTHETIC_KEY in read_meta(root)


def synthetic_identity(n_train: int, n_test: int, seed: int) -> str:
    """The identity of the synthetic set `write_synthetic(out, n_train, n_test, seed)` writes."""
    return f"synthetic-n{n_train}-m{n_test}-s{seed}"


def _synthetic_identity(meta: dict) -> str:
    info = json.loads(meta[SYNTHETIC_KEY].decode())
    return synthetic_identity(info["train"], info["test"], info["seed"])


def dataset_identity(data_dir: str | os.PathLike) -> str:
    """The identity recorded in run specs: "cifar10", or the synthetic generator's parameters."""
    root = Path(data_dir) / DIRNAME
    if (root / META_FILE).exists():
        meta = read_meta(root)
        if SYNTHETIC_KEY in meta:
            return _synthetic_identity(meta)
    return "cifar10"


def _download(data_dir: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    url = os.environ.get(URL_ENV, ARCHIVE_URL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            download_and_extract_archive(url, download_root=str(data_dir), filename=ARCHIVE_NAME, md5=ARCHIVE_MD5)
    except Exception as e:
        raise UserError(
            f"CIFAR-10 not found in {data_dir / DIRNAME} and downloading {url} failed ({type(e).__name__}: {e}); "
            f"put {ARCHIVE_NAME} unpacked into {data_dir}, set {URL_ENV} to a mirror, or use --synthetic"
        ) from None


def load_cifar10(data_dir: str | os.PathLike, verify: bool = True, download: bool = True) -> Cifar10:
    """Read CIFAR-10 (or a synthetic set) from `<data_dir>/cifar-10-batches-py/`, verifying md5s by default."""
    data_dir = Path(data_dir)
    root = data_dir / DIRNAME
    if not root.is_dir():
        if not download:
            raise UserError(
                f"CIFAR-10 not found: no directory {root}; download {ARCHIVE_NAME} and unpack it into {data_dir}, "
                "or use --synthetic"
            )
        _download(data_dir)
    meta_blob = _read(root / META_FILE)
    meta = _unpickle(root / META_FILE, meta_blob)
    synthetic = SYNTHETIC_KEY in meta
    if not synthetic and not verify:
        warnings.warn(f"not verifying md5 checksums of {root} (--no-verify-data)", stacklevel=2)
    # Each file is read once; its md5 comes from the bytes read (checked before unpickling, recorded always).
    blobs = {name: _read(root / name) for name in (*TRAIN_FILES, TEST_FILE)}
    digests = _Digests({**blobs, META_FILE: meta_blob})
    if not synthetic:
        if verify:
            md5 = digests.get()
            for name, expected in FILE_MD5.items():
                if md5[name] != expected:
                    raise UserError(
                        f"md5 mismatch for {root / name}: not the official CIFAR-10 file (truncated or re-packed?); "
                        "download it again, or pass --no-verify-data to use it anyway"
                    )
    train = [_batch_arrays(root / name, blobs.pop(name)) for name in TRAIN_FILES]
    test_x, test_y = _batch_arrays(root / TEST_FILE, blobs.pop(TEST_FILE))
    return Cifar10(
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        synthetic=synthetic,
        identity=_synthetic_identity(meta) if synthetic else "cifar10",
        path=str(root),
        digests=digests,
    )


# ---------------------------------------------------------------------------------------------- synthetic


def synthetic_images(n: int, rng: np.random.Generator, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images scattered around one smooth prototype per class: learnable, but not trivially separable."""
    labels = rng.integers(0, 10, size=n)
    noise = rng.normal(0.0, 1.0, size=(n, 3, IMAGE // 4, IMAGE // 4))
    noise = noise.repeat(4, axis=2).repeat(4, axis=3)  # blocky, image-like noise
    fine = rng.normal(0.0, 0.35, size=(n, 3, IMAGE, IMAGE))
    brightness = rng.normal(0.0, 0.3, size=(n, 1, 1, 1))
    x = 0.12 * prototypes[labels] + 0.9 * noise + fine + brightness
    img = np.clip(128 + 40 * x, 0, 255).astype(np.uint8)
    return img.reshape(n, -1), labels


class _Py2Pickler(pickle._Pickler):
    """Pickles like the official files (written by Python 2): bytes as py2 `str`, numpy under numpy.core.

    Python 2 strings load as bytes with encoding='bytes' and as str with encoding='latin1', so any CIFAR-10
    reader (this one, torchvision's) reads a synthetic file exactly as it reads the official one.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            module = "numpy.core" + module[len("numpy._core") :]
            self.write(pickle.GLOBAL + module.encode() + b"\n" + (name or obj.__name__).encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _write_pickle(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)
    os.replace(tmp, path)


def write_synthetic(out: str | os.PathLike, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write a synthetic data set in the official on-disk format under `<out>/cifar-10-batches-py/`."""
    if n_train < 5 or n_test < 1:
        raise UserError(f"--train must be at least 5 (one per batch file) and --test at least 1; got {n_train}, {n_test}")
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 1.0, size=(10, 3, 4, 4))
    prototypes = coarse.repeat(IMAGE // 4, axis=2).repeat(IMAGE // 4, axis=3)
    root = Path(out) / DIRNAME
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_synthetic_files(root, n_train, n_test, seed, rng, prototypes)
    except OSError as e:
        raise UserError(f"cannot write a synthetic data set to {out}: {e.strerror} ({e.filename})") from None
    return root


def _write_synthetic_files(root: Path, n_train: int, n_test: int, seed: int, rng, prototypes) -> None:
    data, labels = synthetic_images(n_train, rng, prototypes)
    for i, idx in enumerate(np.array_split(np.arange(n_train), 5)):
        _write_pickle(
            root / TRAIN_FILES[i],
            {
                b"batch_label": f"synthetic training batch {i + 1} of 5".encode(),
                b"labels": labels[idx].tolist(),
                b"data": data[idx],
                b"filenames": [f"synthetic_{j:06d}.png".encode() for j in idx],
            },
        )
    test_data, test_labels = synthetic_images(n_test, rng, prototypes)
    _write_pickle(
        root / TEST_FILE,
        {
            b"batch_label": b"synthetic testing batch 1 of 1",
            b"labels": test_labels.tolist(),
            b"data": test_data,
            b"filenames": [f"synthetic_test_{j:06d}.png".encode() for j in range(n_test)],
        },
    )
    # Written last: a directory without it is not a complete data set.
    _write_pickle(
        root / META_FILE,
        {
            b"num_cases_per_batch": int(np.ceil(n_train / 5)),
            b"label_names": [n.encode() for n in LABEL_NAMES],
            b"num_vis": 3 * IMAGE * IMAGE,
            SYNTHETIC_KEY: json.dumps({"train": n_train, "test": n_test, "seed": seed, "format": 1}).encode(),
        },
    )


# ---------------------------------------------------------------------------------------------- preprocessing


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
