"""The store interface: keys are '/'-separated paths relative to the store's root; every write is atomic (a
reader sees the old object or the new one, never a part). Backends: rethink/store/local.py and s3.py."""

from __future__ import annotations

from rethink.errors import UserError

DEFAULT_STORE = "./runs"


class StoreError(UserError):
    """The store cannot be reached or refuses us; the message says which and what to do."""

    exit_code = 3


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
