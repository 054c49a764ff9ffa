"""The store interface: keys are '/'-separated paths relative to the store's root; every write is atomic (a
reader sees the old object or the new one, never a part). Backends: rethink/store/local.py and s3.py."""

from __future__ import annotations

from rethink.errors import UserError

DEFAULT_STORE = "./runs"


class StoreError(UserError):
    """The store cannot be reached or refuses us; the message says which and what to do."""

    exit_code = 3
    failure = False  # nothing could be recorded in it


class Store:
    """Key-value access to a store; keys are '/'-separated paths relative to its root."""

    url: str

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write the whole object atomically."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix` (recursively), sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and a version token that changes with every write; (None, None) when absent."""
        raise NotImplementedError

    def write_if(self, key: str, data: bytes, version: str | None) -> str | None:
        """Write only if the object is still at `version` (None: only if it does not exist); returns the new
        version, or None when someone else wrote it first (nothing is written then)."""
        raise NotImplementedError

    def usage(self, prefix: str = "") -> tuple[int, int]:
        """(objects, bytes) under `prefix`."""
        raise NotImplementedError

    def sweep_temporaries(self, prefix: str) -> int:
        """Remove what interrupted writes left under `prefix` (nothing for stores whose writes leave nothing);
        returns how many. Only for a prefix no one else is writing to (a run whose lease this process holds)."""
        return 0

    def copy(self, src: str, dst: str) -> None:
        data = self.read_bytes(src)
        if data is not None:
            self.write_bytes(dst, data)

    def where(self, key: str = "") -> str:
        """A human-readable location of `key` (a path or an s3:// URL)."""
        return self.url.rstrip("/") + ("/" + key if key else "")

    def read_text(self, key: str) -> str | None:
        data = self.read_bytes(key)
        return None if data is None else data.decode()

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())
