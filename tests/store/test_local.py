"""The store: one interface, a local and an S3 backend chosen by URL; whole-object, atomic writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rethink.errors import UserError
from rethink.store import LocalStore, S3Store, StoreError, open_store
from rethink.store.runs import run_key


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same tests against both backends (the S3 one on the local test server)."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return open_store(request.getfixturevalue("s3_url"))


def test_read_write_round_trip(store):
    assert store.read_bytes("runs/a/x.bin") is None
    store.write_bytes("runs/a/x.bin", b"\x00\x01" * 1000)
    assert store.read_bytes("runs/a/x.bin") == b"\x00\x01" * 1000
    store.write_text("runs/a/y.json", '{"é": 1}\n')
    assert store.read_text("runs/a/y.json") == '{"é": 1}\n'
    store.write_bytes("runs/a/x.bin", b"")  # overwrite, with an empty object
    assert store.read_bytes("runs/a/x.bin") == b""


def test_exists_list_delete(store):
    for key in (
        "runs/b/spec.json",
        "runs/a/spec.json",
        "runs/a/sub/deep.txt",
        "runs/ab/spec.json",
        "top.txt",
    ):
        store.write_text(key, key)
    assert store.exists("runs/a/spec.json") and not store.exists("runs/a/nope.json")
    # every key under the prefix, recursively and sorted; a prefix is a directory, not a string prefix
    assert store.list("runs/a") == ["runs/a/spec.json", "runs/a/sub/deep.txt"]
    assert store.list("runs/a/") == ["runs/a/spec.json", "runs/a/sub/deep.txt"]
    assert store.list("runs") == [
        "runs/a/spec.json", "runs/a/sub/deep.txt", "runs/ab/spec.json", "runs/b/spec.json"
    ]  # fmt: skip
    assert store.list("nothing/here") == []
    store.delete("runs/a/spec.json")
    assert not store.exists("runs/a/spec.json") and store.read_bytes("runs/a/spec.json") is None
    assert store.list("runs/a") == ["runs/a/sub/deep.txt"]
    store.delete("runs/a/spec.json")  # deleting what is not there is no error


def test_copy(store):
    store.write_bytes("runs/a/checkpoint.pt", b"one")
    store.copy("runs/a/checkpoint.pt", "runs/a/checkpoint.prev.pt")
    store.write_bytes("runs/a/checkpoint.pt", b"two")
    assert store.read_bytes("runs/a/checkpoint.prev.pt") == b"one"
    store.copy("runs/a/checkpoint.pt", "runs/a/checkpoint.prev.pt")  # over an older copy
    store.write_bytes("runs/a/checkpoint.pt", b"three")
    assert store.read_bytes("runs/a/checkpoint.prev.pt") == b"two"
    assert store.list("runs/a") == ["runs/a/checkpoint.prev.pt", "runs/a/checkpoint.pt"]
    assert store.usage("runs/a") == (2, len(b"two") + len(b"three"))
    store.copy("runs/a/checkpoint.pt", "runs/a/checkpoint.prev.pt")  # the same bytes twice: stored once locally
    assert store.usage("runs/a") == (2, 5 if isinstance(store, LocalStore) else 10)
    store.copy("runs/a/missing.pt", "runs/a/other.pt")  # nothing to copy: nothing happens
    assert not store.exists("runs/a/other.pt")


def test_where_names_the_location(store):
    assert store.where(run_key("abc", "result.json")).endswith("/runs/abc/result.json")
    assert store.where(run_key("abc", "result.json")).startswith(store.url)


# ---------------------------------------------------------------------------------------------- URLs


def test_open_store_by_url(tmp_path, monkeypatch):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    local = open_store(f"file://{tmp_path}/x")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "x"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.where("runs/x") == "s3://bucket/some/prefix/runs/x"
    monkeypatch.chdir(tmp_path)
    assert open_store(None).root == Path("runs")  # the default: ./runs


@pytest.mark.parametrize("url", ["gs://bucket/x", "http://host/x", "ftp://a"])
def test_unsupported_scheme_is_a_user_error(url):
    with pytest.raises(UserError, match="unsupported store URL") as e:
        open_store(url)
    assert "s3://bucket/prefix" in str(e.value)


def test_s3_url_without_bucket_is_a_user_error():
    with pytest.raises(UserError, match="s3://bucket/prefix"):
        open_store("s3://")


# ---------------------------------------------------------------------------------------------- local atomicity


def test_failed_write_leaves_the_old_object_and_no_temp_file(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.write_bytes("runs/a/result.json", b"old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("rethink.store.local.os.fsync", broken_fsync)
    with pytest.raises(StoreError, match="No space left on device") as e:
        store.write_bytes("runs/a/result.json", b"new")
    assert "\n" not in str(e.value)
    assert store.read_bytes("runs/a/result.json") == b"old"
    assert sorted(p.name for p in (tmp_path / "runs/a").iterdir()) == ["result.json"]


def test_a_reader_during_a_write_sees_the_old_object_whole(tmp_path, monkeypatch):
    """Reads from inside a write (the new bytes in the temp file, then just before and after the rename)."""
    store = LocalStore(tmp_path)
    old, new = b"o" * 3_000_000, b"n" * 3_000_000
    store.write_bytes("blob", old)
    seen: list[tuple[str, bytes | None]] = []
    fsync, replace = os.fsync, os.replace

    def fsync_then_read(fd):
        if not seen:  # the first fsync is the temp file's: its data is complete, the object not yet replaced
            temp = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            seen.append(("temp file", temp[0].read_bytes() if len(temp) == 1 else None))
            seen.append(("during the write", store.read_bytes("blob")))
        fsync(fd)

    def replace_between_reads(src, dst):
        seen.append(("before the rename", store.read_bytes("blob")))
        replace(src, dst)
        seen.append(("after the rename", store.read_bytes("blob")))

    monkeypatch.setattr("rethink.store.local.os.fsync", fsync_then_read)
    monkeypatch.setattr("rethink.store.local.os.replace", replace_between_reads)
    store.write_bytes("blob", new)
    monkeypatch.undo()
    assert seen == [
        ("temp file", new),  # the reads below did overlap a write in progress
        ("during the write", old),
        ("before the rename", old),
        ("after the rename", new),
    ]  # fmt: skip
    assert store.list("") == ["blob"]


# Dies (SIGKILL) inside a write: the new bytes are in the temp file, not yet renamed over the old object.
_KILLED_MID_WRITE = """
import os, signal, sys
from rethink.store import LocalStore

