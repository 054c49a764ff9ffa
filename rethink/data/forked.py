"""Load the data set in a forked child process while this one imports torch.

A run's start has two long parts that need no each other: importing torch (~1.4 s of one core, holding the GIL
nearly throughout) and reading CIFAR-10 (~1 s: the files, their md5s, the uint8 images and the float32 crops).
In a thread of the same process the reader and the import take turns on the GIL and both take ~2.3 s; in a
child process each has its own core and interpreter, and the start takes as long as the import alone
(docs/performance.md). The child writes the large arrays straight into a memory file (memfd) created before the
fork, so nothing large is copied back: the parent maps the same pages. The rest of the result (labels, md5s,
the data set's identity) comes back pickled through a pipe, and so does an error, raised again in the parent.

Only where it is safe and possible: Linux (fork and memfd_create), a process with one Python thread and torch
not yet imported (forking torch's thread pools is not), so `start` falls back to a thread elsewhere (macOS,
Windows, a test process that has imported torch). The arrays are the same bytes either way.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

_PAGE = mmap.ALLOCATIONGRANULARITY


def available() -> bool:
    """Whether a child process may load the data: fork and memfd exist, one thread, torch not imported."""
    return (
        hasattr(os, "fork")
        and hasattr(os, "memfd_create")
        and "torch" not in sys.modules
        and threading.active_count() == 1
    )


class _Arena:
    """Arrays in one memory file: the child grows the file for each array and maps its part; `descriptor`
    names an array by (offset, shape, dtype) so the parent can map the same pages."""

    def __init__(self, fd: int):
        self.fd, self.size = fd, 0
        self.arrays: dict[int, tuple[np.ndarray, tuple]] = {}  # id -> (the array, kept alive; its descriptor)

    def alloc(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return np.empty(shape, dtype)
        offset = self.size
        self.size = offset + -(-nbytes // _PAGE) * _PAGE
        os.ftruncate(self.fd, self.size)
        array = np.frombuffer(_map(self.fd, offset, nbytes), dtype=dtype).reshape(shape)
        self.arrays[id(array)] = (array, (offset, tuple(shape), dtype.str))
        return array

    def descriptor(self, obj) -> tuple | None:
        hit = self.arrays.get(id(obj))
        return hit[1] if hit is not None and hit[0] is obj else None


def _map(fd: int, offset: int, nbytes: int) -> mmap.mmap:
    """A writable shared mapping of the memory file's bytes [offset, offset + nbytes). The parent does not ask for
    its pages up front (MAP_POPULATE): a run touches only the arrays it uses (an MLP never reads the uint8
    images), and mapping every page before the first step cost 0.06 s more than the faults of those it touches."""
    return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)


class _ArenaPickler(pickle.Pickler):
    def __init__(self, file, arena: _Arena):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.arena = arena

    def persistent_id(self, obj):
        return self.arena.descriptor(obj) if isinstance(obj, np.ndarray) else None


class _ArenaUnpickler(pickle.Unpickler):
    def __init__(self, file, fd: int):
        super().__init__(file)
        self.fd = fd

    def persistent_load(self, pid):
        offset, shape, dtype = pid
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return np.frombuffer(_map(self.fd, offset, nbytes), dtype=dtype).reshape(shape)


class ChildLoad:
    """A load running in a child process; `result()` waits for it (or raises what it raised)."""

    def __init__(self, load: Callable[..., object]):
        self.fd = os.memfd_create("rethink-data", getattr(os, "MFD_CLOEXEC", 0))
        try:
            read, write = os.pipe()
        except OSError:
            os.close(self.fd)
            raise
        for stream in (sys.stdout, sys.stderr):  # else the child's copy of a buffered line is printed twice
            stream.flush()
        try:
            self.pid = os.fork()
        except OSError:
            for fd in (self.fd, read, write):
                os.close(fd)
            raise
        if self.pid == 0:  # the child: never returns
            os.close(read)
            _child(load, _Arena(self.fd), write)
        os.close(write)
        self.read, self.load = read, load
        self._done = False

    def result(self):
        """The load's result, or its error raised here; a child that died without a word (killed, out of
        memory) is said on stderr and the load runs again in this process."""
        try:
            with os.fdopen(self.read, "rb") as pipe:
                payload = pipe.read()
            _, status = os.waitpid(self.pid, 0)
            self._done = True
            if payload:
                kind, value = _ArenaUnpickler(io.BytesIO(payload), self.fd).load()
        finally:
            os.close(self.fd)
        if not payload:
            how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
            print(f"warning: the data loader process ended without a result ({how}); reading the data here",
                  file=sys.stderr)  # fmt: skip
            return self.load(None)
        if kind == "error":
            raise value
        return value

    def cancel(self) -> None:
        """Stop the child (the parent failed before it asked for the result)."""
        if self._done:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self._done = True
        for fd in (self.read, self.fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _child(load: Callable[..., object], arena: _Arena, write: int) -> None:
    """Run `load(alloc)` and send back its result (or its error); exit without the parent's cleanup."""
    code = 0
    try:
        try:
            out = io.BytesIO()
            _ArenaPickler(out, arena).dump(("ok", load(arena.alloc)))
        except BaseException as e:  # noqa: BLE001 - every failure goes to the parent, which raises it
            code = 1
            out = io.BytesIO()
            try:
                pickle.dump(("error", e), out, protocol=pickle.HIGHEST_PROTOCOL)
                pickle.loads(out.getvalue())  # an exception that cannot be rebuilt is sent as its text
            except Exception:
                out = io.BytesIO()
                pickle.dump(("error", RuntimeError(f"{type(e).__name__}: {e}")), out)
        with os.fdopen(write, "wb") as pipe:
            pipe.write(out.getvalue())
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - the parent gone (a broken pipe): nothing is left to tell
        code = 1
    finally:
        os._exit(code)


def start(load: Callable[..., object]):
    """Begin `load(alloc)` (alloc: cifar.Alloc, or None) in a child process where `available()`, else in a thread.
    Returns an object with `result()` and `cancel()`."""
    if available():
        try:
            return ChildLoad(load)
        except OSError:  # memfd_create refused (a sandbox's seccomp profile) or no process to be had: a thread
            pass
    return _ThreadLoad(load)


class _ThreadLoad:
    def __init__(self, load: Callable[..., object]):
        self.pool = ThreadPoolExecutor(1)
        self.future: Future = self.pool.submit(load, None)

    def result(self):
        try:
            return self.future.result()
        finally:
            self.pool.shutdown()

    def cancel(self) -> None:
        self.pool.shutdown(wait=True)
