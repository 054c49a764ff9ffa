"""Where runs live: one small interface (base), a local-directory backend (local) and an S3 backend (s3),
chosen by URL; the layout of a run's files and its state (runs); moving records between stores (records).

Layout under a store's root:
    runs/<run_id>/spec.json        written first
    runs/<run_id>/metrics.jsonl    one JSON object per finished epoch (rewritten whole, atomically)
    runs/<run_id>/checkpoint.pt    latest checkpoint (the one before it kept as checkpoint.prev.pt)
    runs/<run_id>/result.json      written last, only when the run has finished
    runs/<run_id>/error.json       the last failure, removed when the run finishes
    reports/<suite>/...            aggregation output
    data/cifar-10-python.tar.gz    the CIFAR-10 archive for cluster pods (rethink data push)
"""

from __future__ import annotations

from urllib.parse import urlparse

from rethink.errors import UserError
from rethink.store.base import DEFAULT_STORE, Store, StoreError
from rethink.store.local import LocalStore
from rethink.store.s3 import S3Store

__all__ = ["DEFAULT_STORE", "LocalStore", "S3Store", "Store", "StoreError", "open_store"]


def open_store(url: str | None = None) -> Store:
    """A store from a URL: a path or file:// URL (local), or s3://bucket/prefix."""
    url = url or DEFAULT_STORE
    if url.startswith("s3://"):
        return S3Store(url)
    if url.startswith("file://"):
        return LocalStore(urlparse(url).path)
    if "://" in url:
        raise UserError(f"unsupported store URL {url!r}: use a directory path, file://PATH or s3://bucket/prefix")
    return LocalStore(url)
