"""CIFAR-10 through the store: `rethink data push` puts the official archive there once, pods fetch it from there.

Cluster pods start with an empty --data-dir. Downloading 170 MB from the dataset's home page in every pod is
slow, rude to its host and impossible in an air-gapped cluster, so one step (the workflow's data step, or a
person with the archive at hand) puts the archive into the store, and every pod unpacks it from there:

    <store>/data/cifar-10-python.tar.gz        the official archive, byte for byte
    <store>/data/cifar-10-python.tar.gz.md5    its md5, written after it (so a push is skipped without a download)
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from rethink.data import cifar
from rethink.errors import UserError

if TYPE_CHECKING:  # a store is passed in: the data layer does not import the store layer
    from rethink.store import Store

KEY = f"data/{cifar.ARCHIVE_NAME}"
MD5_KEY = KEY + ".md5"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def in_store(store: Store) -> bool:
    """True when the store holds the official archive (by its recorded md5, else by its content)."""
    if not store.exists(KEY):
        return False
    recorded = (store.read_text(MD5_KEY) or "").split()
    if recorded and recorded[0] == cifar.ARCHIVE_MD5:
        return True
    content = store.read_bytes(KEY)
    if content is not None and _md5_bytes(content) == cifar.ARCHIVE_MD5:
        store.write_text(MD5_KEY, f"{cifar.ARCHIVE_MD5}  {cifar.ARCHIVE_NAME}\n")
        return True
    return False


def _local_archive(data_dir: Path) -> Path:
    """The verified archive in data_dir, downloading it there (via rethink.data) when it is not there yet."""
    path = data_dir / cifar.ARCHIVE_NAME
    if not path.exists():
        _log(f"{path} not found: downloading the CIFAR-10 archive")
        cifar.download_archive(data_dir)  # verifies the archive's md5 and leaves it in data_dir
    if not path.exists():
        raise UserError(f"downloading CIFAR-10 left no {path}; put the official {cifar.ARCHIVE_NAME} there")
    if cifar.md5_file(path) != cifar.ARCHIVE_MD5:
        raise UserError(
            f"{path} is not the official CIFAR-10 archive (md5 differs from {cifar.ARCHIVE_MD5}); "
            "delete it and run rethink data push again to download it"
        )
    return path


def push(store: Store, data_dir: str | Path) -> bool:
    """Put the official archive into the store unless it is there already; True when it was uploaded."""
    if in_store(store):
        _log(f"CIFAR-10 archive already in {store.where(KEY)} (md5 {cifar.ARCHIVE_MD5}): nothing to do")
        return False
    path = _local_archive(Path(data_dir))
    store.write_bytes(KEY, path.read_bytes())
    # The md5 record is written last: it marks a complete push.
    store.write_text(MD5_KEY, f"{cifar.ARCHIVE_MD5}  {cifar.ARCHIVE_NAME}\n")
    _log(f"pushed {path} to {store.where(KEY)}")
    return True


def fetch(store: Store, data_dir: str | Path) -> bool:
    """Unpack the store's archive into data_dir/cifar-10-batches-py; False when the store has no archive."""
    data_dir = Path(data_dir)
    content = store.read_bytes(KEY)
    if content is None:
        return False
    if _md5_bytes(content) != cifar.ARCHIVE_MD5:
        raise UserError(
            f"{store.where(KEY)} is not the official CIFAR-10 archive (md5 differs from {cifar.ARCHIVE_MD5}); "
            f"delete it and run: rethink data push --store {store.url}"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    # Unpacked next to its destination and renamed into place: a killed pod leaves no half-written data set.
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".fetch-") as tmp:
        archive = Path(tmp) / cifar.ARCHIVE_NAME
        archive.write_bytes(content)
        del content
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"cannot unpack {store.where(KEY)} into {data_dir}: {e}") from None
        unpacked = Path(tmp) / cifar.DIRNAME
        if not unpacked.is_dir():
            raise UserError(f"{store.where(KEY)} holds no {cifar.DIRNAME}/ directory")
        target = data_dir / cifar.DIRNAME
        if target.exists():  # another process got there first
            return True
        shutil.move(str(unpacked), str(target))
    _log(f"fetched CIFAR-10 from {store.where(KEY)} into {data_dir / cifar.DIRNAME}")
    return True


def fetch_if_missing(store: Store, data_dir: str | Path) -> bool:
    """Before any download: fill an empty data_dir from the store's archive, if the store has one."""
    if (Path(data_dir) / cifar.DIRNAME).is_dir():
        return False
    return fetch(store, data_dir)
