"""The store: one interface, a local and an S3 backend chosen by URL; whole-object, atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rethink.errors import UserError
from rethink.store import LocalStore, S3Store, StoreError, open_store, run_key


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

    monkeypatch.setattr("rethink.store.os.fsync", broken_fsync)
    with pytest.raises(StoreError, match="No space left on device") as e:
        store.write_bytes("runs/a/result.json", b"new")
    assert "\n" not in str(e.value)
    assert store.read_bytes("runs/a/result.json") == b"old"
    assert sorted(p.name for p in (tmp_path / "runs/a").iterdir()) == ["result.json"]


def test_readers_never_see_a_partial_object(tmp_path):
    store = LocalStore(tmp_path)
    versions = [bytes([i]) * 3_000_000 for i in range(4)]
    store.write_bytes("blob", versions[0])
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            seen.add(store.read_bytes("blob"))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(20):
        store.write_bytes("blob", versions[i % 4])
    stop.set()
    reader.join()
    assert seen <= set(versions) and seen


_WRITER = """
import sys
from rethink.store import LocalStore
store = LocalStore(sys.argv[1])
versions = [bytes([i]) * 8_000_000 for i in range(2)]
print("ready", flush=True)
i = 0
while True:
    store.write_bytes("runs/x/checkpoint.pt", versions[i % 2])
    i += 1
"""


def test_a_writer_killed_mid_write_leaves_a_whole_object(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes("runs/x/checkpoint.pt", bytes([1]) * 8_000_000)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    try:
        proc.wait(0.7)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    blob = store.read_bytes("runs/x/checkpoint.pt")
    assert blob in (bytes([0]) * 8_000_000, bytes([1]) * 8_000_000)
    # a temp file the kill left behind is not an object of the store
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
