"""`rethink export` / `rethink import`: run records move between stores intact, and nothing tampered with,
damaged or conflicting gets in."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from rethink.cli import main
from rethink.data.cifar import load_cifar10
from rethink.data.synthetic import write_synthetic
from rethink.errors import UserError
from rethink.spec import RunSpec
from rethink.store import LocalStore
from rethink.store.records import RECORD_FILES, export, finished_run_ids, import_archive
from rethink.store.runs import run_key
from rethink.training.options import ExecOptions
from rethink.training.trainer import train_run

QUIET = ExecOptions(device="cpu", progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A store with two finished runs and one partial run (killed after its first epoch's checkpoint)."""
    root = tmp_path_factory.mktemp("records")
    write_synthetic(root / "data", 100, 20, seed=0)
    data = load_cifar10(root / "data", download=False)
    store = LocalStore(root / "store")
    specs = [RunSpec(model="mlp-1x512", dataset=data.identity, epochs=2, batch_size=50, seed=s) for s in range(3)]
    import torch

    torch.set_num_threads(1)
    for s in specs[:2]:
        train_run(s, store, data, QUIET)
    train_run(specs[2], store, data, QUIET)
    store.delete(run_key(specs[2].run_id, "result.json"))  # as if killed after epoch 1's checkpoint
    lines = store.read_text(run_key(specs[2].run_id, "metrics.jsonl")).splitlines()
    store.write_text(run_key(specs[2].run_id, "metrics.jsonl"), lines[0] + "\n")
    return store, specs, data


def _files(store, rid):
    return {n: store.read_bytes(run_key(rid, n)) for n in RECORD_FILES}


def test_records_move_between_stores_byte_for_byte(source, tmp_path):
    store, specs, _ = source
    out = export(store, str(tmp_path / "a.tar.gz"), log=lambda m: None)
    assert out.runs == sorted(s.run_id for s in specs[:2]) == finished_run_ids(store)
    with tarfile.open(out.path) as tar:
        names = set(tar.getnames())
    assert not any(n.endswith(".pt") for n in names)  # records only: no checkpoints
    assert "manifest.json" in names
    target = LocalStore(tmp_path / "results")
    lines: list[str] = []
    got = import_archive(out.path, target, log=lines.append)
    assert sorted(got.added) == out.runs and got.identical == []
    assert any(f"imported 2 runs into {target.where()}" in line for line in lines)
    assert any(specs[0].label() in line for line in lines)  # says what it added
    for rid in out.runs:
        assert _files(target, rid) == _files(store, rid)
        assert not target.exists(run_key(rid, "checkpoint.pt"))
    again = import_archive(out.path, target, log=lambda m: None)
    assert again.added == [] and sorted(again.identical) == out.runs


