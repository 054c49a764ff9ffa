"""CIFAR-10 on disk: the official "python version" layout, read exactly as the archive unpacks.

`load_cifar10(data_dir)` reads `<data_dir>/cifar-10-batches-py/` (downloading the archive when missing) into
host arrays. Synthetic sets (rethink/data/synthetic.py) are written in the same format with a marker in
`batches.meta` that makes the loader accept them without md5 checks and label everything computed from them
"synthetic". Every file is read once; its md5, computed from the bytes read, is each result's provenance.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import pickle
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rethink.errors import UserError
from rethink.paper import BORDER, CROP, IMAGE

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


# Where the loader puts its large arrays: (shape, dtype) -> a writable, C-contiguous, uninitialized array.
# data.forked passes one that places them in memory shared with the parent process.
Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]


class CentralCrops:
    """The central 28x28 windows of a data set's images as contiguous float32 on the 0..255 scale (exact: the
    uint8 values), made by `load_cifar10(..., central_crops=True)` in the reader (a child process, data.forked; else
    a thread), while the main thread imports torch. Allocating and filling those 564 MB is most of
    what preprocessing costs on the CPU, and off the critical path here. The one run they were made for takes
    them (`take`), standardizes them in place and trains on them; nobody else sees them."""

    def __init__(self, train_x: np.ndarray, test_x: np.ndarray, alloc: Alloc | None = None):
        self._arrays: tuple[np.ndarray, np.ndarray] | None = (central_crop_float(train_x, alloc),
                                                              central_crop_float(test_x, alloc))  # fmt: skip

    def take(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(train, test) crops the first time, None after: the caller owns them and may change them in place."""
        arrays, self._arrays = self._arrays, None
        return arrays


def central_crop_float(x: np.ndarray, alloc: Alloc | None = None) -> np.ndarray:
    """[N, 3, 32, 32] uint8 images -> their central 28x28 windows, contiguous float32 (values 0..255), in memory
    from `alloc` (default: fresh prefaulted anonymous memory)."""
    window = slice(BORDER, BORDER + CROP)
    shape = (x.shape[0], x.shape[1], CROP, CROP)
    out = alloc(shape, np.dtype(np.float32)) if alloc is not None else _prefaulted_float32(shape)
    np.copyto(out, x[:, :, window, window])
    return out


def _prefaulted_float32(shape: tuple[int, ...]) -> np.ndarray:
    """A writable float32 array in fresh anonymous memory whose pages the kernel maps in one call (MAP_POPULATE).

    numpy asks for transparent huge pages for large arrays, and on a VM whose free memory is fragmented the first
    touch of 564 MB (the training crops) then waits on the kernel's compaction: 0.9-1.2 s against 0.17-0.26 s for
    populated 4 KiB pages (docs/performance.md). Where anonymous mappings are not offered, plain np.empty."""
    size = int(np.prod(shape)) * 4
    anonymous = getattr(mmap, "MAP_ANONYMOUS", None)
    if anonymous is None or size == 0:
        return np.empty(shape, dtype=np.float32)
    flags = mmap.MAP_PRIVATE | anonymous | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), dtype=np.float32).reshape(shape)


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
    crops: CentralCrops | None = field(default=None, repr=False, compare=False)  # load_cifar10(central_crops=True)

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
    (0.25 s for CIFAR-10) unless it verifies the files before using them. hashlib releases the GIL.
    `background=False` hashes at once (a loader in a child process has no one to overlap with). Pickled, it
    is the finished digests."""

    def __init__(self, blobs: dict[str, bytes], background: bool = True):
        self._md5: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._hash, args=(dict(blobs),), daemon=True)
            self._thread.start()
        else:
            self._hash(blobs)

    def _hash(self, blobs: dict[str, bytes]) -> None:
        for name in sorted(blobs):
            self._md5[name] = hashlib.md5(blobs[name]).hexdigest()

    def get(self) -> dict[str, str]:
        if self._thread is not None:
            self._thread.join()
        return dict(self._md5)

    def __getstate__(self) -> dict:
        return {"_md5": self.get(), "_thread": None}


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


def md5_file(path: Path) -> str:
    """The md5 of a file, read in 1 MiB chunks."""
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


def download_archive(data_dir: Path) -> None:
    """Download and unpack the official archive (or $RETHINK_CIFAR10_URL's) into data_dir, md5-checked."""
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


def load_cifar10(data_dir: str | os.PathLike, verify: bool = True, download: bool = True,
                 central_crops: bool = False, alloc: Alloc | None = None, background: bool = True) -> Cifar10:  # fmt: skip
    """Read CIFAR-10 (or a synthetic set) from `<data_dir>/cifar-10-batches-py/`, verifying md5s by default.

    `central_crops`: also make the float32 central crops one CPU run preprocesses from (CentralCrops).
    `alloc`: where the images and crops go (default: numpy's memory); `background`: hash the files in a thread
    (False: before returning)."""
    data_dir = Path(data_dir)
    root = data_dir / DIRNAME
    if not root.is_dir():
        if not download:
            raise UserError(
                f"CIFAR-10 not found: no directory {root}; download {ARCHIVE_NAME} and unpack it into {data_dir}, "
                "or use --synthetic"
            )
        download_archive(data_dir)
    meta_blob = _read(root / META_FILE)
    meta = _unpickle(root / META_FILE, meta_blob)
    synthetic = SYNTHETIC_KEY in meta
    if not synthetic and not verify:
        warnings.warn(f"not verifying md5 checksums of {root} (--no-verify-data)", stacklevel=2)
    # Each file is read once; its md5 comes from the bytes read (checked before unpickling, recorded always).
    blobs = {name: _read(root / name) for name in (*TRAIN_FILES, TEST_FILE)}
    digests = _Digests({**blobs, META_FILE: meta_blob}, background)
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
    if alloc is None:
        train_x = np.concatenate([x for x, _ in train])
    else:
        train_x = np.concatenate([x for x, _ in train], out=alloc((sum(len(x) for x, _ in train), *test_x.shape[1:]),
                                                                  test_x.dtype))  # fmt: skip
        test_x = _copy_into(alloc, test_x)
    return Cifar10(
        train_x=train_x,
        train_y=np.concatenate([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        synthetic=synthetic,
        identity=_synthetic_identity(meta) if synthetic else "cifar10",
        path=str(root),
        digests=digests,
        crops=CentralCrops(train_x, test_x, alloc) if central_crops else None,
    )


def _copy_into(alloc: Alloc, x: np.ndarray) -> np.ndarray:
    out = alloc(x.shape, x.dtype)
    np.copyto(out, x)
    return out


