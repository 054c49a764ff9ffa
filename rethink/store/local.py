"""A store in a local directory: atomic writes by temp file, fsync and rename."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from rethink.store.base import Store, StoreError


class LocalStore(Store):
    """A directory; atomic writes by temp file + fsync + rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _error(self, what: str, e: OSError) -> StoreError:
        return StoreError(f"cannot {what} in store {self.url}: {e.strerror or e} ({e.filename or self.url})")

    def read_bytes(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._error(f"read {key}", e) from None

    def write_bytes(self, key, data):
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise self._error(f"write {key}", e) from None
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp makes 0600; others may need to read results
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise self._error(f"write {key}", e) from None
            raise
        _fsync_dir(path.parent)

    def copy(self, src, dst):
        """A hard link, instant whatever the size (a checkpoint's rotation copied 10-100 MB before): this store
        never changes a file in place (every write replaces it), so src and dst stay independent. Where the file
        system has no hard links, a copy."""
        source, target = self._path(src), self._path(dst)
        tmp = target.parent / f".{target.name}.{os.getpid()}.link.tmp"  # swept and never listed, like any .tmp
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            os.link(source, tmp)
            os.replace(tmp, target)
        except FileNotFoundError:
            return  # nothing to copy: nothing happens (as in every store)
        except OSError:
            tmp.unlink(missing_ok=True)
            super().copy(src, dst)
            return
        _fsync_dir(target.parent)

    def exists(self, key):
        return self._path(key).exists()

    def list(self, prefix):
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)).replace(os.sep, "/")
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".tmp")
        )

    def delete(self, key):
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise self._error(f"delete {key}", e) from None

    @contextmanager
    def _locked(self, key: str):
        """Exclusive among the processes of this machine, for a read-compare-write of `key` (flock)."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._error(f"lock {key}", e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read_versioned(self, key):
        data = self.read_bytes(key)
        return (None, None) if data is None else (data, hashlib.sha256(data).hexdigest())

    def write_if(self, key, data, version):
        with self._locked(key):
            if self.read_versioned(key)[1] != version:
                return None
            self.write_bytes(key, data)
        return hashlib.sha256(data).hexdigest()

    def usage(self, prefix=""):
        base = self._path(prefix) if prefix else self.root
        files = [p for p in base.rglob("*") if p.is_file()] if base.is_dir() else []
        stats = {(st.st_dev, st.st_ino): st.st_size for st in (p.stat() for p in files)}  # a hard link counts once
        return len(files), sum(stats.values())

    def sweep_temporaries(self, prefix):
        base = self._path(prefix)
        stale = list(base.glob(".*.tmp")) if base.is_dir() else []
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would have given the file


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: not every file system lets a directory be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
