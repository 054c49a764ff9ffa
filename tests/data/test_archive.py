"""CIFAR-10 through the store: `rethink data push` once, pods with an empty --data-dir unpack it from there.

The official archive is 163 MB, so these tests use an archive of the same layout made from a small synthetic
set, with rethink.data.ARCHIVE_MD5 patched to its md5 (the code reads the constant at call time).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from rethink.cli import main
from rethink.cli.options import data_of
from rethink.data import archive as datastore
from rethink.data import cifar
from rethink.data.synthetic import write_synthetic
from rethink.errors import UserError
from rethink.store import open_store


@pytest.fixture
def archive(tmp_path, monkeypatch) -> bytes:
    """A cifar-10-python.tar.gz look-alike (cifar-10-batches-py/ inside), accepted as the official one."""
    src = tmp_path / "src"
    write_synthetic(src, 20, 5, seed=0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / cifar.DIRNAME, arcname=cifar.DIRNAME)
    content = buf.getvalue()
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", hashlib.md5(content).hexdigest())
    return content


@pytest.fixture
def local_archive(tmp_path, archive) -> Path:
    """A data directory holding the archive (not unpacked), as after a manual download."""
    d = tmp_path / "have"
    d.mkdir()
    (d / cifar.ARCHIVE_NAME).write_bytes(archive)
    return d


def test_push_then_fetch(tmp_path, local_archive, archive):
    store = open_store(str(tmp_path / "store"))
    assert datastore.push(store, local_archive) is True
    assert store.read_bytes(datastore.KEY) == archive
    assert store.read_text(datastore.MD5_KEY).split()[0] == cifar.ARCHIVE_MD5
    assert datastore.push(store, local_archive) is False  # once

    pod = tmp_path / "pod-data"
    assert datastore.fetch(store, pod) is True
    loaded = cifar.load_cifar10(pod, download=False)
    assert len(loaded.train_y) == 20 and len(loaded.test_y) == 5
    assert [p.name for p in pod.iterdir()] == [cifar.DIRNAME]  # no archive or temp files left behind


def test_push_is_skipped_by_content_without_the_md5_record(tmp_path, local_archive, archive):
    store = open_store(str(tmp_path / "store"))
    store.write_bytes(datastore.KEY, archive)  # e.g. copied there by hand
    assert datastore.push(store, tmp_path / "empty") is False  # no download attempted
    assert store.read_text(datastore.MD5_KEY).split()[0] == cifar.ARCHIVE_MD5


def test_push_replaces_a_wrong_archive(tmp_path, local_archive, archive):
    store = open_store(str(tmp_path / "store"))
    store.write_bytes(datastore.KEY, b"not the archive")
    assert datastore.push(store, local_archive) is True
    assert store.read_bytes(datastore.KEY) == archive


def test_push_downloads_when_the_archive_is_not_at_hand(tmp_path, archive, monkeypatch):
    calls = []

    def fake_download(data_dir: Path) -> None:  # what torchvision's download_and_extract_archive leaves
        calls.append(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / cifar.ARCHIVE_NAME).write_bytes(archive)

    monkeypatch.setattr(cifar, "download_archive", fake_download)
    store = open_store(str(tmp_path / "store"))
    assert datastore.push(store, tmp_path / "dl") is True
    assert calls == [tmp_path / "dl"]
    assert store.read_bytes(datastore.KEY) == archive


def test_push_refuses_an_unofficial_local_archive(tmp_path, archive):
    d = tmp_path / "bad"
    d.mkdir()
    (d / cifar.ARCHIVE_NAME).write_bytes(archive + b"x")
    with pytest.raises(UserError, match="not the official CIFAR-10 archive"):
        datastore.push(open_store(str(tmp_path / "store")), d)


def test_fetch_without_archive_and_with_a_corrupt_one(tmp_path, archive):
    store = open_store(str(tmp_path / "store"))
    assert datastore.fetch(store, tmp_path / "pod") is False
    store.write_bytes(datastore.KEY, archive[:-10])
    with pytest.raises(UserError, match="rethink data push"):
        datastore.fetch(store, tmp_path / "pod")
    assert not (tmp_path / "pod" / cifar.DIRNAME).exists()


def test_train_data_dir_is_filled_from_the_store_before_any_download(tmp_path, local_archive, monkeypatch):
    store_dir = tmp_path / "store"
    datastore.push(open_store(str(store_dir)), local_archive)
    monkeypatch.setattr(
        cifar, "download_archive", lambda d: pytest.fail("downloaded although the store has the archive")
    )
    args = argparse.Namespace(data_dir=str(tmp_path / "pod"), synthetic=False, store=str(store_dir))
    path = data_of(args).directory()
    assert (path / cifar.DIRNAME / cifar.META_FILE).exists()
    assert datastore.fetch_if_missing(str(store_dir), path) is False  # already there: nothing fetched again


def test_data_push_command(tmp_path, local_archive, capsys):
    store = tmp_path / "store"
    assert main(["data", "push", "--store", str(store), "--data-dir", str(local_archive)]) == 0
    assert (store / datastore.KEY).exists()
    assert "pushed" in capsys.readouterr().err
    assert main(["data", "push", "--store", str(store), "--data-dir", str(local_archive)]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main(["data", "push", "--store", str(tmp_path / "other"), "--synthetic"]) == 0
    assert "nothing to push" in capsys.readouterr().out
    assert not (tmp_path / "other").exists()


def test_push_and_fetch_through_s3(s3_env, s3_url, tmp_path, local_archive, archive):
    store = open_store(s3_url)
    assert datastore.push(store, local_archive) is True
    assert datastore.push(store, local_archive) is False
    assert datastore.fetch(store, tmp_path / "pod") is True
    assert (tmp_path / "pod" / cifar.DIRNAME / cifar.META_FILE).exists()