def _rewrite(path, out, change):
    """Copy an archive, applying change(name, bytes) -> bytes to each member."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    with tarfile.open(out, "w:gz") as tar:
        for name, blob in members.items():
            blob = change(name, blob)
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return members


def test_a_tampered_record_is_refused_and_nothing_is_imported(source, tmp_path):
    store, specs, _ = source
    path = export(store, str(tmp_path / "a.tar.gz"), log=lambda m: None).path
    victim = specs[1].run_id

    def edit_spec(name, blob):  # a changed learning rate: the spec no longer hashes to the run id
        if name == f"runs/{victim}/spec.json":
            d = json.loads(blob)
            d["lr"] = 0.02
            return json.dumps(d).encode()
        return blob

    _rewrite(path, tmp_path / "edited.tar.gz", edit_spec)
    target = LocalStore(tmp_path / "t1")
    with pytest.raises(UserError, match="differ from their manifest checksums"):
        import_archive(str(tmp_path / "edited.tar.gz"), target, log=lambda m: None)
    assert finished_run_ids(target) == []

    # The same edit with the manifest's checksum updated to match: refused because of the run id.
    import hashlib

    def edit_both(name, blob):
        blob = edit_spec(name, blob)
        if name == "manifest.json":
            m = json.loads(blob)
            with tarfile.open(tmp_path / "edited.tar.gz") as tar:
                new = tar.extractfile(f"runs/{victim}/spec.json").read()
            m["files"][f"runs/{victim}/spec.json"] = hashlib.sha256(new).hexdigest()
            return json.dumps(m).encode()
        return blob

    _rewrite(path, tmp_path / "forged.tar.gz", edit_both)
    with pytest.raises(UserError, match=f"{victim}: its spec hashes to .* not to its run id"):
        import_archive(str(tmp_path / "forged.tar.gz"), target, log=lambda m: None)
    assert finished_run_ids(target) == []  # all or nothing: the good run was not added either


def test_a_record_that_differs_from_the_one_there_is_refused(source, tmp_path):
    store, specs, _ = source
    path = export(store, str(tmp_path / "a.tar.gz"), log=lambda m: None).path
    target = LocalStore(tmp_path / "t")
    rid = specs[0].run_id
    for n, blob in _files(store, rid).items():  # the same run, computed elsewhere: other timings
        if n == "result.json":
            r = json.loads(blob)
            r["total_seconds"] += 1.0
            blob = json.dumps(r).encode()
        target.write_bytes(run_key(rid, n), blob)
    with pytest.raises(UserError, match=f"{rid}: differs from the finished record already in .*result.json"):
        import_archive(path, target, log=lambda m: None)
    assert finished_run_ids(target) == [rid]  # the other run was not added


def test_partial_checkpoints_travel_only_when_asked(source, tmp_path):
    store, specs, data = source
    partial = specs[2].run_id
    out = export(store, str(tmp_path / "p.tar.gz"), [specs[0].run_id], [partial], log=lambda m: None)
    assert out.partial == [partial]
    results = LocalStore(tmp_path / "results")
    got = import_archive(out.path, results, log=lambda m: None)
    assert got.partial == [] and got.skipped_partial == [partial]
    assert not results.exists(run_key(partial, "checkpoint.pt"))  # a results store holds no checkpoints
    work = LocalStore(tmp_path / "work")
    got = import_archive(out.path, work, with_checkpoints=True, log=lambda m: None)
    assert got.partial == [partial]
    lines: list[str] = []
    result = train_run(specs[2], work, data, ExecOptions(device="cpu", progress=False, log=lines.append))
    assert any("resuming at epoch 2" in line for line in lines)  # it went on from the imported checkpoint
    assert result["epochs"] == 2


def test_a_size_limit_leaves_out_checkpoints_that_do_not_fit(source, tmp_path):
    store, specs, _ = source
    out = export(store, str(tmp_path / "s.tar.gz"), [specs[0].run_id], [specs[2].run_id], max_bytes=2**20,
                 log=lambda m: None)  # fmt: skip
    assert out.partial == [] and out.skipped_partial == [specs[2].run_id] and out.bytes < 2**20
    with pytest.raises(UserError, match="more than the .* allowed"):
        export(store, str(tmp_path / "t.tar.gz"), [specs[0].run_id], max_bytes=100, log=lambda m: None)


def test_export_and_import_commands(source, tmp_path, capsys):
    store, specs, _ = source
    archive = tmp_path / "cli.tar.gz"
    assert main(["export", "--store", str(store.root), "--out", str(archive)]) == 0
    assert "exported 2 finished runs" in capsys.readouterr().out
    assert main(["import", str(archive), "--store", str(tmp_path / "res")]) == 0
    assert "imported 2 runs" in capsys.readouterr().out
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    assert main(["import", str(tmp_path / "junk.tar.gz"), "--store", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err


def _tampered(path, out, how: str, victim: str) -> str:
    """A copy of the archive with one file of run `victim` edited, added or removed, the manifest left as
    exported; returns the name of the file concerned."""
    name = {"metrics": f"runs/{victim}/metrics.jsonl", "result": f"runs/{victim}/result.json",
            "added": f"runs/{victim}/extra.txt", "removed": f"runs/{victim}/metrics.jsonl"}[how]  # fmt: skip
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    if how == "metrics":  # one epoch's test accuracy raised by a point, the line still valid JSON
        lines = members[name].decode().splitlines()
        first = json.loads(lines[0])
        first["test_acc"] += 0.01
        members[name] = ("\n".join([json.dumps(first), *lines[1:]]) + "\n").encode()
    elif how == "result":
        d = json.loads(members[name])
        d["final_test_acc"] = 0.99
        members[name] = json.dumps(d).encode()
    elif how == "added":
        members[name] = b"not a record\n"
    else:
        del members[name]
    with tarfile.open(out, "w:gz") as tar:
        for n, blob in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return name


@pytest.mark.parametrize("how", ["metrics", "result", "added", "removed"])
def test_an_archive_changed_after_export_is_refused_naming_the_file(source, tmp_path, how, capsys):
    from rethink.cli import main

    store, specs, _ = source
    path = export(store, str(tmp_path / "a.tar.gz"), log=lambda m: None).path
    bad = tmp_path / "bad.tar.gz"
    name = _tampered(path, bad, how, specs[1].run_id)
    target = tmp_path / "results"
    with pytest.raises(UserError) as e:
        import_archive(str(bad), LocalStore(target), log=lambda m: None)
    assert name in str(e.value) and "\n" not in str(e.value)
    assert main(["import", str(bad), "--store", str(target)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0]
    assert not target.exists() or not any(p.is_file() for p in target.rglob("*"))  # nothing written