def fsync(fd):
    os.kill(os.getpid(), signal.SIGKILL)

os.fsync = fsync
LocalStore(sys.argv[1]).write_bytes("runs/x/checkpoint.pt", bytes([0]) * 8_000_000)
"""


def test_a_writer_killed_mid_write_leaves_a_whole_object(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes("runs/x/checkpoint.pt", bytes([1]) * 8_000_000)
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(tmp_path)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # The kill landed mid-write: the new version is all there, in a temp file beside the object ...
    (temp,) = [p for p in (tmp_path / "runs/x").iterdir() if p.name != "checkpoint.pt"]
    assert temp.name.endswith(".tmp") and temp.read_bytes() == bytes([0]) * 8_000_000
    # ... and the object is the old version, whole; the temp file is not an object of the store.
    assert store.read_bytes("runs/x/checkpoint.pt") == bytes([1]) * 8_000_000
    assert store.list("runs") == ["runs/x/checkpoint.pt"]


def test_files_get_the_usual_permissions(tmp_path):
    store = LocalStore(tmp_path)
    store.write_text("runs/a/result.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "runs/a/result.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_unwritable_location_is_one_clear_line(tmp_path):
    (tmp_path / "runs").write_text("a file where a directory should be")
    store = LocalStore(tmp_path)
    with pytest.raises(StoreError, match="cannot write") as e:
        store.write_text("runs/a/spec.json", "{}")
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    assert e.value.exit_code != 0
