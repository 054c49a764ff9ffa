"""The data set read in a child process while the parent imports torch (data.forked): the same arrays, md5s
and errors as the loader in this process, and no child left behind when the parent gives up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from rethink.cli.options import Data
from rethink.data import forked
from rethink.data.cifar import DIRNAME, load_cifar10
from rethink.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

# Reads DATA_DIR in a child as `rethink train` does (torch not imported yet), and saves what came back.
_CHILD_READ = """
import functools, json, sys
import numpy as np
from rethink.cli.options import Data
from rethink.data import forked

data_dir, out = sys.argv[1], sys.argv[2]
reader = forked.start(functools.partial(Data(__import__("pathlib").Path(data_dir), verify=False).read, True))
kind = type(reader).__name__
data = reader.result()
crops = data.crops.take()
crops[0][0, 0, 0, 0] = -1.0  # the run standardizes them in place: they must be writable
np.savez(out, train_x=data.train_x, train_y=data.train_y, test_x=data.test_x, test_y=data.test_y,
         train_crops=crops[0], test_crops=crops[1])
print(json.dumps({"reader": kind, "torch": "torch" in sys.modules, "md5": data.digests.get(),
                  "identity": data.identity, "synthetic": data.synthetic, "path": data.path,
                  "writable": bool(data.train_x.flags.writeable and crops[1].flags.writeable)}))
"""


def _fresh_python(code: str) -> tuple[dict, str]:
    """Run `code` in a fresh interpreter (torch not imported, one thread: the child path); (its JSON line, stderr)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def _child_read(data_dir: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD_READ, str(data_dir), str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)  # fmt: skip


def test_a_child_process_reads_what_the_loader_reads(synth_dir, tmp_path):
    out = _child_read(synth_dir, tmp_path / "child.npz")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["reader"] == "ChildLoad" and got["torch"] is False  # the child path, not the thread fallback
    assert "ended without a result" not in out.stderr  # ... and the child's own result, not a read in the parent
    assert got["writable"] is True
    ref = load_cifar10(synth_dir, download=False, central_crops=True)
    ref_crops = ref.crops.take()
    arrays = np.load(tmp_path / "child.npz")
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert arrays[name].dtype == getattr(ref, name).dtype and np.array_equal(arrays[name], getattr(ref, name))
    expected_crop = ref_crops[0].copy()
    expected_crop[0, 0, 0, 0] = -1.0
    assert arrays["train_crops"].dtype == np.float32
    assert np.array_equal(arrays["train_crops"], expected_crop) and np.array_equal(arrays["test_crops"], ref_crops[1])
    assert got["md5"] == ref.digests.get()
    assert (got["identity"], got["synthetic"], got["path"]) == (ref.identity, ref.synthetic, ref.path)


def test_the_child_s_error_is_the_user_s_one_line(synth_dir, tmp_path):
    (synth_dir / DIRNAME / "data_batch_3").unlink()
    out = _child_read(synth_dir, tmp_path / "child.npz")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("rethink.errors.UserError: missing file") and "data_batch_3" in last, out.stderr


def test_a_parent_that_gives_up_leaves_no_child():
    # The child would sleep for an hour: a cancel that waited for it would overrun the subprocess's timeout.
    got, _ = _fresh_python(
        "import os, time, json\n"
        "from rethink.data import forked\n"
        "reader = forked.start(lambda alloc: time.sleep(3600))\n"
        "reader.cancel()\n"
        "try:\n"
        "    os.kill(reader.pid, 0); alive = True\n"
        "except ProcessLookupError:\n"
        "    alive = False\n"
        "print(json.dumps({'kind': type(reader).__name__, 'alive': alive}))\n"
    )
    assert got == {"kind": "ChildLoad", "alive": False}


def test_with_torch_imported_the_reader_is_a_thread_with_the_same_result(synth_dir):
    import torch  # noqa: F401 - forking a process that holds torch's thread pools is not safe

    assert not forked.available()
    reader = forked.start(lambda alloc: Data(synth_dir, verify=False).read(True, alloc))
    assert type(reader).__name__ != "ChildLoad"
    data = reader.result()
    ref = load_cifar10(synth_dir, download=False)
    assert np.array_equal(data.train_x, ref.train_x) and np.array_equal(data.test_y, ref.test_y)


def test_a_thread_reader_raises_the_loader_s_error(synth_dir):
    import torch  # noqa: F401 - the thread reader, as in any process that has imported torch

    assert not forked.available()
    (synth_dir / DIRNAME / "test_batch").unlink()
    reader = forked.start(lambda alloc: Data(synth_dir, verify=False).read(False, alloc))
    try:
        reader.result()
    except UserError as e:
        assert "missing file" in str(e) and "test_batch" in str(e)
    else:
        raise AssertionError("no error")


def test_rethink_train_on_the_child_s_data_trains_as_on_the_thread_s(rethink_cmd, one_thread_env, one_thread,
                                                                     train_data_dir, tmp_path, without_timing):  # fmt: skip
    """A whole `rethink train` process (data from the child) and one in this process (torch imported: data from
    a thread) give the same epochs, number for number."""
    from rethink.cli import main

    args = ["train", "--model", "mlp-1x512", "--epochs", "2", "--batch-size", "64", "--device", "cpu",
            "--data-dir", str(train_data_dir)]  # fmt: skip
    out = subprocess.run([*rethink_cmd, *args, "--store", str(tmp_path / "child")], capture_output=True, text=True,
                         env=one_thread_env, cwd=ROOT, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert main([*args, "--store", str(tmp_path / "thread")]) == 0

    def metrics(store: Path) -> list[dict]:
        (run,) = (store / "runs").iterdir()
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    child, thread = metrics(tmp_path / "child"), metrics(tmp_path / "thread")
    assert len(child) == 2 and without_timing(child) == without_timing(thread)


def test_a_child_that_dies_without_a_word_is_replaced_by_a_read_here():
    got, err = _fresh_python(
        "import os, signal, sys, time, json\n"
        "from rethink.data import forked\n"
        "reader = forked.start(lambda alloc: 'read here' if alloc is None else time.sleep(3600))\n"
        "os.kill(reader.pid, signal.SIGKILL)\n"
        "print(json.dumps({'kind': type(reader).__name__, 'result': reader.result()}))\n"
    )
    assert got == {"kind": "ChildLoad", "result": "read here"}
    assert "the data loader process ended without a result (signal 9); reading the data here" in err


def test_where_no_memory_file_can_be_made_the_reader_is_a_thread():
    """A sandbox may refuse memfd_create (seccomp): the run still reads its data, in a thread."""
    got, _ = _fresh_python(
        "import os, json\n"
        "from rethink.data import forked\n"
        "def refuse(*a, **k):\n"
        "    raise PermissionError(1, 'Operation not permitted')\n"
        "os.memfd_create = refuse\n"
        "reader = forked.start(lambda alloc: 'thread' if alloc is None else 'child')\n"
        "print(json.dumps({'kind': type(reader).__name__, 'result': reader.result()}))\n"
    )
    assert got["kind"] != "ChildLoad" and got["result"] == "thread"
